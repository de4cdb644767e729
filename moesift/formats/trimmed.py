"""The trimmed-checkpoint layout, shared by trim (writer), resident loading and the offload runtime (readers):
which bytes of each source tensor a plan keeps (`plan_layout`, `sliced_bytes`), and the record a trim leaves
beside its weights (`moesift_plan.json`, read by `read_trimmed_record`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..arch.base import Adapter
from ..core.errors import MoesiftError
from .checkpoint import DTYPE_BYTES

FORMAT = "moesift-trimmed/1"


NONSTANDARD_MODEL_TYPE = "moesift_trimmed"


PLAN_FILE = "moesift_plan.json"


INDEX_FILE = "model.safetensors.index.json"


@dataclass
class OutTensor:
    name: str
    src_name: str
    src_file: str
    dtype: str
    shape: list[int]
    nbytes: int
    ranges: list[tuple[int, int]] = field(default_factory=list)  # absolute (offset, length) in src_file
    slice_keep: list[int] | None = None  # set when the tensor must be read and sliced by the adapter
    role: Any = None


def _expert_dim(role: Any, ndim: int) -> int:
    d = role.expert_dim if role.expert_dim is not None else 0
    return d + ndim if d < 0 else d


def drops_mtp(index: Any, resident: Mapping[int, Sequence[int]]) -> bool:
    """True when a checkpoint trimmed to `resident` leaves out the multi-token-prediction layers: it removes
    experts and the checkpoint stores such layers (see `Adapter.mtp_layers`)."""
    E = index.spec.n_experts
    return any(len(v) < E for v in resident.values()) and any(t.role.kind == "mtp" for t in index.tensors)


def mlx_layout(index: Any) -> bool:
    """True when the checkpoint of `index` (a CheckpointIndex) is an mlx-lm model folder (`Adapter.mlx_layout`):
    its trim keeps mlx-lm's layout (stacked experts, quantized tensors and their config entry as they are)."""
    return index.adapter.mlx_layout(index.config, [t.name for t in index.tensors])


def stored_output(index: Any) -> OutTensor | None:
    """For a tied model that stores no output projection, the output projection as a tensor of its own: the
    bytes of the input embedding under the family's lm_head name (engines without tied outputs need it; the
    model computes the same function). None when the model is untied or stores it already."""
    ad, cfg = index.adapter, index.config
    names = {t.name: t for t in index.tensors}
    emb = names.get(ad.embed_name)
    if not cfg.get("tie_word_embeddings") or ad.lm_head_name in names or emb is None:
        return None
    base = index.header_sizes[emb.file]
    return OutTensor(ad.lm_head_name, emb.name, emb.file, emb.dtype, list(emb.shape), emb.nbytes,
                     [(base + emb.start, emb.nbytes)], role=emb.role)


def plan_layout(index: Any, resident: Mapping[int, Sequence[int]]) -> list[OutTensor]:
    """The output tensors, in source order, with where their bytes come from. Reads only headers."""
    cfg, ad = index.config, index.adapter
    E = index.spec.n_experts
    custom_slice = type(ad).slice_experts is not Adapter.slice_experts
    drop_mtp = drops_mtp(index, resident)
    out: list[OutTensor] = []
    for t in sorted(index.tensors, key=lambda t: (t.file, t.start)):
        base = index.header_sizes[t.file]
        r = t.role
        if r.kind == "mtp" and drop_mtp:
            continue
        keep = resident.get(r.layer) if r.layer is not None else None
        if keep is None or r.kind not in ("expert", "router", "router_bias"):
            out.append(OutTensor(t.name, t.name, t.file, t.dtype, list(t.shape), t.nbytes,
                                  [(base + t.start, t.nbytes)], role=r))
            continue
        keep = sorted(keep)
        if r.expert is not None:
            if r.expert in keep:
                new = ad.rename_expert(t.name, cfg, keep.index(r.expert))
                out.append(OutTensor(new, t.name, t.file, t.dtype, list(t.shape), t.nbytes,
                                      [(base + t.start, t.nbytes)], role=r))
            continue
        shape = list(t.shape)
        if not shape:
            raise MoesiftError(f"tensor {t.name} is a scalar but classified with an expert dimension")
        d = _expert_dim(r, len(shape))
        block = r.expert_block or 1
        if shape[d] != E * block:
            raise MoesiftError(
                f"tensor {t.name} has {shape[d]} rows along its expert dimension {d}; expected {E} x {block} "
                f"(experts x rows per expert); the {index.spec.model_type} adapter misclassifies it"
            )
        new_shape = list(shape)
        new_shape[d] = len(keep) * block
        if t.nbytes % E:
            raise MoesiftError(f"tensor {t.name} ({t.nbytes} bytes) does not split evenly over {E} experts")
        row = t.nbytes // E
        nb = row * len(keep)
        elem = DTYPE_BYTES.get(t.dtype)
        if elem is not None:
            n_el = 1
            for s in new_shape:
                n_el *= s
            if n_el * elem != nb:
                raise MoesiftError(f"tensor {t.name}: sliced size {nb} bytes disagrees with shape {new_shape}")
        lead = 1
        for s in shape[:d]:
            lead *= s
        if lead == 1 and not custom_slice:
            ranges = _merge([(base + t.start + e * row, row) for e in keep])
            out.append(OutTensor(t.name, t.name, t.file, t.dtype, new_shape, nb, ranges, role=r))
        else:
            out.append(OutTensor(t.name, t.name, t.file, t.dtype, new_shape, nb, [], slice_keep=keep, role=r))
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise MoesiftError("trimming would give two tensors the same name; the adapter's renaming is inconsistent")
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for off, n in ranges:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    return merged


def sliced_bytes(src_dir: Path, t: OutTensor, adapter: Any, cfg: Mapping[str, Any]) -> bytes:
    import torch

    with safe_open(str(src_dir / t.src_file), framework="pt") as f:
        x = f.get_tensor(t.src_name)
    y = adapter.slice_experts(x, t.role, t.slice_keep, cfg).contiguous()
    if list(y.shape) != t.shape:
        raise MoesiftError(f"tensor {t.name}: adapter slice gave shape {list(y.shape)}, expected {t.shape}")
    b = y.reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(b) != t.nbytes:
        raise MoesiftError(f"tensor {t.name}: sliced to {len(b)} bytes, expected {t.nbytes}")
    return b


def read_trimmed_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `moesift_plan.json` record of a trimmed checkpoint, or None when the directory has none."""
    p = Path(path) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise MoesiftError(f"{str(p)!r} is not valid JSON; the trimmed checkpoint is damaged") from None
    if d.get("schema") != FORMAT:
        raise MoesiftError(f"{str(p)!r} has schema {d.get('schema')!r}; expected {FORMAT}")
    return d
