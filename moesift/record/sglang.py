"""SGLang expert distribution recorder dumps into `moesift-trace/1`.

What SGLang writes, as read in SGLang's ``python/sglang/srt/eplb/expert_distribution.py`` (commit
02295fe5ac5ccff3e8829800d50450351c56fb53; the older ``python/sglang/srt/managers/expert_distribution.py``,
commit 70e157a01070422cfd30c02058014c0a5f9a92a6, writes the same files except that its ``stat`` dict has no
``average_utilization_rate_over_window``). ``POST /dump_expert_distribution_record`` makes every rank's
recorder dump with ``torch.save``; files are read here with ``torch.load(weights_only=True)`` (no pickle code
runs). The recorder's ``rank`` is the model runner's tensor-parallel rank. Its layer axis is every decoder
layer; rows of dense layers are dropped using the model's MoE layers (``model``) or, without a model, the
layers that recorded no routing.

``per_token`` (one file per rank, ``expert_distribution_recorder_{time}_{rank}.pt``)
    ``{"records": [...], "last_physical_to_logical_map": [layers, physical experts] integer tensor}``; each
    record is one forward pass of that rank: ``forward_pass_id``, ``rank``, ``gatherer_key``, ``input_ids``
    and ``positions`` (lists of ints), ``extend_seq_lens`` (list, or None in decode), ``forward_mode`` (int),
    ``topk_ids_of_layer`` (int32 ``[layers, tokens, 8]``, physical ids, -1 padded), ``misc_objects`` and
    ``global_physical_count`` (``[layers, physical]``). Imported as a routing log, physical ids mapped to
    logical ones. Prefill passes are split into one document per request with ``extend_seq_lens``; a decode
    pass batches one token of many requests, so each decode token is its own document. Every
    tensor-parallel rank routes the same tokens, so a pass found in several files (same
    ``forward_pass_id``, token count and ``input_ids``/``positions``) is counted once; ranks whose records
    of such a pass disagree are refused (pass one rank's file); passes with other tokens under the same id
    (data-parallel or expert-parallel ranks) all count.
``per_pass`` (one file per rank, same name and dict)
    Each record holds only ``forward_pass_id``, ``rank``, ``gatherer_key`` and ``global_physical_count``
    (int32 ``[layers, physical]``: the pass's expert choices on that rank; with DeepEP low-latency only the
    rank's own physical experts are non-zero). There are no tokens, so passes of different ranks cannot be
    matched: the counts of the rank files are SUMMED (data-parallel and expert-parallel ranks route
    different tokens), physical experts added into logical ones. Without an all-to-all MoE backend
    (SGLang's default) every rank routes the whole (gathered) batch and writes the same counts; such copies
    are recognised only as whole files whose records (``forward_pass_id``, ``gatherer_key``, counts) all
    equal another file's, and counted once. Data-parallel ranks that happened to record exactly the same
    counts in every pass cannot be told from such copies; the trace's provenance says so.
``stat`` / ``stat_approx`` (one file, ``expert_distribution_recorder_{time}.pt``, written by rank 0 only)
    ``{"rank": 0, "logical_count": int32 [buffer rows, layers, logical experts],
    "average_utilization_rate_over_window": float or None}``. The counts of each rank are all-reduced
    (summed) over SGLang's process group before rank 0 writes them. The buffer is circular (1000 rows
    unless ``--expert-distribution-recorder-buffer-size`` says otherwise; a negative size keeps every pass),
    so a dump holds at most that many of the latest passes; unused rows are zero. Without an all-to-all MoE
    backend every tensor-parallel rank routes every token, so each route is counted tp_size times; with
    DeepEP each rank counts its own tokens and the sum is exact. The dump records neither tp_size nor the
    backend, so the counts are imported as SGLang wrote them (relative loads are right; absolute counts may
    be tp_size times the routes) and the trace's provenance says so. ``stat`` and ``stat_approx`` dumps
    cannot be told apart. Several ``stat`` files of rank 0 (several dumps, or separate data-parallel
    servers) are summed; the same counts under other ranks are one all-reduced tensor and count once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..formats.trace import Trace
from .logtrace import counts_trace, finish_model, trace_from_log


def _torch_load(p: Path) -> Any:
    import torch

    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means a file we cannot read safely
        raise MoesiftError(f"{str(p)!r} is not an SGLang expert distribution dump readable without running "
                           f"pickled code ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _np(x: Any) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _digest(*xs: Any) -> bytes | None:
    """sha256 of arrays (None when any is missing)."""
    h = hashlib.sha256()
    for x in xs:
        if x is None:
            return None
        a = np.ascontiguousarray(_np(x).astype(np.int64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def _int_field(r: dict, key: str, where: str) -> int | None:
    """An integer field of a record (None when absent)."""
    v = r.get(key)
    if v is None:
        return None
    a = _np(v)
    if a.ndim != 0 or not np.issubdtype(a.dtype, np.integer):
        raise MoesiftError(f"{where}: {key} must be an integer")
    return int(a)


class _RankDedup:
    """``per_token`` passes recorded by several ranks: the same pass (same ``forward_pass_id``, token count and
    tokens) in another rank's file is counted once; the same pass with different routing is refused."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.seen: dict[tuple, tuple[int, bytes | None, bytes | None]] = {}
        self.skipped = 0

    def duplicate(self, fi: int, rec: dict, n_tokens: int, routing: np.ndarray, where: str) -> bool:
        fpid = rec.get("forward_pass_id")
        if fpid is None:
            return False
        key = (int(_np(fpid)), n_tokens)
        tokens = _digest(rec.get("input_ids"), rec.get("positions"))
        route = _digest(routing)
        prev = self.seen.get(key)
        if prev is None:
            self.seen[key] = (fi, tokens, route)
            return False
        pfi, ptokens, proute = prev
        if pfi == fi or (tokens is not None and ptokens is not None and tokens != ptokens):
            return False  # another pass of the same rank, or other tokens (a data-parallel rank)
        if route == proute:
            self.skipped += 1
            return True
        raise MoesiftError(f"{where}: forward pass {key[0]} ({n_tokens} tokens) is also in "
                           f"{str(self.paths[pfi])!r} with different routing; these ranks disagree, so moesift "
                           "cannot count the pass once: pass one rank's file")


