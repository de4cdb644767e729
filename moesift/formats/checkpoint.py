"""Checkpoint index from safetensors headers only: names, dtypes, shapes and byte ranges, classified by
the model's adapter. No tensor data is read, so a 700B checkpoint is indexed in milliseconds."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch.base import Adapter
from ..arch.registry import adapter_for
from ..arch.spec import TensorRole
from ..core.errors import MoesiftError
from ..core.identity import load_config_dict

# bytes per element of safetensors dtypes (sub-byte types are stored packed in U8 and counted as such)
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets inside the shard's data section
    end: int
    role: TensorRole

    @property
    def nbytes(self) -> int:
        return self.end - self.start


MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header dict, size of the header block including its 8-byte length) of a safetensors file, checked
    with `check_header` against the file's size: nothing that reads tensors afterwards can be misled."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise MoesiftError(f"{str(p)!r} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise MoesiftError(f"{str(p)!r} is damaged: its header length {n} runs past the end of the "
                                   f"{size}-byte file (truncated or not safetensors)")
            text = f.read(n)
    except OSError as e:
        raise MoesiftError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MoesiftError(f"{str(p)!r} is damaged: its header is not valid JSON") from None
    check_header(header, size - 8 - n, p)
    return header, 8 + n


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def check_header(header: Any, data_size: int, path: str | os.PathLike) -> None:
    """Refuse a safetensors header unless it is exactly what the format allows: a JSON object of tensors
    with a known dtype, a shape of non-negative integers and `data_offsets` whose byte count is
    shape x dtype size, covering the `data_size` bytes after the header with no hole, overlap or overrun
    (the rules the safetensors library itself applies when it opens the file)."""
    p = str(path)
    if not isinstance(header, dict):
        raise MoesiftError(f"{p!r} is damaged: its header is a JSON {type(header).__name__}, not an object")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise MoesiftError(f"{p!r} is damaged: __metadata__ must map names to strings")
            continue
        if not isinstance(info, dict):
            raise MoesiftError(f"{p!r} is damaged: the entry of tensor {name!r} is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise MoesiftError(f"{p!r} is damaged: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise MoesiftError(f"{p!r} is damaged: tensor {name!r} has shape {shape!r} (not a list of sizes)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise MoesiftError(f"{p!r} is damaged: tensor {name!r} has no valid data_offsets ({offs!r})")
        start, end = offs
        n_el = 1
        for s in shape:
            n_el *= s
        if end < start or end - start != n_el * DTYPE_BYTES[dtype]:
            raise MoesiftError(f"{p!r} is damaged: tensor {name!r} spans {end - start} bytes but its shape "
                               f"{shape} of {dtype} needs {n_el * DTYPE_BYTES[dtype]}")
        spans.append((start, end, name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else "leaves a hole before it"
            raise MoesiftError(f"{p!r} is damaged: tensor {name!r} at byte {start} {what} (ends at {pos})")
        pos = end
    if pos > data_size:
        raise MoesiftError(f"{p!r} is damaged: its tensors need {pos} data bytes but the file holds {data_size} "
                           "(truncated?)")
    if pos < data_size:
        raise MoesiftError(f"{p!r} is damaged: {data_size - pos} bytes after the last tensor belong to none")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def _inside(target: Path, roots: list[Path]) -> bool:
    return any(target == r or r in target.parents for r in roots)


def allowed_roots(model_dir: str | os.PathLike) -> list[Path]:
    """Folders a checkpoint's files may resolve into: the model directory, and for a Hugging Face cache
    snapshot (`models--org--name/snapshots/<sha>`) the same repository's `blobs/` folder, where the
    snapshot's links point."""
    d = Path(model_dir)
    roots = [d.resolve()]
    lexical = Path(os.path.abspath(d))
    if lexical.parent.name == "snapshots" and lexical.parent.parent.name.startswith("models--"):
        blobs = lexical.parent.parent / "blobs"
        if blobs.is_dir():
            roots.append(blobs.resolve())
    return roots


