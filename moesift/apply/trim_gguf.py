"""Trim a llama.cpp GGUF model (one file or a split model) to a plan's resident experts.

The output is the source with every tensor that has an expert dimension cut to the resident experts (in a
GGUF file that dimension is the outermost, so each expert is one contiguous byte range, quantized or not),
`{arch}.expert_count` rewritten (and the group counts of a group-limited router), and every other metadata
entry and tensor byte for byte the same. Tensors are copied by the kernel range by range; no tensor is held
in memory. A split model gives a split model with the same tensors in each split.

Each output file is written under a temporary name and renamed when complete; its checksum and the plan go
into a record beside the first output file (`NAME.gguf.moesift.json`), which `moesift verify --files`
re-checks."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import gguf as names
from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.io import CHECKSUMS, atomic_path, check_output_path
from ..core.progress import progress_bar
from ..core.version import __version__
from ..formats.gguf import (
    INTEGERS,
    MAGIC,
    SCALARS,
    SPLIT_TENSORS,
    GGUFFile,
    GGUFIndex,
    read_gguf,
    record_path,
    split_name,
)
from ..formats.gguf_identity import gguf_index_for, plan_differences  # noqa: F401 - re-exported
from ..formats.plan import as_plan
from ..formats.trimmed import FORMAT
from .writer import FileJobs, RangeWriter, files_at_once


@dataclass
class _Out:
    """One output tensor: its info and the source byte ranges its data is made of."""

    name: str
    ggml_type: int
    shape: list[int]
    nbytes: int
    ranges: list[tuple[int, int]] = field(default_factory=list)


def gguf_resident(idx: GGUFIndex, plan: Any, force_plan: bool = False) -> tuple[Any, dict[int, list[int]]]:
    """(the plan, {block: resident ids} for every MoE block) of `plan` applied to the GGUF model `idx`; a plan
    for another model, a plan with different counts per layer and one the router cannot serve are refused."""
    p = as_plan(plan)
    shown = str(idx.directory)
    where = f"plan {p.source!r}" if p.source else "the plan"
    spec = gguf_index_for(idx, p.model, where, force_plan).spec
    resident = p.resolve(spec)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    counts = sorted({len(v) for v in full.values()})
    if len(counts) > 1:
        raise MoesiftError(f"cannot trim {shown!r} to {where}: it keeps a different number of experts per layer "
                           f"({', '.join(map(str, counts))}), and a GGUF file has one expert count; plan with --uniform")
    problems = adapter_for({"model_type": spec.model_type}).plan_problems(spec, full, standard=True)
    if problems:
        raise MoesiftError(f"cannot trim {shown!r} to {where}: " + "; ".join(problems[:4]))
    return p, full


def new_metadata(idx: GGUFIndex, full: dict[int, list[int]]) -> dict[str, Any]:
    """{metadata key: new value} of the trimmed model: the expert count, the group counts of a group-limited
    router, and (when multi-token-prediction blocks are left out) the block count."""
    n = len(next(iter(full.values())))
    out: dict[str, Any] = {idx.key(names.EXPERT_COUNT): n}
    if idx.spec.n_group:
        g, top = names.groups_after(idx.spec.n_experts, idx.spec.n_group, idx.spec.topk_group,
                                    max(full.values(), key=len))
        out[idx.key(names.EXPERT_GROUP_COUNT)] = g
        if idx.key(names.EXPERT_GROUP_USED_COUNT) in idx.metadata:
            out[idx.key(names.EXPERT_GROUP_USED_COUNT)] = top
    nextn = idx.nextn_blocks()
    if nextn and n < idx.spec.n_experts:
        out[idx.key(names.BLOCK_COUNT)] = int(idx.meta(names.BLOCK_COUNT)) - len(nextn)
        out[idx.key(names.NEXTN_PREDICT_LAYERS)] = 0
    return out


def _layout(idx: GGUFIndex, f: GGUFFile, full: dict[int, list[int]], drop: set[int]) -> list[_Out]:
    E = idx.spec.n_experts
    out = []
    for t in f.tensors:
        if names.block_of(t.name) in drop:
            continue
        keep = full.get(t.layer) if t.layer is not None else None
        if keep is None or len(keep) == E:
            out.append(_Out(t.name, t.ggml_type, list(t.shape), t.nbytes, [(t.offset, t.nbytes)]))
            continue
        row = t.nbytes // E
        ranges: list[tuple[int, int]] = []
        for e in keep:  # neighbouring resident experts are one range
            if ranges and ranges[-1][0] + ranges[-1][1] == t.offset + e * row:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + row)
            else:
                ranges.append((t.offset + e * row, row))
        out.append(_Out(t.name, t.ggml_type, [*t.shape[:-1], len(keep)], row * len(keep), ranges))
    return out


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _header(f: GGUFFile, tensors: list[_Out], rewrites: dict[str, Any]) -> bytes:
    """Magic, version, counts, the metadata (source bytes but for the rewritten values) and the tensor infos,
    padded to the alignment."""
    with open(f.path, "rb") as src:
        src.seek(f.kv_start)
        raw = src.read(f.kv_end - f.kv_start)
    kv = bytearray()
    for k, e in f.kv.items():
        if k in rewrites:
            if e.vtype not in INTEGERS:
                raise MoesiftError(f"{str(f.path)!r}: metadata {k!r} is not stored as an integer; the file is damaged")
            kv += _string(k) + struct.pack("<I", e.vtype) + struct.pack(SCALARS[e.vtype], rewrites[k])
        else:
            kv += raw[e.start - f.kv_start:e.end - f.kv_start]
    ti = bytearray()
    off = 0
    for t in tensors:
        ti += _string(t.name) + struct.pack("<I", len(t.shape)) + struct.pack(f"<{len(t.shape)}Q", *t.shape)
        ti += struct.pack("<IQ", t.ggml_type, off)
        off += t.nbytes + (-t.nbytes) % f.alignment
    head = MAGIC + struct.pack("<IQQ", f.version, len(tensors), len(f.kv)) + bytes(kv) + bytes(ti)
    return head + b"\0" * ((-len(head)) % f.alignment)


def _write_file(files: FileJobs, path: Path, f: GGUFFile, src: int, header: bytes, tensors: list[_Out],
                advance: Any, checksum: str | None) -> RangeWriter:
    """Write the output file `path` (an empty file claimed for it) from the source `f` (open as `src`); returns
    the writer, finished, its checksum computing."""
    w = files.writer(path, checksum=checksum, existing=True, source="GGUF file")
    w.write(header)
    w.expect([(src, off, n) for t in tensors for off, n in t.ranges])
    for t in tensors:
        for off, n in t.ranges:
            files.check()
            w.copy(src, off, n, str(f.path))
            advance(n)
        pad = (-t.nbytes) % f.alignment
        if pad:
            w.write(b"\0" * pad)
    w.finish()
    return w


def output_paths(idx: GGUFIndex, out: Path) -> list[Path]:
    """The output files: `out`, or for a split model its splits named after `out`."""
    if not out.name.lower().endswith(".gguf"):
        raise MoesiftError(f"--out {str(out)!r}: a GGUF model is trimmed to a GGUF file; name it NAME.gguf")
    n = len(idx.files)
    paths = [split_name(out, i + 1, n) for i in range(n)]
    if n > 1 and paths[0].name != out.name and split_name(out, 1, 1).name != out.name:
        raise MoesiftError(f"--out {str(out)!r} names another split count than the {n} splits of the source; "
                           f"name it NAME.gguf or {paths[0].name}")
    return paths


def trim_gguf(model: str | os.PathLike, plan: Any, out: str | os.PathLike, force: bool = False,
              progress: bool = True, checksum: str | None = "blake3", force_plan: bool = False) -> Path:
    """Write the GGUF model `model` trimmed to `plan` to `out` (a .gguf file; a split model gives the same
    splits). `checksum`: "blake3", "sha256" or None, recorded with the plan in `OUT.moesift.json`. Returns the
    first output file."""
    idx = read_gguf(model)
    p, full = gguf_resident(idx, plan, force_plan)
    outs = output_paths(idx, Path(out))
    record_file = record_path(outs[0])
    inputs = [f.path for f in idx.files]
    for o in [*outs, record_file]:
        check_output_path(o, force, inputs=inputs)
    rewrites = new_metadata(idx, full)
    drop = set(idx.nextn_blocks()) if idx.key(names.NEXTN_PREDICT_LAYERS) in rewrites else set()
    layouts = [_layout(idx, f, full, drop) for f in idx.files]
    total = sum(len(ts) for ts in layouts)
    written = sum(t.nbytes for ts in layouts for t in ts)
    predicted = idx.predicted_bytes(full)
    if written != predicted:
        raise MoesiftError(f"internal check failed: the layout has {written} tensor bytes, the plan predicts {predicted}")
    with contextlib.ExitStack() as stack, progress_bar(progress, transfer=True, remaining=True) as bar:
        task = bar.add_task("trimming", total=written)
        rec_tmp = stack.enter_context(atomic_path(record_file, force, inputs=inputs))  # renamed last
        files = FileJobs(files_at_once(len(outs)))  # the splits of a split model are written at once
        jobs, srcs = [], []
        try:
            for f, o, ts in zip(idx.files, outs, layouts, strict=True):
                tmp = stack.enter_context(atomic_path(o, force, inputs=inputs))
                rw = dict(rewrites) if f is idx.files[0] else {k: v for k, v in rewrites.items() if k in f.kv}
                if SPLIT_TENSORS in f.kv and drop:
                    rw[SPLIT_TENSORS] = total
                srcs.append(os.open(f.path, os.O_RDONLY))
                jobs.append((o.name, functools.partial(_write_file, files, tmp, f, srcs[-1], _header(f, ts, rw), ts,
                                                       lambda k: bar.advance(task, k), checksum)))
            hashes = files.run(jobs)
        finally:
            for fd in srcs:  # every writer has stopped (`run`)
                os.close(fd)
        rec = _record(idx, p, full, rewrites, drop, written, predicted, hashes, checksum, outs)
        rec_tmp.write_text(json.dumps(rec, indent=2) + "\n")
    return outs[0]


def _record(idx: GGUFIndex, p: Any, full: dict[int, list[int]], rewrites: dict[str, Any], drop: set[int],
            written: int, predicted: int, hashes: dict[str, str | None], checksum: str | None,
            outs: list[Path]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "schema": FORMAT,
        "tool": {"name": "moesift", "version": __version__},
        "layout": "gguf",
        "source": {"path": str(idx.directory.resolve()), "files": [f.path.name for f in idx.files],
                   "arch": idx.arch, "model_type": idx.spec.model_type, "tensor_bytes": idx.total_bytes(),
                   "file_bytes": sum(f.size for f in idx.files)},
        "standard": True,
        "experts_per_layer": {str(k): len(v) for k, v in full.items()},
        "id_map": {str(k): v for k, v in full.items()},
        "id_map_note": "per block: original expert id of each new id (new id = position)",
        "metadata": {k: [idx.metadata.get(k), v] for k, v in rewrites.items()},
        "tensor_bytes": written,
        "predicted_bytes": predicted,
        "files": hashes,
        "checksum": checksum,
        "plan": p.to_dict(),
    }
    if drop:
        rec["dropped_mtp_layers"] = sorted(drop)
    return rec


def checksum_or_none(checksums: bool, checksum: str | None) -> str | None:
    """The checksum algorithm a trim records (None: no checksums); an unknown name is refused."""
    if not checksums or checksum in (None, "none"):
        return None
    if checksum not in CHECKSUMS:
        raise MoesiftError(f"unknown checksum {checksum!r}: use {', '.join(CHECKSUMS)} or none")
    return checksum
