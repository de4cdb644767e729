"""Write a smaller checkpoint that holds only a plan's resident experts.

Streaming, tensor by tensor, from the source safetensors: the output layout (names, shapes, byte ranges,
shard of every tensor) is computed from the source headers before any data moves, each output shard's
header is written first and the data follows. Each source shard gives one output shard (packed to the
maximum shard size instead when one is larger), its header padded so that kept bytes keep their offset
within a page: the kernel copies such ranges page by page. Tensors without an expert dimension are copied
byte for byte; per-expert tensors of resident experts are copied and renamed to 0..n-1 in original-id order;
tensors with an expert dimension (router rows, selection biases, fused experts and their quantized
companions) keep the resident rows: when the expert dimension is the outermost non-trivial one the rows
are contiguous byte ranges and are copied as bytes; otherwise the one tensor is read and sliced by the
adapter. At most one tensor (and a small copy buffer) is in memory.

Uniform plans give a standard checkpoint (config rewritten by the adapter, loads with `from_pretrained`).
Non-uniform plans give a checkpoint whose config.json has ``model_type`` "moesift_trimmed" and keeps
the real config under the key ``moesift``: transformers, vLLM and SGLang do not know that model type and
refuse the checkpoint (a stock loader would otherwise build every layer with the largest expert count and
fill the missing experts with random weights); `moesift.load_trimmed` reads it.

Everything is written to a hidden temporary directory beside the destination and renamed into place when
complete, so an interrupted trim leaves no directory that looks like a finished checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError
from ..core.io import (
    OutputDir,
    check_output_path,
    file_checksum,
    sha256_file,
    write_failed,
)
from ..core.progress import progress_bar
from ..core.version import __version__
from ..formats.checkpoint import CheckpointIndex, allowed_roots
from ..formats.gguf import is_gguf, read_gguf_record
from ..formats.plan import as_plan, parse_bytes
from ..formats.trimmed import (
    FORMAT,
    INDEX_FILE,
    NONSTANDARD_MODEL_TYPE,
    PLAN_FILE,
    OutTensor,
    drops_mtp,
    mlx_layout,
    plan_layout,
    read_trimmed_record,
    sliced_bytes,
    stored_output,
)
from .trim_gguf import checksum_or_none, trim_gguf
from .writer import FileJobs, RangeWriter, files_at_once

DEFAULT_SHARD_SIZE = 5 * 1000**3
# files of the source directory that are not copied: weights (rewritten), config (rewritten), pickles
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {"config.json", INDEX_FILE, PLAN_FILE, "pytorch_model.bin.index.json"}
_MAX_COPIED_FILE = 256 << 20
_PAGE = 4096  # kept bytes land at their source offset within a page of this size


def _shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Output shards: one per source shard (the tensors it keeps, in source order) when each fits in
    `max_shard_size`, so that kept bytes keep their offset within a page (`_header_bytes` pads the header to
    match) and the kernel copies them page for page; else tensors packed in order up to `max_shard_size`."""
    by_file: dict[str, list[OutTensor]] = {}
    for t in tensors:
        by_file.setdefault(t.src_file, []).append(t)
    groups = list(by_file.values())
    if all(sum(t.nbytes for t in g) <= max_shard_size for g in groups):
        return groups or [[]]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[OutTensor], fmt: str = "pt") -> bytes:
    """The safetensors header of a shard holding `tensors` in order. The JSON is padded with spaces (as the
    format allows) so that the first tensor copied from a source file lands at the same offset within a page
    as it has there, when that takes a padding of a multiple of 8 bytes (the data stays 8-byte aligned)."""
    header: dict[str, Any] = {"__metadata__": {"format": fmt}}
    off = 0
    first: tuple[int, int] | None = None  # (offset in the data, offset in its source file)
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.nbytes]}
        if first is None and t.slice_keep is None and t.ranges:
            first = (off, t.ranges[0][0])
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    if first is not None:
        pad = (first[1] - 8 - len(hb) - first[0]) % _PAGE
        if pad % 8 == 0:
            hb += b" " * pad
    return struct.pack("<Q", len(hb)) + hb


class _Batched:
    """A progress callback called once per `step` bytes instead of once per range (a per-expert checkpoint
    has thousands of ranges; each call into the progress display costs tens of microseconds); the shard
    writers call it from their threads."""

    def __init__(self, advance: Any, step: int = 64 << 20):
        self.advance, self.step, self.n = advance, step, 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.n += n
            if self.n >= self.step:
                self._emit()

    def flush(self) -> None:
        with self.lock:
            self._emit()

    def _emit(self) -> None:  # under the lock
        if self.n:
            self.advance(self.n)
            self.n = 0