def read_index(model_dir: str | os.PathLike) -> dict[str, str] | None:
    """The `weight_map` of the directory's model.safetensors.index.json (None without one), checked: an
    object mapping tensor names to shard files that exist inside the model directory (or, for a hub cache
    snapshot, link into the same repository's blobs)."""
    d = Path(model_dir)
    idx = d / "model.safetensors.index.json"
    if not idx.is_file():
        return None
    try:
        obj = json.loads(idx.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MoesiftError(f"{str(idx)!r} is not valid JSON; the checkpoint index is damaged") from None
    except OSError as e:
        raise MoesiftError(f"cannot read {str(idx)!r}: {e.strerror or e}") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise MoesiftError(f"{str(idx)!r} is not a valid safetensors index (weight_map must be a non-empty "
                           "object of tensor name -> shard file)")
    for k, v in wm.items():
        if not isinstance(v, str) or not v:
            raise MoesiftError(f"{str(idx)!r} is damaged: tensor {k!r} maps to {v!r}, not a shard file name")
    roots = allowed_roots(d)
    for f in sorted(set(wm.values())):
        if Path(f).is_absolute() or ".." in Path(f).parts or not _inside((d / f).resolve(), roots):
            raise MoesiftError(f"{str(idx)!r} names {f!r}, which lies outside the model directory; refusing")
        if not (d / f).is_file():
            raise MoesiftError(f"shard {f!r} listed in {str(idx)!r} is missing")
    return wm


def shard_files(model_dir: str | os.PathLike) -> list[str]:
    """Safetensors shard names of a checkpoint directory, from its index when present, every header checked
    (`check_header`) and every index entry found in its shard. Refuses pickle-only checkpoints, missing
    shards and files that resolve outside the directory."""
    return list(checked_headers(model_dir))


def checked_headers(model_dir: str | os.PathLike) -> dict[str, tuple[dict[str, Any], int]]:
    """{shard file: (header, header block size)} of a checkpoint directory, all checked."""
    d = Path(model_dir)
    wm = read_index(d)
    if wm is not None:
        files = sorted(set(wm.values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        if list(d.glob("*.bin")) or list(d.glob("*.pt")) or list(d.glob("*.pth")):
            raise MoesiftError(
                f"{str(d)!r} holds only pickle weights (.bin/.pt); moesift reads safetensors only. Convert it "
                "first (load it yourself and save_pretrained(..., safe_serialization=True))"
            )
        raise MoesiftError(f"no safetensors weights in {str(d)!r}")
    roots = allowed_roots(d)
    out: dict[str, tuple[dict[str, Any], int]] = {}
    seen: dict[str, str] = {}
    for f in files:
        if not _inside((d / f).resolve(), roots):
            raise MoesiftError(f"{str(d / f)!r} links outside the model directory; refusing")
        header, size = read_header(d / f)
        for name in header:
            if name == "__metadata__":
                continue
            if name in seen:
                raise MoesiftError(f"tensor {name!r} is stored twice ({seen[name]!r} and {f!r}); the checkpoint "
                                   "is damaged")
            seen[name] = f
        out[f] = (header, size)
    if wm is not None:
        for name, f in wm.items():
            if name not in out[f][0]:
                raise MoesiftError(f"the index of {str(d)!r} places tensor {name!r} in {f!r}, which does not "
                                   "hold it; the checkpoint is damaged")
    return out


@dataclass
class CheckpointIndex:
    directory: Path
    config: dict[str, Any]
    adapter: Adapter
    tensors: list[TensorEntry]
    header_sizes: dict[str, int]  # shard file -> size of its header block (8-byte length included): data start

    @classmethod
    def build(cls, model: str | os.PathLike) -> CheckpointIndex:

        d = resolve_model_dir(model)
        config = load_config_dict(d)
        adapter = adapter_for(config)
        tensors = []
        sizes: dict[str, int] = {}
        for f, (header, size) in checked_headers(d).items():
            sizes[f] = size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                s, e = info["data_offsets"]
                role = adapter.classify(name, config)
                tensors.append(TensorEntry(name, f, info["dtype"], tuple(info["shape"]), s, e, role))
        return cls(directory=d, config=config, adapter=adapter, tensors=tensors, header_sizes=sizes)

    @property
    def spec(self):
        return self.adapter.spec(self.config)

    def check_consistent(self) -> None:
        """Refuse, in one line, a config that does not describe these tensors, before any model is built
        from it: a routing key missing or out of range, or a MoE layer whose router or experts are missing,
        extra (a layer or expert id the config does not have) or of another shape. A model built from such
        a config would run with randomly initialised weights."""
        problem = consistency_problem(self)
        if problem:
            raise MoesiftError(f"{str(self.directory)!r}: {problem}; config.json does not describe the tensors "
                               "of this checkpoint")

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.role.kind] = out.get(t.role.kind, 0) + t.nbytes
        return out

    def expert_bytes(self) -> dict[int, dict[int, int]]:
        """{decoder layer: {expert id: bytes}} for routed experts (fused tensors split evenly, and router rows
        / biases counted with their expert so that trimming predictions are exact)."""
        spec = self.spec
        E = spec.n_experts
        out: dict[int, dict[int, int]] = {}
        for t in self.tensors:
            r = t.role
            if r.kind not in ("expert", "router", "router_bias") or r.layer is None:
                continue
            per = out.get(r.layer)
            if per is None:  # (not setdefault: that would build a dict of E entries for every tensor)
                per = out[r.layer] = dict.fromkeys(range(E), 0)
            if r.expert is not None:
                per[r.expert] += t.nbytes
            else:
                if t.nbytes % E:
                    raise MoesiftError(f"tensor {t.name} ({t.nbytes} bytes) does not split evenly over {E} experts")
                for e in range(E):
                    per[e] += t.nbytes // E
        return out

    def predicted_bytes(self, resident: dict[int, list[int]]) -> int:
        """Tensor bytes of the checkpoint trimmed to `resident` ({decoder layer: kept ids}); layers not in
        `resident` are kept whole."""
        per = self.expert_bytes()
        dropped = 0
        for layer, eb in per.items():
            keep = set(resident.get(layer, eb.keys()))
            dropped += sum(b for e, b in eb.items() if e not in keep)
        if dropped:  # a trim that removes experts leaves out multi-token-prediction layers (formats.trimmed)
            dropped += sum(t.nbytes for t in self.tensors if t.role.kind == "mtp")
        return self.total_bytes() - dropped


def checkpoint_index(model: str | os.PathLike) -> CheckpointIndex:
    return CheckpointIndex.build(model)


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory for `model`: the path itself, or the hub cache snapshot of a hub id (offline)."""
    p = Path(model)
    if p.is_dir():
        return p
    s = str(model)
    if p.exists():
        raise MoesiftError(f"{s!r} is a file; pass the model directory")
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
        except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
            raise MoesiftError(
                f"model {s!r} is neither a local directory nor in the local Hugging Face cache "
                "(download it first with `hf download`, or pass a directory)"
            ) from None
    raise MoesiftError(f"model directory {s!r} not found")


def _expert_rows(t: TensorEntry) -> int | None:
    """The number of experts a fused expert or router tensor holds along its expert dimension."""
    r = t.role
    if r.expert_dim is None or r.expert_dim >= len(t.shape):
        return None
    n = t.shape[r.expert_dim]
    return n // r.expert_block if r.expert_block else n


def consistency_problem(index: CheckpointIndex) -> str | None:
    """The first way the config and the tensors of `index` disagree, as a phrase naming the config key, or
    None when they agree (see `CheckpointIndex.check_consistent`)."""
    spec = index.spec
    keys = getattr(index.adapter, "top_k_keys", ("num_experts_per_tok",))
    ekeys = getattr(index.adapter, "n_experts_keys", ("num_experts",))
    E = spec.n_experts
    if not 1 <= spec.top_k <= E:
        return f"{keys[0]} {spec.top_k} is outside 1..{E} (the routed experts of a layer, {ekeys[0]})"
    moe = set(spec.moe_layers)
    shape = index.adapter.model_shape(index.config)
    routers: dict[int, list[TensorEntry]] = {}
    experts: dict[int, list[TensorEntry]] = {}
    for t in index.tensors:
        r = t.role
        if r.kind not in ("router", "expert") or r.layer is None:
            continue
        if r.layer not in moe:
            return (f"tensor {t.name!r} belongs to MoE layer {r.layer}, which the config does not have "
                    f"(num_hidden_layers {shape.get('num_hidden_layers')}, MoE layers {sorted(moe)[:8]})")
        (routers if r.kind == "router" else experts).setdefault(r.layer, []).append(t)
    hidden = shape.get("hidden_size")
    if isinstance(index.config.get("quantization"), dict):
        hidden = None  # an mlx-lm quantized router stores packed rows (and scales / biases per group)
    for layer in spec.moe_layers:
        if layer not in routers:
            return (f"the config makes decoder layer {layer} a MoE layer (num_hidden_layers, model_type "
                    f"{spec.model_type!r}), but no router tensor of that layer is stored")
        for t in routers[layer]:
            n = _expert_rows(t)
            if n is not None and n != E:
                return f"router {t.name!r} has {n} expert rows, but {ekeys[0]} is {E}"
            if hidden and len(t.shape) == 2 and t.role.expert_dim is not None and t.shape[1 - t.role.expert_dim] != hidden:
                return f"router {t.name!r} has shape {list(t.shape)}, but hidden_size is {hidden}"
        ts = experts.get(layer, [])
        if not ts:
            return f"the config makes decoder layer {layer} a MoE layer, but no expert tensor of that layer is stored"
        ids = {t.role.expert for t in ts if t.role.expert is not None}
        if ids and (max(ids) >= E or len(ids) != E):
            extra = sorted(i for i in ids if i >= E)
            what = (f"expert {extra[0]}" if extra else f"{len(ids)} experts")
            return f"decoder layer {layer} stores {what}, but {ekeys[0]} is {E}"
        for t in ts:
            n = _expert_rows(t) if t.role.expert is None else None
            if n is not None and n != E:
                return f"expert tensor {t.name!r} holds {n} experts, but {ekeys[0]} is {E}"
    return None