class _PerPassFile:
    """The ``per_pass`` records of one rank file: their logical counts summed, and a digest of the records
    (``forward_pass_id``, ``gatherer_key``, physical counts; not ``rank``) to find files that are copies."""

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.keys: list[tuple[int, str, bytes | None]] = []
        self.ranks: set[int] = set()

    def add(self, r: dict, g: np.ndarray, c: np.ndarray, where: str) -> None:
        fpid, rank = _int_field(r, "forward_pass_id", where), _int_field(r, "rank", where)
        self.keys.append((-1 if fpid is None else fpid, str(r.get("gatherer_key")), _digest(g)))
        if rank is not None:
            self.ranks.add(rank)
        self.counts = c if self.counts is None else self.counts + c

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for fpid, key, dg in sorted(self.keys, key=lambda k: (k[0], k[1])):
            h.update(repr((fpid, key)).encode())
            h.update(dg or b"")
        return h.digest()


def import_sglang(paths, minfo, label, sources, folds) -> Trace:
    """One trace from the SGLang dumps `paths` (model identity `minfo`, filled in where the dumps tell)."""
    acc = _Dumps(paths)
    for fi, p in enumerate(paths):
        acc.read(fi, p)
    if "per_token" in acc.kinds and acc.kinds != {"per_token"}:
        raise MoesiftError("mix of per-token and aggregate SGLang dumps; import them separately")
    tool: dict[str, Any] = {"imported_from": "sglang expert distribution recorder (" + ", ".join(sorted(acc.kinds)) + ")"}
    notes = acc.finish_per_pass()
    if "stat" in acc.kinds:
        notes.append(_stat_note(acc.stat_rows))
    if acc.dedup.skipped:
        tool["duplicate_rank_records"] = acc.dedup.skipped
    if notes:
        tool["notes"] = notes
    if acc.logs:
        log = np.concatenate(acc.logs)  # [N, layers, K]
        rows = _moe_rows(minfo, log.max(axis=(0, 2)) >= 0, str(paths[0]))
        log = log[:, rows, :]
        # drop padding columns that no token uses
        K = max(int((log >= 0).sum(-1).max()), 1)
        log = _compact(log, K)
        finish_model(minfo, log, str(paths[0]))
        return trace_from_log(log, np.asarray(acc.offs), np.concatenate(acc.phases), minfo, label, sources, folds,
                              tool)
    if acc.counts_total is None:
        raise MoesiftError(f"{str(paths[0])!r} holds no records")
    rows = _moe_rows(minfo, acc.counts_total.sum(1) > 0, str(paths[0]))
    c = acc.counts_total[rows]
    if minfo.get("n_experts") is None:
        minfo["n_experts"] = c.shape[1]
    if minfo.get("top_k") is None:
        raise MoesiftError("aggregate SGLang dumps do not say top-k; pass --model or --top-k")
    if c.shape[1] != int(minfo["n_experts"]):
        raise MoesiftError(f"{str(paths[0])!r} counts {c.shape[1]} experts; the model has {minfo['n_experts']}")
    return counts_trace(c, minfo, label, sources, tool)