def _copy_range(src_fd: int, w: RangeWriter, off: int, n: int, name: str, advance: Any) -> None:
    w.copy(src_fd, off, n, name)
    advance(n)


def _checksum_algorithm(checksums: bool, checksum: str | None) -> str | None:
    """The checksum algorithm a trim records (None: no checksums); an unknown name is refused."""
    return checksum_or_none(checksums, checksum)


def _check_paths(src: Path, out: Path, force: bool) -> None:

    check_output_path(out, force, directory=True, protect=[src])


def _copied_files(src: Path) -> tuple[list[Path], list[str]]:
    """Non-weight files of the source folder that go into the output (tokenizer, generation config, ...),
    and the links that do not: a symbolic link is followed only when it resolves inside the model folder
    (or, in a hub cache snapshot, the same repository's blobs)."""
    roots = allowed_roots(src)
    files, skipped = [], []
    for f in sorted(src.iterdir()):
        if f.name in _SKIP_NAMES or f.name.endswith(_SKIP_SUFFIXES) or f.name.startswith("."):
            continue
        if f.is_symlink():
            target = f.resolve()
            if not any(target == r or r in target.parents for r in roots):
                skipped.append(f.name)
                continue
        if not f.is_file() or f.stat().st_size > _MAX_COPIED_FILE:
            continue
        files.append(f)
    return files, skipped


def _resident_layers(idx: Any, p: Any, model: Any, force_plan: bool) -> tuple[dict, dict[int, list[int]], bool]:
    """(resident map of the plan, resident ids of every MoE layer, whether the trim is standard (uniform));
    a plan the family cannot express is refused."""
    spec, ad = idx.spec, idx.adapter
    resident = p.resolve(spec, idx.config, str(model), force_plan)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    standard = len({len(v) for v in full.values()}) == 1
    problems = ad.plan_problems(spec, full, standard=standard)
    if not standard:  # every layer on its own must still be expressible (group rules)
        for layer, ids in full.items():
            problems += [q for q in ad.plan_problems(spec, {layer: ids}, standard=True) if q not in problems]
    if problems:
        raise MoesiftError(f"cannot trim {str(idx.directory)!r} to this plan: " + "; ".join(problems[:4]))
    return resident, full, standard


def _check_mlx_trim(src: Path, full: dict[int, list[int]], standard: bool, engine_config: bool) -> None:
    """Refuse what an mlx-lm model folder cannot hold: mlx-lm builds every MoE layer with one expert count, and
    its folder already has the config keys and tensors mlx-lm reads."""
    if not standard:
        counts = sorted({len(v) for v in full.values()})
        raise MoesiftError(f"cannot trim the mlx-lm model {str(src)!r} to this plan: it keeps a different number "
                           f"of experts per layer ({', '.join(map(str, counts))}), and mlx-lm builds every MoE "
                           "layer with one expert count; plan with --uniform")
    if engine_config:
        raise MoesiftError(f"{str(src)!r} is an mlx-lm model folder: its config and tensors are already what "
                           "mlx-lm reads; drop --engine-config")


def _new_config(ad: Any, cfg: dict[str, Any], full: dict[int, list[int]], standard: bool,
                drop_mtp: bool = False) -> dict[str, Any]:
    """config.json of the trimmed checkpoint: the family's own (uniform), else the moesift_trimmed wrapper.
    `drop_mtp`: the multi-token-prediction layers are left out, and the config says so."""
    if drop_mtp:
        cfg = ad.without_mtp(dict(cfg))
    if standard:
        return ad.rewrite_config(dict(cfg), full)
    return {
        "model_type": NONSTANDARD_MODEL_TYPE,
        "moesift": {
            "format": FORMAT,
            "note": "experts per MoE layer differ; load with moesift.load_trimmed (stock loaders refuse "
                    "this model_type on purpose rather than fill missing experts with random weights)",
            "experts_per_layer": {str(k): len(v) for k, v in full.items()},
            "resident": {str(k): v for k, v in full.items()},
            "config": ad.rewrite_config(dict(cfg), full),
            "source_config": cfg,
        },
    }


