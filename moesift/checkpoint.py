"""Checkpoint index from safetensors headers only: names, dtypes, shapes and byte ranges, classified by
the model's adapter. No tensor data is read, so a 700B checkpoint is indexed in milliseconds."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch.base import Adapter, TensorRole, adapter_for
from .errors import MoesiftError

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


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header dict, size of the header block including its 8-byte length) of a safetensors file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise MoesiftError(f"{str(p)!r} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024:
                raise MoesiftError(f"{str(p)!r} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise MoesiftError(f"cannot read {str(p)!r}: {e.strerror}") from None
    except json.JSONDecodeError:
        raise MoesiftError(f"{str(p)!r} is not a safetensors file (bad header)") from None
    return header, 8 + n


def shard_files(model_dir: str | os.PathLike) -> list[str]:
    """Safetensors shard names of a checkpoint directory, from its index when present. Refuses pickle-only
    checkpoints, missing shards and index entries that point outside the directory."""
    d = Path(model_dir)
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise MoesiftError(f"{str(idx)!r} is not a valid safetensors index (no weight_map)") from None
        files = sorted(set(wm.values()))
        root = d.resolve()
        for f in files:
            target = (d / f).resolve()
            if root not in target.parents:
                raise MoesiftError(f"{str(idx)!r} names {f!r}, which lies outside the model directory; refusing")
            if not target.is_file():
                raise MoesiftError(f"shard {f!r} listed in {str(idx)!r} is missing")
        return files
    if (d / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in d.glob("*.safetensors"))
    if found:
        return found
    if list(d.glob("*.bin")) or list(d.glob("*.pt")) or list(d.glob("*.pth")):
        raise MoesiftError(
            f"{str(d)!r} holds only pickle weights (.bin/.pt); moesift reads safetensors only. Convert it "
            "first (load it yourself and save_pretrained(..., safe_serialization=True))"
        )
    raise MoesiftError(f"no safetensors weights in {str(d)!r}")


def load_config_dict(model_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise MoesiftError(f"{str(model_dir)!r} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoesiftError(f"{str(p)!r} is not valid JSON ({e})") from None


@dataclass
class CheckpointIndex:
    directory: Path
    config: dict[str, Any]
    adapter: Adapter
    tensors: list[TensorEntry]

    @classmethod
    def build(cls, model: str | os.PathLike) -> CheckpointIndex:
        from .loading import resolve_model_dir

        d = resolve_model_dir(model)
        config = load_config_dict(d)
        adapter = adapter_for(config)
        tensors = []
        for f in shard_files(d):
            header, _ = read_header(d / f)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                s, e = info["data_offsets"]
                role = adapter.classify(name, config)
                tensors.append(TensorEntry(name, f, info["dtype"], tuple(info["shape"]), s, e, role))
        return cls(directory=d, config=config, adapter=adapter, tensors=tensors)

    @property
    def spec(self):
        return self.adapter.spec(self.config)

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
            per = out.setdefault(r.layer, {e: 0 for e in range(E)})
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
        return self.total_bytes() - dropped


def checkpoint_index(model: str | os.PathLike) -> CheckpointIndex:
    return CheckpointIndex.build(model)
