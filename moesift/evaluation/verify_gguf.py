"""Prove a trimmed GGUF model, on the user's own files and without running an engine, link by link:

- **trim**: every tensor of the trim is the base tensor's bytes (for tensors with an expert dimension, the
  byte ranges of the resident experts in plan order), every metadata entry is the base's encoded bytes but
  the expert counts, which hold what the plan gives; nothing is added or missing.
- **blocks**: for each ggml type of the expert tensors, slicing commutes with the type's blocks: the
  dequantized byte range of an expert is that expert's rows of the dequantized tensor, and (for the types
  gguf-py can quantize) quantizing the resident experts' weights gives the bytes of slicing the quantized
  tensor. Checked with gguf-py on the smallest expert tensor of each type.
- **convert** (with the transformers checkpoint `hf_model` and llama.cpp's converter, `MOESIFT_LLAMA_CPP`):
  trimming the GGUF conversion of the checkpoint gives the tensors and metadata of converting the trimmed
  checkpoint (F32, F16, BF16 conversions).

Together: the trimmed GGUF file is what llama.cpp would compute with the base model's routing restricted to
the resident experts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..apply.trim import trim
from ..apply.trim_gguf import gguf_resident, new_metadata, trim_gguf
from ..arch import gguf as names
from ..core.errors import MoesiftError
from ..core.progress import progress_bar
from ..engines import llamacpp
from ..formats.gguf import (
    SPLIT_TENSORS,
    GGUFIndex,
    GGUFTensor,
    read_gguf,
    read_gguf_record,
)
from ..formats.plan import Plan

_CHUNK = 8 << 20
_SAMPLE_BYTES = 64 << 20  # at most this much of one tensor is dequantized for the blocks link
# metadata the converter derives from the checkpoint's folder name and parameter count
# general.file_type (llama_ftype) of the files llama.cpp's converter writes -> its --outtype
_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}
NAMING_KEYS = ("general.name", "general.basename", "general.size_label", "general.finetune")


def _plan(trimmed: Any, plan: Any) -> Any:
    if plan is not None:
        return plan
    rec = read_gguf_record(trimmed)
    if rec is None:
        raise MoesiftError(f"{str(trimmed)!r} has no record of its trim (NAME.gguf.moesift.json); pass --plan PLAN")
    return Plan.from_dict(rec["plan"], source=str(trimmed) + " (record)")


def _same_bytes(a: GGUFTensor, a_off: int, b: GGUFTensor, b_off: int, n: int, fds: dict[Path, int]) -> bool:
    for f in (a.file, b.file):
        if f not in fds:
            fds[f] = os.open(f, os.O_RDONLY)
    fa, fb = fds[a.file], fds[b.file]
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        if os.pread(fa, k, a_off + done) != os.pread(fb, k, b_off + done):
            return False
        done += k
    return True


def _kv_bytes(f: Any) -> dict[str, bytes]:
    with open(f.path, "rb") as src:
        src.seek(f.kv_start)
        raw = src.read(f.kv_end - f.kv_start)
    return {k: raw[e.start - f.kv_start:e.end - f.kv_start] for k, e in f.kv.items()}


def _metadata_problems(base: GGUFIndex, small: GGUFIndex, expect: dict[str, Any], drop: bool) -> list[str]:
    problems = []
    if len(base.files) != len(small.files):
        return [f"{len(small.files)} files, the base has {len(base.files)}"]
    for fb, ft in zip(base.files, small.files, strict=True):
        kb, kt = _kv_bytes(fb), _kv_bytes(ft)
        if list(kb) != list(kt):
            problems.append(f"{ft.path.name}: metadata keys differ ({sorted(set(kb) ^ set(kt))[:4]})")
            continue
        for k in kb:
            if k in expect or (k == SPLIT_TENSORS and drop):
                want = expect.get(k)
                got = ft.kv[k].value
                if want is not None and got != want:
                    problems.append(f"{k}: {got}, the plan gives {want}")
            elif kb[k] != kt[k]:
                problems.append(f"{ft.path.name}: metadata {k!r} differs from the base")
    return problems


def link_trim(base: GGUFIndex, small: GGUFIndex, full: dict[int, list[int]], progress: bool = True) -> dict[str, Any]:
    """The trim link: tensors and metadata of `small` against `base` trimmed to `full`."""
    expect = new_metadata(base, full)
    drop = set(base.nextn_blocks()) if base.key(names.NEXTN_PREDICT_LAYERS) in expect else set()
    E = base.spec.n_experts
    problems = _metadata_problems(base, small, expect, bool(drop))
    tb = {t.name: t for t in base.tensors if names.block_of(t.name) not in drop}
    ts = {t.name: t for t in small.tensors}
    if set(tb) != set(ts):
        problems.append(f"tensors differ: {sorted(set(tb) ^ set(ts))[:4]}")
    sliced = same = 0
    fds: dict[Path, int] = {}
    try:
        with progress_bar(progress, transfer=True) as bar:
            task = bar.add_task("comparing", total=sum(t.nbytes for t in ts.values()))
            for name in sorted(set(tb) & set(ts)):
                a, b = tb[name], ts[name]
                keep = full.get(a.layer) if a.layer is not None else None
                cut = keep is not None and len(keep) < E
                want_shape = (*a.shape[:-1], len(keep)) if cut else a.shape
                if a.ggml_type != b.ggml_type or tuple(b.shape) != tuple(want_shape):
                    problems.append(f"tensor {name!r}: {b.dtype} {list(b.shape)}, expected {a.dtype} {list(want_shape)}")
                    continue
                if cut:
                    row = a.nbytes // E
                    ok = all(_same_bytes(a, a.offset + e * row, b, b.offset + i * row, row, fds)
                             for i, e in enumerate(keep))
                    sliced += 1
                else:
                    ok = _same_bytes(a, a.offset, b, b.offset, a.nbytes, fds)
                    same += 1
                if not ok:
                    problems.append(f"tensor {name!r}: bytes differ from the base"
                                    + (" (resident experts' ranges)" if cut else ""))
                bar.advance(task, b.nbytes)
    finally:
        for fd in fds.values():
            os.close(fd)
    changed = ", ".join(f"{k} {base.metadata.get(k)} -> {v}" for k, v in expect.items())
    return {"link": "trim", "ok": not problems, "problems": problems[:8],
            "detail": f"{sliced} tensors cut to the resident experts' byte ranges, {same} identical, metadata "
                      f"identical but {changed}" + (f"; multi-token-prediction blocks {sorted(drop)} left out"
                                                     if drop else "")}


def _sample(t: GGUFTensor, E: int) -> tuple[np.ndarray, int]:
    """The first experts of `t` (at most _SAMPLE_BYTES), as raw bytes [experts, bytes per expert]."""
    row = t.nbytes // E
    m = max(1, min(E, _SAMPLE_BYTES // max(row, 1)))
    with open(t.file, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(row * m), dtype=np.uint8)
    return raw.reshape(m, row), m


def link_blocks(base: GGUFIndex, full: dict[int, list[int]]) -> dict[str, Any]:
    """The blocks link (see the module docstring), one entry per ggml type of the expert tensors."""
    try:
        import gguf
        from gguf import quants
    except ImportError:
        return {"link": "blocks", "ok": None, "problems": [], "detail": "needs gguf-py (pip install gguf)"}
    E = base.spec.n_experts
    by_type: dict[int, GGUFTensor] = {}
    for t in base.tensors:
        if t.kind == names.EXPERT and (t.ggml_type not in by_type or t.nbytes < by_type[t.ggml_type].nbytes):
            by_type[t.ggml_type] = t
    problems, done = [], []
    for ty, t in sorted(by_type.items()):
        raw, m = _sample(t, E)
        keep = [e for e in full.get(t.layer, range(E)) if e < m] or [0]
        qt = gguf.GGMLQuantizationType(ty)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        rows = raw.reshape(-1, size * (t.shape[0] // block))  # ggml rows: one innermost row of the tensor each
        try:
            with np.errstate(all="ignore"):  # blocks whose scales are not finite dequantize to nan / inf
                x = quants.dequantize(rows, qt).reshape(m, -1)
        except NotImplementedError:
            done.append(f"{t.dtype}: rows of {t.shape[0]} = whole blocks of {block} (gguf-py has no dequantizer)")
            continue
        with np.errstate(all="ignore"):
            per = [quants.dequantize(raw[e].reshape(-1, rows.shape[1]), qt).reshape(-1) for e in keep]
        if not all(np.array_equal(p, x[e], equal_nan=True) for p, e in zip(per, keep, strict=True)):
            problems.append(f"{t.name} ({t.dtype}): an expert's byte range does not dequantize to its rows")
            continue
        what = "dequantize"
        try:
            qx = quants.quantize(x.reshape(-1, t.shape[0]), qt).reshape(m, -1)
            qk = quants.quantize(x[keep].reshape(-1, t.shape[0]), qt).reshape(len(keep), -1)
            if not np.array_equal(qx[keep], qk):
                problems.append(f"{t.name} ({t.dtype}): quantizing the resident experts differs from slicing")
                continue
            what += " and quantize"
        except (NotImplementedError, quants.QuantError):
            pass
        done.append(f"{t.dtype}: {what} commute with slicing ({t.name}, {len(keep)} experts)")
    return {"link": "blocks", "ok": not problems, "problems": problems, "detail": "; ".join(done)}


def _tensors_equal(a: GGUFIndex, b: GGUFIndex) -> list[str]:
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        return [f"tensors differ: {sorted(set(ta) ^ set(tb))[:4]}"]
    fds: dict[Path, int] = {}
    try:
        return [f"tensor {n!r} differs" for n in sorted(ta) if ta[n].ggml_type != tb[n].ggml_type
                or ta[n].shape != tb[n].shape or not _same_bytes(ta[n], ta[n].offset, tb[n], tb[n].offset,
                                                                 ta[n].nbytes, fds)]
    finally:
        for fd in fds.values():
            os.close(fd)


def link_convert(base: GGUFIndex, hf_model: Any, plan: Any, force_plan: bool) -> dict[str, Any]:
    """The convert link: trim(GGUF(M)) against GGUF(trim(M)) with llama.cpp's converter."""
    outtype = _FILE_TYPES.get(base.metadata.get("general.file_type"))
    if outtype is None:
        return {"link": "convert", "ok": None, "problems": [],
                "detail": f"the converter writes F32, F16, BF16 or Q8_0 files; this one has general.file_type "
                          f"{base.metadata.get('general.file_type')!r}"}
    with tempfile.TemporaryDirectory(prefix="moesift-gguf-") as w:
        w = Path(w)
        g = w / "model.gguf"
        llamacpp.convert(Path(hf_model), g, outtype)
        gt = trim_gguf(g, plan, w / "model-trim.gguf", progress=False, checksum=None, force_plan=force_plan)
        mt = trim(hf_model, plan, w / "trimmed", progress=False, checksums=False, force_plan=force_plan)
        h = w / "trimmed.gguf"
        llamacpp.convert(Path(mt), h, outtype)
        a, b = read_gguf(gt), read_gguf(h)
        problems = _tensors_equal(a, b)
        ka, kb = a.files[0].kv, b.files[0].kv
        naming = [k for k in NAMING_KEYS if k in ka or k in kb]
        for k in sorted((set(ka) | set(kb)) - set(naming)):
            va, vb = (ka[k].value if k in ka else None), (kb[k].value if k in kb else None)
            if va != vb:
                problems.append(f"metadata {k!r}: {va!r} vs {vb!r}")
        same_base = not _tensors_equal(read_gguf(g), base)
    return {"link": "convert", "ok": not problems, "problems": problems[:8],
            "detail": f"trim(GGUF(M)) and GGUF(trim(M)) ({outtype.upper()}): {len(a.tensors)} tensors byte for "
                      f"byte, metadata equal but the names the converter derives ({', '.join(naming)}); "
                      f"GGUF(M) {'equals' if same_base else 'is not'} the base file's tensors"}


