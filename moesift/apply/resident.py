"""Models with only resident experts in memory: from a trimmed checkpoint (`load_trimmed`, any plan,
uniform or not) or straight from the full checkpoint (`load_resident`, nothing written).

MoE layers may hold different numbers of experts. The model class of the family is built for the largest
count, and the MoE block of every layer with another count is replaced, while the model is still on the
meta device, by the block of a model built for that layer's count (adapter `replace_moe_block`); then
transformers' own loader fills the weights, with its per-family conversions of on-disk names.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..engines.hf import (
    TORCH_DTYPES,
    check_device,
    config_like,
    config_obj,
    model_class,
    parse_dtype,
    require_accelerate,
    resolve_device,
)
from ..formats.checkpoint import (
    CheckpointIndex,
    load_config_dict,
    read_header,
    resolve_model_dir,
    shard_files,
)
from ..formats.plan import as_plan
from ..formats.trimmed import NONSTANDARD_MODEL_TYPE, plan_layout, read_trimmed_record, sliced_bytes


def variable_expert_class(source_cfg: Mapping[str, Any], resident: Mapping[int, Sequence[int]]) -> tuple[Any, Any]:
    """(model class, config) for a model whose MoE layer `l` holds the experts `resident[l]` (renumbered
    0..n-1). When every layer has the same count the family's own class is returned."""

    ad = adapter_for(source_cfg)
    spec = ad.spec(source_cfg)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    base_d = ad.rewrite_config(dict(source_cfg), full)
    base_cfg = config_obj(base_d)
    cls = model_class(base_cfg)
    key = json.dumps(base_d, sort_keys=True, default=str)
    per_layer: dict[int, dict[str, Any]] = {}
    for layer, ids in full.items():
        d = ad.rewrite_config(dict(source_cfg), {m: ids for m in spec.moe_layers})
        if json.dumps(d, sort_keys=True, default=str) != key:
            per_layer[layer] = d
    if not per_layer:
        return cls, base_cfg

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        built: dict[str, Any] = {}
        for layer, d in per_layer.items():
            k = json.dumps(d, sort_keys=True, default=str)
            if k not in built:
                built[k] = cls(config_like(d, config))
            ad.replace_moe_block(self, layer, ad.moe_block(built[k], layer))
        built.clear()

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    return sub, base_cfg


def _load_kwargs(device: str | None, dtype: str | None, read_device: str = "cpu") -> dict[str, Any]:
    import importlib.util

    check_device(device)
    kw: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device == "spread":

        require_accelerate()
        kw["device_map"] = "auto"
    elif read_device != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kw["device_map"] = {"": read_device}  # the tensors are already there: no trip through the host
    return kw


def _to(model: Any, device: str | None) -> Any:
    if device not in (None, "spread", "cpu"):
        model = model.to(device)
    return model


def _finish(model: Any, resident: Mapping[int, Sequence[int]]) -> Any:
    model.eval()
    model.moesift_resident = {int(k): list(v) for k, v in resident.items()}
    return model


_GAP = 1 << 20  # bytes of unneeded data read through rather than starting a new read
_CHUNK = 64 << 20  # one read; also the size of a pinned staging buffer
_IN_FLIGHT = 4  # reads in flight (staging buffers)


@dataclass
class _Piece:
    name: str
    file: str
    offset: int  # absolute offset in the file
    nbytes: int
    dst_offset: int  # offset inside the destination tensor


def _extents(pieces: list[_Piece]) -> list[tuple[str, int, int, list[_Piece]]]:
    """Pieces grouped into large sequential reads: (file, start, length, pieces) of at most _CHUNK bytes
    (a larger piece is split), neighbours joined across gaps of up to _GAP bytes."""
    out: list[tuple[str, int, int, list[_Piece]]] = []
    for p in sorted(pieces, key=lambda p: (p.file, p.offset)):
        for o in range(0, p.nbytes, _CHUNK):
            q = _Piece(p.name, p.file, p.offset + o, min(_CHUNK, p.nbytes - o), p.dst_offset + o)
            if out:
                f, start, n, ps = out[-1]
                end = q.offset + q.nbytes
                if f == q.file and start + n <= q.offset <= start + n + _GAP and end - start <= _CHUNK:
                    out[-1] = (f, start, end - start, ps + [q])
                    continue
            out.append((q.file, q.offset, q.nbytes, [q]))
    return out


