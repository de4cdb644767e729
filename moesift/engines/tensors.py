"""Reading safetensors tensors, whole or in byte ranges, straight into preallocated torch tensors.

`read_tensors` is the one reader of checkpoint data into models: large sequential reads per file, several
in flight, landing in place on the CPU or through a few pinned staging buffers on an accelerator.
`read_layout` reads the tensors of a checkpoint layout (`formats.trimmed.plan_layout`) with it, and the
tensors the adapter must slice (read whole, sliced, then moved); given the model that will hold them, in
that model's own layout (`moesift.engines.assemble`)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError
from ..core.io import pread_into
from ..formats.trimmed import OutTensor, sliced_bytes
from .assemble import TensorSpec, model_sources
from .hf import TORCH_DTYPES

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
        k = pread_into(fd, mv[got:], offset + got)
        if k <= 0:
            raise MoesiftError(f"{path!r} ended early; the checkpoint is damaged")
        got += k


def torch_dtype(dtype: str, name: str) -> Any:
    """The torch dtype of a safetensors dtype name; one error naming tensor `name` when torch has none."""
    import torch

    tdt = TORCH_DTYPES.get(dtype)
    if tdt is None or not hasattr(torch, tdt):
        raise MoesiftError(f"tensor {name} has dtype {dtype}, which torch cannot hold")
    return getattr(torch, tdt)


def _allocate(tensors: Sequence[TensorSpec], dev: Any) -> tuple[dict[str, Any], dict[str, Any], list[_Piece]]:
    """(byte buffers, typed views of them, pieces to read) of `tensors` on `dev`."""
    import torch

    dst: dict[str, Any] = {}
    out: dict[str, Any] = {}
    pieces: list[_Piece] = []
    for name, dt, shape, parts in tensors:
        tdt = torch_dtype(dt, name)
        nbytes = sum(n for _, _, n in parts)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst[name] = buf
        o = 0
        for f, off, n in parts:
            if n:
                pieces.append(_Piece(name, f, off, n, o))
            o += n
        out[name] = buf.view(tdt).reshape(shape) if nbytes else torch.empty(shape, dtype=tdt, device=dev)
    return dst, out, pieces


def _read_in_place(pool: Any, fds: dict[str, int], dst: dict[str, Any], extents: list, advance: Callable) -> None:
    """CPU: every piece read straight into its destination tensor; gaps between pieces are skipped."""
    host = {k: memoryview(v.numpy()) for k, v in dst.items()}

    def read_cpu(ext):
        f = ext[0]
        for p in ext[3]:
            _pread_into(fds[f], host[p.name][p.dst_offset : p.dst_offset + p.nbytes], p.offset, f)

    for e, fut in [(e, pool.submit(read_cpu, e)) for e in extents]:
        fut.result()
        advance(sum(p.nbytes for p in e[3]))


def _read_staged(pool: Any, fds: dict[str, int], dst: dict[str, Any], extents: list, dev: Any,
                 advance: Callable) -> None:
    """Accelerator: each read lands in one of a few (pinned on CUDA) staging buffers and is copied to the
    device asynchronously; a buffer is refilled once its copies are done."""
    import torch

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
            dst[p.name][p.dst_offset : p.dst_offset + p.nbytes].copy_(slots[s][a : a + p.nbytes], non_blocking=True)
        if dev.type == "cuda":
            events[s] = torch.cuda.Event()
            events[s].record()
        elif dev.type != "cpu":  # other accelerators: wait for the copies before the buffer is refilled
            torch.accelerator.synchronize()
        advance(sum(p.nbytes for p in ext[3]))

    for i, ext in enumerate(extents):
        if len(pending) == len(slots):
            drain()
        pending.append((i, ext, pool.submit(read_dev, ext, i % len(slots))))
    while pending:
        drain()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def read_tensors(directory: Path, tensors: Sequence[TensorSpec], device: Any, staged: bool | None = None,
                 advance: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Tensors read from safetensors shards straight into preallocated tensors on `device`.

    `tensors`: (name, safetensors dtype, shape, [(file, absolute offset, bytes)]) with the pieces in order.
    Reads are large (`_CHUNK`) and sequential per file, several in flight on a thread pool. On the CPU
    they land in the destination tensors directly (scatter reads, no copy); on an accelerator each read
    lands in one of a few pinned staging buffers and is copied to the device asynchronously, the buffer
    being reused once its copies are done (`staged` forces either way). No other copy of the data is made.
    `advance(n)` is called with the tensor bytes of every read once it is done (a progress display)."""
    import torch

    dev = torch.device(device)
    step = advance or (lambda n: None)
    dst, out, pieces = _allocate(tensors, dev)
    extents = _extents(pieces)
    fds = {f: os.open(Path(directory) / f, os.O_RDONLY) for f in {e[0] for e in extents}}
    try:
        for fd in fds.values():
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with cf.ThreadPoolExecutor(_IN_FLIGHT) as pool:
            if not (dev.type != "cpu" if staged is None else staged):
                _read_in_place(pool, fds, dst, extents, step)
            else:
                _read_staged(pool, fds, dst, extents, dev, step)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def layout_sources(index: Any, layout: Sequence[OutTensor],
                   advance: Callable[[int], Any] | None = None) -> tuple[list[TensorSpec], dict[str, Any]]:
    """(specs of the byte ranges of the layout tensors of checkpoint `index` (a `CheckpointIndex`), the
    tensors the adapter slices: read whole, sliced, on the host)."""
    import torch

    for t in layout:
        torch_dtype(t.dtype, t.src_name)
    specs = [(t.name, t.dtype, t.shape, [(t.src_file, o, n) for o, n in t.ranges]) for t in layout
             if t.slice_keep is None]
    ready: dict[str, Any] = {}
    for t in layout:
        if t.slice_keep is not None:
            raw = bytearray(sliced_bytes(index.directory, t, index.adapter, index.config))
            x = torch.frombuffer(raw, dtype=torch_dtype(t.dtype, t.src_name)) if raw else \
                torch.empty(0, dtype=torch_dtype(t.dtype, t.src_name))
            ready[t.name] = x.reshape(t.shape)
            if advance is not None:
                advance(t.nbytes)
    return specs, ready