def _write_shards(idx: Any, tmp: Path, names: list[str], shards: list[list[OutTensor]], checksum: str | None,
                  advance: Any, fmt: str = "pt") -> tuple[dict[str, str | None], dict[str, str]]:
    """Write every output shard (header, then its tensors), `files_at_once()` shards at a time, each by its
    own thread; returns (checksum per shard, weight map). The first error stops every writer and is raised."""
    src, ad, cfg = idx.directory, idx.adapter, idx.config
    weight_map = {t.name: fname for fname, tensors in zip(names, shards, strict=True) for t in tensors}
    advance = _Batched(advance)
    files = FileJobs(files_at_once(len(names)))
    sliced = threading.Lock()  # one tensor sliced in memory at a time: memory stays at one tensor
    fds: dict[str, int] = {}

    def write_shard(fname: str, tensors: list[OutTensor]) -> RangeWriter:
        w = files.writer(tmp / fname, checksum=checksum)
        w.write(_header_bytes(tensors, fmt))
        w.expect([(fds[t.src_file], off, k) for t in tensors if t.slice_keep is None for off, k in t.ranges])
        for t in tensors:
            if t.slice_keep is not None:
                with sliced:
                    b = sliced_bytes(src, t, ad, cfg)
                    w.write(b)
                    advance(len(b))
                    del b
                continue
            fd = fds[t.src_file]
            for off, k in t.ranges:
                files.check()
                _copy_range(fd, w, off, k, t.src_file, advance)
        w.finish()
        return w

    try:
        for f in {t.src_file for ts in shards for t in ts if t.slice_keep is None}:
            fds[f] = os.open(src / f, os.O_RDONLY)
        hashes = files.run([(fname, functools.partial(write_shard, fname, tensors))
                            for fname, tensors in zip(names, shards, strict=True)])
        advance.flush()
    finally:
        for fd in fds.values():  # every writer has stopped (`run`)
            os.close(fd)
    return hashes, weight_map