def _stat_note(rows: int) -> str:
    window = f", at most the last {rows} forward passes of each dump (its buffer)" if rows else ""
    return (f"stat: counts as SGLang dumps them, not divided: summed (all-reduce) over the ranks of its process "
            f"group and written by rank 0{window}. "
            "Without an all-to-all MoE backend (SGLang's default) every tensor-parallel rank routes every token, "
            "so each route is counted tp_size times; with DeepEP each rank counts its own tokens. The dump "
            "records neither tp_size nor the backend, so moesift assumes the counts may be scaled by tp_size: "
            "relative expert loads are right, absolute counts may be tp_size times the routes")


class _Dumps:
    """What the dumps of several files add up to: routing-log pieces (per_token), or counts (stat, per_pass)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.logs: list[np.ndarray] = []
        self.offs: list[int] = [0]
        self.phases: list[np.ndarray] = []
        self.counts_total: np.ndarray | None = None
        self.kinds: set[str] = set()
        self.dedup = _RankDedup(paths)
        self.stat_ranks: dict[Any, tuple[bytes | None, Path]] = {}
        self.stat_rows = 0
        self.per_pass_files: dict[int, _PerPassFile] = {}

    def add_counts(self, c: np.ndarray, where: str) -> None:
        if self.counts_total is not None and self.counts_total.shape != c.shape:
            raise MoesiftError(f"{where} counts {c.shape[0]} layers x {c.shape[1]} experts; the files before it "
                               f"count {self.counts_total.shape[0]} x {self.counts_total.shape[1]}: import dumps "
                               "of one model together")
        self.counts_total = c if self.counts_total is None else self.counts_total + c

    def read(self, fi: int, p: Path) -> None:
        """One dump file (index `fi` of the files given)."""
        d = _torch_load(p)
        where = str(p)
        if not isinstance(d, dict):
            raise MoesiftError(f"{where!r} is not an SGLang expert distribution dump (expected a dict)")
        if "logical_count" in d:
            self.stat(d, p)
        elif "records" in d:
            recs = d["records"]
            p2l = d.get("last_physical_to_logical_map")
            if not isinstance(recs, list):
                raise MoesiftError(f"{where!r}: records must be a list")
            p2l = _np(p2l).astype(np.int64) if p2l is not None else None
            for i, r in enumerate(recs):
                if not isinstance(r, dict):
                    raise MoesiftError(f"{where!r} record {i} is not a dict")
                if "topk_ids_of_layer" in r:
                    self.per_token(fi, r, p2l, repr(where), i)
                elif "global_physical_count" in r:
                    self.per_pass(fi, r, p2l, f"{where!r} record {i}")
                else:
                    raise MoesiftError(f"{where!r} record {i} has neither topk_ids_of_layer nor "
                                       "global_physical_count")
        else:
            raise MoesiftError(f"{where!r} is not an SGLang expert distribution dump (no logical_count or records); "
                               "dump it with POST /dump_expert_distribution_record")

    def stat(self, d: dict, p: Path) -> None:
        """A ``stat`` dump: logical counts all-reduced over ranks by SGLang (rank 0 writes the file)."""
        where = str(p)
        self.kinds.add("stat")
        c = _np(d["logical_count"])
        if c.ndim == 3:
            self.stat_rows = max(self.stat_rows, c.shape[0])
            c = c.sum(0)
        if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer):
            raise MoesiftError(f"{where!r}: logical_count must be an integer [steps, layers, experts] tensor")
        rank = d.get("rank")
        rank = int(_np(rank)) if rank is not None else None
        dg = _digest(c)
        others = {r: v for r, v in self.stat_ranks.items() if r != rank and rank is not None and r is not None}
        if any(v[0] == dg for v in others.values()):  # one all-reduced tensor seen by several ranks
            self.dedup.skipped += 1
            return
        if others:
            r0, (_, p0) = next(iter(others.items()))
            raise MoesiftError(f"{where!r} (rank {rank}) and {str(p0)!r} (rank {r0}) hold different stat counts; "
                               "stat dumps already sum over ranks: pass one rank's file")
        self.stat_ranks.setdefault(rank, (dg, p))
        self.add_counts(c.astype(np.int64), repr(where))

    def per_token(self, fi: int, r: dict, p2l: np.ndarray | None, file: str, i: int) -> None:
        """A ``per_token`` record (record `i` of `file`): every token's experts (physical ids mapped to
        logical ones)."""
        where = f"{file} record {i}"
        self.kinds.add("per_token")
        ids = _np(r["topk_ids_of_layer"]).astype(np.int64)  # [L, T, K]
        if ids.ndim != 3:
            raise MoesiftError(f"{where}: topk_ids_of_layer must be [layers, tokens, k]")
        if p2l is not None:
            if p2l.shape[0] != ids.shape[0] or (ids.max(initial=-1) >= p2l.shape[1]):
                raise MoesiftError(f"{file}: last_physical_to_logical_map {tuple(p2l.shape)} does not fit "
                                   f"topk_ids_of_layer {tuple(ids.shape)}")
            lay = np.arange(ids.shape[0])[:, None, None]
            ids = np.where(ids >= 0, p2l[lay, np.maximum(ids, 0)], -1)
        T = ids.shape[1]
        if self.dedup.duplicate(fi, r, T, ids, where):
            return
        ext = r.get("extend_seq_lens")
        ext = [int(x) for x in ext] if ext is not None else None
        self.logs.append(ids.transpose(1, 0, 2))
        offs = self.offs
        if ext and sum(ext) == T and len(ext) < T:  # prefill pass: one document per request
            for n in ext:
                offs.append(offs[-1] + n)
            self.phases.append(np.zeros(T, dtype=np.uint8))
        else:  # decode pass (one token of each running request): one document per token
            offs.extend(offs[-1] + np.arange(1, T + 1))
            self.phases.append(np.ones(T, dtype=np.uint8))

    def per_pass(self, fi: int, r: dict, p2l: np.ndarray | None, where: str) -> None:
        """A ``per_pass`` record: physical expert counts of one forward pass of one rank, summed into logical
        ones and kept per file until `finish_per_pass`."""
        self.kinds.add("per_pass")
        g = _np(r["global_physical_count"])
        if g.ndim != 2 or not np.issubdtype(g.dtype, np.integer):
            raise MoesiftError(f"{where}: global_physical_count must be an integer [layers, physical experts] "
                               "tensor")
        g = g.astype(np.int64)
        if p2l is None or p2l.shape != g.shape:
            raise MoesiftError(f"{where}: global_physical_count needs a matching last_physical_to_logical_map")
        if g.min(initial=0) < 0 or p2l.min(initial=0) < 0:
            raise MoesiftError(f"{where}: negative counts or expert ids")
        c = np.zeros((g.shape[0], int(p2l.max(initial=0)) + 1), dtype=np.int64)
        for li in range(g.shape[0]):
            np.add.at(c[li], p2l[li], g[li])
        self.per_pass_files.setdefault(fi, _PerPassFile()).add(r, g, c, where)

    def finish_per_pass(self) -> list[str]:
        """Sum the ``per_pass`` counts of the rank files, counting files that copy another file's records
        once; returns the provenance note."""
        if not self.per_pass_files:
            return []
        kept: dict[bytes, int] = {}
        copies = 0
        for fi, f in self.per_pass_files.items():
            dg = f.digest()
            if dg in kept:
                copies += 1
                self.dedup.skipped += len(f.keys)
                continue
            kept[dg] = fi
            if f.counts is not None:
                self.add_counts(f.counts, repr(str(self.paths[fi])))
        ranks = sorted({r for fi in kept.values() for r in self.per_pass_files[fi].ranks})
        note = (f"per_pass: the counts of {len(kept)} rank file(s) (ranks {ranks}) were summed: per_pass records "
                "hold no tokens (only forward_pass_id, rank, gatherer_key and global_physical_count), so passes "
                "of different ranks cannot be matched and data- or expert-parallel ranks route different tokens. ")
        note += (f"{copies} file(s) whose records all equal another file's were counted once as tensor-parallel "
                 "copies (without an all-to-all MoE backend every rank routes the same batch); "
                 if copies else "No file repeated another's records; ")
        note += ("data-parallel ranks that recorded exactly the same counts in every pass cannot be told from such "
                 "copies")
        return [note]


def _compact(log: np.ndarray, K: int) -> np.ndarray:
    """Keep each row's ids in order, padding (-1) moved to the end, K columns."""
    order = np.argsort(log < 0, axis=-1, kind="stable")
    return np.take_along_axis(log, order, axis=-1)[:, :, :K]