def read_sources(directory: Path, specs: Sequence[TensorSpec], ready: dict[str, Any], device: Any,
                 model: Any = None, advance: Callable[[int], Any] | None = None,
                 before: dict[str, Any] | None = None) -> dict[str, Any]:
    """{name: tensor on `device`}: tensors in memory `before` (moved to `device`), `specs` read with
    `read_tensors`, then `ready` (host tensors) moved there, in that order. With `model` (a meta model of
    the class that will hold them, `assemble.meta_model`) the tensors come in that model's own layout and
    names where `assemble.model_sources` can arrange them, else as they are."""
    before = before or {}
    if model is not None:
        arranged = model_sources(model, specs, ready, before)
        if arranged is not None:
            specs, ready, before = arranged
    state = {name: x.to(device) for name, x in before.items()}
    state.update(read_tensors(directory, specs, device, advance=advance))
    for name, x in ready.items():
        state[name] = x.to(device)
    return state


def read_layout(index: Any, layout: Sequence[OutTensor], device: Any,
                advance: Callable[[int], Any] | None = None, model: Any = None) -> dict[str, Any]:
    """{name: tensor on `device`} of the layout tensors of checkpoint `index` (a `CheckpointIndex`): byte
    ranges through `read_tensors`; a tensor the adapter slices is read whole, sliced, then moved. With
    `model`, in that model's layout (see `read_sources`)."""
    specs, ready = layout_sources(index, layout, advance)
    return read_sources(index.directory, specs, ready, device, model, advance)