def _copy_files(src: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """Copy the non-weight files of the source (`_copied_files`); (names copied, links skipped)."""
    copied = []
    files, skipped_links = _copied_files(src)
    for f in files:
        shutil.copyfile(f, tmp / f.name)  # contents only: the new file's mode follows the umask
        copied.append(f.name)
    for name in skipped_links:
        sys.stderr.write(f"moesift: not copying {name!r}: it links outside the model folder {str(src)!r}\n")
    return copied, skipped_links


def _record(idx: Any, p: Any, full: dict[int, list[int]], standard: bool, tensor_bytes: int, predicted: int,
            hashes: dict[str, str | None], skipped_links: list[str], checksum: str | None) -> dict[str, Any]:
    """The moesift_plan.json record of the trimmed checkpoint."""
    src = idx.directory
    record = {
        "schema": FORMAT,
        "tool": {"name": "moesift", "version": __version__},
        "source": {
            "path": str(src.resolve()),
            "model_type": idx.spec.model_type,
            "config_sha256": sha256_file(src / "config.json"),
            "shards": sorted({t.file for t in idx.tensors}),
            "tensor_bytes": idx.total_bytes(),
        },
        "standard": standard,
        "experts_per_layer": {str(k): len(v) for k, v in full.items()},
        "id_map": {str(k): v for k, v in full.items()},
        "id_map_note": "per decoder layer: original expert id of each new id (new id = position)",
        "tensor_bytes": tensor_bytes,
        "predicted_bytes": predicted,
        "files": hashes,
        "checksum": checksum,  # the algorithm of "files" (None: not recorded); records without the key: sha256
        "plan": p.to_dict(),
    }
    if mlx_layout(idx):
        record["layout"] = "mlx-lm"
    if skipped_links:
        record["skipped_links"] = skipped_links
    if drops_mtp(idx, full):
        record["dropped_mtp_layers"] = list(idx.adapter.mtp_layers(idx.config))
        record["dropped_mtp_note"] = ("multi-token-prediction layers left out: their experts belong to a router "
                                      "no trace sees; the config says it has none")
    return record


def trim(
    model: str | os.PathLike,
    plan: Any,
    out: str | os.PathLike,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    checksums: bool = True,
    force_plan: bool = False,
    engine_config: bool = False,
    checksum: str = "blake3",
) -> Path:
    """Write the checkpoint of `model` trimmed to `plan`'s resident experts into directory `out`.

    The source is only read. `checksums`: record a checksum of every output file in moesift_plan.json,
    computed alongside the copy with the algorithm `checksum` ("blake3", "sha256"; "none" is the same as
    `checksums=False`), which the record names; `moesift verify --files` re-computes them. A plan made for
    another config of the family (its `config_hash`) is refused unless `force_plan`. `engine_config`: write
    the config keys serving engines read (the family's hub key names, a top-level rope_theta) and store the
    output projection of a tied model as its own tensor, so that a model saved by transformers 5 loads in
    mlx-lm and llama.cpp as it is. A GGUF file (`MODEL.gguf`, or the first split of a split model) is trimmed
    to the GGUF file `out` (`moesift.apply.trim_gguf`). Returns `out`."""
    if is_gguf(model):
        if engine_config:
            raise MoesiftError(f"{str(model)!r} is a GGUF file: its metadata is already what llama.cpp reads; drop "
                               "--engine-config")
        return trim_gguf(model, plan, out, force=force, progress=progress,
                         checksum=checksum_or_none(checksums, checksum), force_plan=force_plan)
    out = Path(out)
    algorithm = _checksum_algorithm(checksums, checksum)
    idx = CheckpointIndex.build(model)
    idx.check_consistent()
    src = idx.directory
    _check_paths(src, out, force)
    p = as_plan(plan)
    resident, full, standard = _resident_layers(idx, p, model, force_plan)
    mlx = mlx_layout(idx)
    if mlx:
        _check_mlx_trim(src, full, standard, engine_config)
    layout = plan_layout(idx, resident)
    predicted = idx.predicted_bytes(resident)
    extra = stored_output(idx) if engine_config else None
    if extra is not None:
        layout.append(extra)
        predicted += extra.nbytes
    written_tensor_bytes = sum(t.nbytes for t in layout)
    if written_tensor_bytes != predicted:
        raise MoesiftError(
            f"internal check failed: layout has {written_tensor_bytes} tensor bytes, the plan predicts {predicted}"
        )
    shard_bytes = parse_bytes(max_shard_size)
    if shard_bytes < 1:
        raise MoesiftError(f"--max-shard-size must be a positive size such as 5GB (got {max_shard_size!r})")
    shards = _shards(layout, shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    new_cfg = _new_config(idx.adapter, idx.config, full, standard, drops_mtp(idx, full))
    if engine_config and standard:
        new_cfg = idx.adapter.engine_config(new_cfg) if extra is not None else idx.adapter.hub_config(new_cfg)

    dest = OutputDir(out, force, protect=[src])
    tmp = dest.begin()
    with progress_bar(progress, transfer=True, remaining=True) as bar:
        task = bar.add_task("trimming", total=written_tensor_bytes)
        try:
            hashes, weight_map = _write_shards(idx, tmp, names, shards, algorithm, lambda k: bar.advance(task, k),
                                               "mlx" if mlx else "pt")
            index_obj = {"metadata": {"total_size": written_tensor_bytes, "format": "pt"}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index_obj, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
            copied, skipped_links = _copy_files(src, tmp)
            for extra in [INDEX_FILE, "config.json", *copied]:
                hashes[extra] = file_checksum(tmp / extra, algorithm) if algorithm else None
            record = _record(idx, p, full, standard, written_tensor_bytes, predicted, hashes, skipped_links,
                             algorithm)
            (tmp / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            dest.commit()
        except OSError as e:
            raise write_failed(out, e) from None
        finally:
            dest.abort()
    return out


def trim_summary(out: str | os.PathLike) -> dict[str, Any]:
    """What `moesift trim` reports of the checkpoint it wrote to `out` (from its moesift_plan.json)."""
    rec = (read_gguf_record(out) if is_gguf(out) else read_trimmed_record(out)) or {}
    return {"out": str(out), "standard": rec.get("standard"), "tensor_bytes": rec.get("tensor_bytes"),
            "predicted_bytes": rec.get("predicted_bytes"),
            "source_tensor_bytes": rec.get("source", {}).get("tensor_bytes"),
            "experts_per_layer": rec.get("experts_per_layer"), "files": rec.get("files"),
            "dropped_mtp_layers": rec.get("dropped_mtp_layers")}


def format_trim(summary: dict[str, Any]) -> str:
    """The line `moesift trim` prints for a `trim_summary`."""
    kind = "GGUF model" if is_gguf(summary["out"]) else "standard checkpoint" if summary["standard"] else "non-uniform checkpoint (load with moesift.load_trimmed)"
    line = (f"wrote {summary['out']}: {kind}, {summary['tensor_bytes']:,} tensor bytes "
            f"({summary['tensor_bytes'] / max(summary['source_tensor_bytes'] or 1, 1):.1%} of the source)")
    if summary.get("dropped_mtp_layers"):
        line += (f"; left out the multi-token-prediction layers {summary['dropped_mtp_layers']} (their experts "
                 "belong to a router no trace sees) and set their count in config.json to 0")
    return line