def _moe_rows(minfo: dict[str, Any], used: np.ndarray, where: str) -> list[int]:
    n = len(used)
    if minfo.get("moe_layers") is not None:
        return _fit_layers(minfo, n, where)
    rows = [int(i) for i in np.flatnonzero(used)]
    if not rows:
        raise MoesiftError(f"{where!r} recorded no routing in any layer")
    minfo["moe_layers"] = rows
    minfo["num_hidden_layers"] = n  # SGLang's layer axis is every decoder layer
    return rows


def _fit_layers(model: dict[str, Any], n_rows: int, where: str) -> list[int]:
    """Rows of SGLang's layer axis (every decoder layer) that are the model's MoE layers."""
    moe = list(model["moe_layers"])
    nh = model.get("num_hidden_layers")
    if nh is not None and n_rows > nh:
        raise MoesiftError(f"{where}: the file has {n_rows} layers but the model has {nh} decoder layers; pass the "
                           "--model the records were made with")
    if n_rows == len(moe):
        return list(range(n_rows))
    if n_rows > max(moe):
        if nh is None:
            model["num_hidden_layers"] = n_rows
        return moe
    raise MoesiftError(f"{where}: the file has {n_rows} layers but the model has {len(moe)} MoE layers "
                       f"({moe[:8]}...); pass the --model the records were made with")