def _pread_into(fd: int, mv: memoryview, offset: int, path: str) -> None:
    got = 0
    while got < len(mv):
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k <= 0:
            raise MoesiftError(f"{path!r} ended early; the checkpoint is damaged")
        got += k


def read_tensors(directory: Path, tensors: list[tuple[str, str, list[int], list[tuple[str, int, int]]]],
                 device: Any, staged: bool | None = None) -> dict[str, Any]:
    """Tensors read from safetensors shards straight into preallocated tensors on `device`.

    `tensors`: (name, safetensors dtype, shape, [(file, absolute offset, bytes)]) with the pieces in order.
    Reads are large (`_CHUNK`) and sequential per file, several in flight on a thread pool. On the CPU
    they land in the destination tensors directly (scatter reads, no copy); on an accelerator each read
    lands in one of a few pinned staging buffers and is copied to the device asynchronously, the buffer
    being reused once its copies are done (`staged` forces either way). No other copy of the data is made."""
    import concurrent.futures as cf
    from collections import deque

    import torch

    dev = torch.device(device)
    dst: dict[str, Any] = {}
    pieces: list[_Piece] = []
    out: dict[str, Any] = {}
    for name, dt, shape, parts in tensors:
        tdt = TORCH_DTYPES.get(dt)
        if tdt is None or not hasattr(torch, tdt):
            raise MoesiftError(f"tensor {name} has dtype {dt}, which torch cannot hold")
        nbytes = sum(n for _, _, n in parts)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst[name] = buf
        o = 0
        for f, off, n in parts:
            if n:
                pieces.append(_Piece(name, f, off, n, o))
            o += n
        out[name] = buf.view(getattr(torch, tdt)).reshape(shape) if nbytes else torch.empty(
            shape, dtype=getattr(torch, tdt), device=dev)
    extents = _extents(pieces)
    fds = {f: os.open(directory / f, os.O_RDONLY) for f in {e[0] for e in extents}}
    try:
        for fd in fds.values():
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with cf.ThreadPoolExecutor(_IN_FLIGHT) as pool:
            if not (dev.type != "cpu" if staged is None else staged):
                host = {k: memoryview(v.numpy()) for k, v in dst.items()}

                def read_cpu(ext):
                    f = ext[0]
                    for p in ext[3]:  # each piece read in place; gaps between them are skipped
                        _pread_into(fds[f], host[p.name][p.dst_offset : p.dst_offset + p.nbytes], p.offset, f)

                for fut in [pool.submit(read_cpu, e) for e in extents]:
                    fut.result()
            else:
                n_slots = max(1, min(_IN_FLIGHT, len(extents)))
                slots = [torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=dev.type == "cuda") for _ in range(n_slots)]
                views = [memoryview(s.numpy()) for s in slots]
                events: list[Any] = [None] * len(slots)

                def read_dev(ext, s):
                    if events[s] is not None:
                        events[s].synchronize()
                    f, start, n, _ = ext
                    _pread_into(fds[f], views[s][:n], start, f)

                pending: deque = deque()

                def drain():
                    i, ext, fut = pending.popleft()
                    fut.result()
                    s = i % len(slots)
                    for p in ext[3]:
                        a = p.offset - ext[1]
                        dst[p.name][p.dst_offset : p.dst_offset + p.nbytes].copy_(slots[s][a : a + p.nbytes],
                                                                                  non_blocking=True)
                    if dev.type == "cuda":
                        events[s] = torch.cuda.Event()
                        events[s].record()
                    elif dev.type != "cpu":  # other accelerators: wait for the copies before the buffer is refilled
                        torch.accelerator.synchronize()

                for i, ext in enumerate(extents):
                    if len(pending) == len(slots):
                        drain()
                    pending.append((i, ext, pool.submit(read_dev, ext, i % len(slots))))
                while pending:
                    drain()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def load_trimmed(
    path: str | os.PathLike, device: str = "auto", dtype: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer or None) of a checkpoint written by `moesift.trim`, uniform or not (also any
    standard checkpoint). The model carries `moesift_resident` {layer: original ids} when known. Tensors
    are read in large sequential reads straight into tensors on `device` (see `read_tensors`)."""
    device = resolve_device(device)
    from transformers import AutoTokenizer, GenerationConfig

    d = resolve_model_dir(path)
    cfg = load_config_dict(d)
    files = shard_files(d)
    record = read_trimmed_record(d)
    tensors = []
    for f in files:
        header, hsize = read_header(d / f)
        for name, info in header.items():
            if name != "__metadata__":
                s0, e0 = info["data_offsets"]
                tensors.append((name, info["dtype"], list(info["shape"]), [(f, hsize + s0, e0 - s0)]))
    if cfg.get("model_type") == NONSTANDARD_MODEL_TYPE:
        inner = cfg.get("moesift") or {}
        try:
            src_cfg = inner["source_config"]
            resident = {int(k): v for k, v in inner["resident"].items()}
        except (KeyError, AttributeError):
            raise MoesiftError(f"{str(d / 'config.json')!r} is a damaged moesift-trimmed config (no resident map)") from None
        cls, base_cfg = variable_expert_class(src_cfg, resident)
    else:
        base_cfg = config_obj(cfg)
        cls = model_class(base_cfg)
        resident = {int(k): v for k, v in (record or {}).get("id_map", {}).items()}
    dev = _read_device(device)
    state = read_tensors(d, tensors, dev)
    try:
        model = cls.from_pretrained(None, config=base_cfg, state_dict=state, **_load_kwargs(device, dtype, dev))
    except ValueError as e:
        raise MoesiftError(f"cannot load {str(d)!r}: {str(e).splitlines()[0]}") from None
    del state
    with contextlib.suppress(Exception):  # generation defaults (end-of-sequence ids) of the checkpoint
        model.generation_config = GenerationConfig.from_pretrained(d)
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still usable from token ids
        tok = None
    return _finish(_to(model, device), resident), tok


def load_resident(
    model: str | os.PathLike, plan: Any, device: str = "auto", dtype: str | None = None, force_plan: bool = False
) -> Any:
    """Load `model` with only `plan`'s resident experts in memory (router rows and selection biases sliced
    with them), read from the full checkpoint's byte ranges of those experts alone, in large sequential
    reads straight into tensors on `device` (see `read_tensors`); nothing is written. Routing is thereby
    restricted to the resident experts; the result computes what `restrict(full_model, plan)` computes.
    A plan made for another config of the family is refused unless `force_plan`."""
    device = resolve_device(device)
    import torch

    idx = CheckpointIndex.build(model)
    spec, ad = idx.spec, idx.adapter
    resident = as_plan(plan).resolve(spec, idx.config, str(model), force_plan)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    problems = []
    for layer, ids in full.items():
        problems += ad.plan_problems(spec, {layer: ids}, standard=True)
    if problems:
        raise MoesiftError("cannot load this plan: " + "; ".join(problems[:4]))
    layout = plan_layout(idx, resident)
    dev = _read_device(device)
    state = read_tensors(idx.directory, [(t.name, t.dtype, t.shape, [(t.src_file, o, n) for o, n in t.ranges])
                                         for t in layout if t.slice_keep is None], dev)
    for t in layout:
        if t.slice_keep is not None:  # the adapter slices this tensor: read whole, sliced, then moved
            tdt = getattr(torch, TORCH_DTYPES.get(t.dtype, ""), None)
            if tdt is None:
                raise MoesiftError(f"tensor {t.src_name} has dtype {t.dtype}, which torch cannot hold")
            raw = bytearray(sliced_bytes(idx.directory, t, ad, idx.config))
            state[t.name] = torch.frombuffer(raw, dtype=tdt).reshape(t.shape).to(dev)
    cls, base_cfg = variable_expert_class(idx.config, full)
    m = cls.from_pretrained(None, config=base_cfg, state_dict=state, **_load_kwargs(device, dtype, dev))
    del state
    return _finish(_to(m, device), full)


def _read_device(device: str | None) -> str:
    """Where the reader puts tensors: the target device, or the host for "spread" (accelerate places them).
    An unusable device is one error line before anything is read."""

    check_device(device)
    return "cpu" if device == "spread" else resolve_device(device)