def verify_gguf(base: str | os.PathLike, trimmed: str | os.PathLike, plan: Any = None, hf_model: Any = None,
                force_plan: bool = False, progress: bool = True) -> dict[str, Any]:
    """Check the trimmed GGUF model `trimmed` against `base` link by link (module docstring); `plan` defaults
    to the one recorded beside `trimmed`. `ok` is False when a link fails; a skipped link says why."""
    b, s = read_gguf(base), read_gguf(trimmed)
    p, full = gguf_resident(b, _plan(trimmed, plan), force_plan)
    links = [link_trim(b, s, full, progress), link_blocks(b, full)]
    if hf_model is not None:
        links.append(link_convert(b, hf_model, p, force_plan))
    else:
        links.append({"link": "convert", "ok": None, "problems": [],
                      "detail": "pass --hf-model (the transformers checkpoint) and set MOESIFT_LLAMA_CPP"})
    return {"model": str(base), "trimmed": str(trimmed), "plan": p.source, "links": links,
            "ok": all(x["ok"] is not False for x in links)}


def format_verify_gguf(r: dict[str, Any]) -> str:
    """What `moesift verify BASE.gguf TRIM.gguf` prints: one line per link, then the verdict."""
    lines = []
    for x in r["links"]:
        mark = "ok" if x["ok"] else "skipped" if x["ok"] is None else "FAILED"
        lines.append(f"{mark:8} {x['link']}: {x['detail']}")
        lines += [f"         - {q}" for q in x["problems"]]
    lines.append(f"OK: {r['trimmed']} is {r['model']} trimmed to the plan's experts" if r["ok"] else
                 f"MISMATCH: {r['trimmed']} is not {r['model']} trimmed to the plan's experts")
    return "\n".join(lines)
