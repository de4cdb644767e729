"""Routing locality from a per-token routing log (traces recorded with ``--log-routing``).

Definitions follow "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models" (arXiv 2505.16056). Windows never cross a document boundary.

- SRP(m), Segment Routing best Performance: for every window of m consecutive tokens (stride 1) let c_e be
  the number of its tokens whose top-k holds expert e. A threshold j predicts S_j = {e : c_e >= j} for every
  token of the window. Over all windows (and layers for the overall figure): matches = sum_{e in S_j} c_e,
  predictions = |S_j| m, actual = k m; F1(j) = 2 matches / (predictions + actual); SRP = max_j F1(j), one j
  for the whole aggregate (j = 0..m). ``experts_ratio`` = |S_j*| / k beside it.
- SCH(m, rho), Segment Cache best Hit rate (paper v3, sec. 2.3; ``SCH_DEFINITION``): a demand cache of
  C = rho*k experts per layer, empty at the start of each document (documents are independent). At token t
  the token's experts already cached are hits; the missing ones are loaded and, when the cache is full, the
  same number of cached experts that token t does not use are evicted: those selected by the fewest tokens
  among t..t+m-1 of the document, ties to the least recently used (a token's experts are used in column
  order). SCH = hits / activations (a token's distinct experts). As a demand cache it never beats Belady at
  the same capacity.
- LRU / LFU / Belady hit rates of a per-layer cache of C experts come from `moesift.cachesim`; with
  ``doc_offsets`` every document starts with an empty cache, as for SCH.

All figures are exact on the tokens they are computed on. A long log is sampled by whole documents spread
evenly over the log (``max_tokens``); the sample is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from .cachesim import simulate

SEG_LENS = (4, 16, 64, 256)
RHOS = (1, 2, 4, 8)
SCH_DEFINITION = "paper-v3-demand-cache"


def sample_documents(doc_offsets: np.ndarray, n_tokens: int, max_tokens: int | None) -> np.ndarray:
    """Boolean mask [N] of the tokens of whole documents spread evenly over the log, at most ~max_tokens."""
    offs = _offsets(doc_offsets, n_tokens)
    keep = np.zeros(n_tokens, dtype=bool)
    if max_tokens is None or n_tokens <= max_tokens:
        keep[:] = True
        return keep
    D = len(offs) - 1
    lens = np.diff(offs)
    # visit documents in an evenly strided order until the budget is spent
    stride = max(1, int(round(n_tokens / max_tokens)))
    order = [d for r in range(stride) for d in range(r, D, stride)]
    used = 0
    for d in order:
        if used >= max_tokens:
            break
        if used + lens[d] > max_tokens and used > 0:
            continue
        keep[offs[d] : offs[d + 1]] = True
        used += int(lens[d])
    return keep


def _offsets(doc_offsets: np.ndarray | None, n_tokens: int) -> np.ndarray:
    if doc_offsets is None:
        return np.array([0, n_tokens], dtype=np.int64)
    o = np.asarray(doc_offsets, dtype=np.int64)
    if o.ndim != 1 or o.size < 2 or o[0] != 0 or o[-1] != n_tokens or (np.diff(o) < 0).any():
        raise MoesiftError(f"doc_offsets must run from 0 to {n_tokens} in increasing order")
    return o


def _doc_ids(offs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(document start [N], document end [N]) of every token."""
    lens = np.diff(offs)
    start = np.repeat(offs[:-1], lens)
    end = np.repeat(offs[1:], lens)
    return start, end


def _one_hot_cumsum(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """C [N+1, E] int32: C[t, e] = tokens among 0..t-1 that selected e."""
    n = ids.shape[0]
    x = np.zeros((n + 1, n_experts), dtype=np.int16 if n < 32767 else np.int32)
    rows = np.repeat(np.arange(1, n + 1), ids.shape[1])
    x[rows, ids.reshape(-1).astype(np.int64)] = 1
    np.cumsum(x, axis=0, out=x)
    return x


def srp_histograms(ids: np.ndarray, offs: np.ndarray, n_experts: int, seg_lens=SEG_LENS, C=None) -> dict[int, np.ndarray]:
    """For one layer: {m: H [m+1]} with H[v] = number of (window, expert) pairs whose count is v."""
    n = ids.shape[0]
    if C is None:
        C = _one_hot_cumsum(ids, n_experts)
    start, end = _doc_ids(offs, n)
    out = {}
    for m in seg_lens:
        if m > n:
            out[m] = np.zeros(m + 1, dtype=np.int64)
            continue
        valid = np.flatnonzero(np.arange(n - m + 1) + m <= end[: n - m + 1])
        if valid.size == n - m + 1:
            c = C[m:] - C[: n - m + 1]
        else:
            c = C[valid + m] - C[valid]
        c = c.reshape(-1)
        if m * ids.shape[1] * 4 < n_experts:  # mostly zeros: count the non-zero entries only
            nz = c[c != 0]
            h = np.bincount(nz, minlength=m + 1).astype(np.int64)
            h[0] = c.size - nz.size
        else:
            h = np.bincount(c, minlength=m + 1).astype(np.int64)
        out[m] = h
    return out


def srp_from_histogram(H: np.ndarray, m: int, k: int) -> dict[str, Any]:
    """SRP and its threshold from H [m+1] (summed over any set of windows and layers)."""
    v = np.arange(H.size)
    matches = np.cumsum((v * H)[::-1])[::-1].astype(np.float64)
    preds = np.cumsum(H[::-1])[::-1].astype(np.float64) * m
    actual = matches[0]
    if actual <= 0:
        return {"srp": float("nan"), "threshold": None, "experts_ratio": float("nan"), "windows": 0}
    f1 = 2 * matches / np.maximum(preds + actual, 1)
    j = int(np.argmax(f1))
    return {"srp": float(f1[j]), "threshold": j, "experts_ratio": float(preds[j] / actual), "windows": int(actual // (k * m))}


def _rows(ids: np.ndarray) -> list[list[int]]:
    """Rows of one layer's log as lists of distinct non-negative ids in column order."""
    rows = ids.tolist()
    if ids.size and (ids.min() < 0 or (ids.shape[1] > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any())):
        rows = [list(dict.fromkeys(e for e in r if e >= 0)) for r in rows]
    return rows


def sch_hits(ids: np.ndarray, offs: np.ndarray, n_experts: int, m: int, capacity: int, C=None,
             rows: list[list[int]] | None = None) -> tuple[int, int]:
    """For one layer [N, K]: (hits, activations) of the SCH(m) demand cache of `capacity` experts, reset at
    every document start (see the module docstring)."""
    if C is None:
        C = _one_hot_cumsum(ids, n_experts)
    if rows is None:
        rows = _rows(ids)
    hits = acts = 0
    for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True):
        cache: set[int] = set()
        last: dict[int, int] = {}  # expert -> time of its last use (token * K + column)
        clock = 0
        for t in range(a, b):
            r = rows[t]
            acts += len(r)
            miss = 0
            for e in r:
                if e in cache:
                    hits += 1
                else:
                    miss += 1
            over = len(cache) + miss - capacity
            if over > 0:
                if over > len(cache) - (len(r) - miss):
                    raise MoesiftError(f"an SCH cache of {capacity} experts cannot hold the {len(r)} experts of one token")
                cand = [e for e in cache if e not in r]
                cnt = (C[min(t + m, b)] - C[t]).tolist()  # uses in tokens t..t+m-1 of the document
                cand.sort(key=lambda e: (cnt[e], last[e]))
                cache.difference_update(cand[:over])
            for e in r:
                cache.add(e)
                last[e] = clock
                clock += 1
    return hits, acts


def _check_log(log: np.ndarray, n_experts: int) -> np.ndarray:
    log = np.asarray(log)
    if log.ndim != 3:
        raise MoesiftError(f"routing_log must be [tokens, layers, top_k], got shape {log.shape}")
    if log.size and (log.min() < 0 or log.max() >= n_experts):
        raise MoesiftError(f"routing_log holds expert ids outside 0..{n_experts - 1}")
    return log


def srp_sch(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS, rhos=RHOS, want_srp: bool = True,
            want_sch: bool = True, layers=None) -> dict[str, Any]:
    """SRP and SCH in one pass over the layers (the per-layer count arrays are shared). SRP uses every layer;
    SCH the MoE layer positions `layers` (all by default)."""
    log = _check_log(log, n_experts)
    N, L, K = log.shape
    offs = _offsets(doc_offsets, N)
    rhos = [int(r) for r in rhos if r * K <= n_experts]
    sch_layers_ids = list(range(L)) if layers is None else [int(x) for x in layers]
    h_tot = {m: np.zeros(m + 1, dtype=np.int64) for m in seg_lens}
    tot = {(m, r): [0, 0] for m in seg_lens for r in rhos}
    srp_layers, sch_layers = [], []
    for li in range(L):
        do_sch = want_sch and li in sch_layers_ids
        if not (want_srp or do_sch):
            continue
        ids = log[:, li, :]
        C = _one_hot_cumsum(ids, n_experts)
        if want_srp:
            hs = srp_histograms(ids, offs, n_experts, seg_lens, C=C)
            srp_layers.append({str(m): srp_from_histogram(hs[m], m, K) for m in seg_lens})
            for m in seg_lens:
                h_tot[m] += hs[m]
        if do_sch:
            rows = _rows(np.asarray(ids, dtype=np.int64))
            row: dict[str, dict[str, float]] = {}
            for m in seg_lens:
                row[str(m)] = {}
                for r in rhos:
                    h, a = sch_hits(ids, offs, n_experts, m, r * K, C=C, rows=rows)
                    tot[(m, r)][0] += h
                    tot[(m, r)][1] += a
                    row[str(m)][str(r)] = h / a if a else float("nan")
            sch_layers.append(row)
    out: dict[str, Any] = {}
    if want_srp:
        out["srp"] = {"overall": {str(m): srp_from_histogram(h_tot[m], m, K) for m in seg_lens}, "layers": srp_layers}
    if want_sch:
        out["sch"] = {
            "definition": SCH_DEFINITION,
            "overall": {str(m): {str(r): (tot[(m, r)][0] / tot[(m, r)][1] if tot[(m, r)][1] else float("nan"))
                                 for r in rhos} for m in seg_lens},
            "layers": sch_layers, "moe_layers": sch_layers_ids, "rhos": rhos,
            "capacities": [r * K for r in rhos],
        }
    return out


def srp(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS) -> dict[str, Any]:
    """SRP per layer and overall for every segment length. log: [N, L, K]."""
    return srp_sch(log, doc_offsets, n_experts, seg_lens, want_sch=False)["srp"]


def sch(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS, rhos=RHOS, layers=None) -> dict[str, Any]:
    """SCH (paper v3 demand cache) per layer and overall (hits / activations pooled over the layers) for every
    segment length m and cache size rho * top-k. log: [N, L, K]."""
    return srp_sch(log, doc_offsets, n_experts, seg_lens, rhos, want_srp=False, layers=layers)["sch"]


def cache_hit_rates(log: np.ndarray, n_experts: int, capacities, policies=("lru", "lfu", "belady"),
                    layers=None, doc_offsets=None) -> dict[str, Any]:
    """Hit rates of a per-layer cache of C experts for each policy, via `moesift.cachesim.simulate`, on the
    MoE layers `layers` (all by default); overall = hits / accesses summed over those layers. With
    `doc_offsets`, every document starts with an empty cache (documents independent, as SCH)."""
    log = _check_log(log, n_experts)
    N, L, K = log.shape
    offs = _offsets(doc_offsets, N)
    docs = [(a, b) for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True) if b > a]
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    out: dict[str, Any] = {"capacities": [int(c) for c in capacities], "moe_layers": layers, "layers": [], "overall": {},
                           "cold_start_per_document": doc_offsets is not None}
    sums = {(p, c): [0, 0] for p in policies for c in capacities}
    for li in layers:
        row = {}
        lay = np.ascontiguousarray(log[:, li, :]).astype(np.int64)
        for c in capacities:
            row[str(c)] = {}
            for p in policies:
                h = n = 0
                for a, b in docs:
                    r = simulate(lay[a:b], int(c), p)
                    h += int(r["hits"])
                    n += int(r["accesses"])
                row[str(c)][p] = h / n if n else float("nan")
                sums[(p, c)][0] += h
                sums[(p, c)][1] += n
        out["layers"].append(row)
    for c in capacities:
        out["overall"][str(c)] = {p: (sums[(p, c)][0] / sums[(p, c)][1] if sums[(p, c)][1] else float("nan")) for p in policies}
    return out


def locality(trace, seg_lens=SEG_LENS, rhos=RHOS, max_tokens: int | None = 8192, cache_tokens: int | None = 2048,
             cache_layers: int | None = 6) -> dict[str, Any] | None:
    """Locality section of a report: SRP, SCH and cache-policy hit rates (None without a routing log).

    SRP uses up to `max_tokens` logged tokens (whole documents spread over the log) on every MoE layer. SCH
    and the LRU / LFU / Belady caches replay the same `cache_tokens` of those tokens (whole documents, each
    starting with an empty cache) on the same `cache_layers` MoE layers spread evenly (None: all layers), for
    caches of rho * top-k experts per layer (2k is the setting of arXiv 2505.16056), so SCH and Belady are
    compared on identical inputs."""
    log = trace.get("routing_log")
    if log is None or log.shape[0] == 0:
        return None
    E = trace.n_experts
    N, L, K = log.shape
    offs = _offsets(trace.get("doc_offsets"), N)
    keep = sample_documents(offs, N, max_tokens)
    sub, sub_offs = _subset(log, offs, keep)
    ckeep = sample_documents(sub_offs, sub.shape[0], cache_tokens)
    csub, csub_offs = _subset(sub, sub_offs, ckeep)
    if cache_layers is None or cache_layers >= L:
        lays = list(range(L))
    else:
        lays = sorted({int(round(x)) for x in np.linspace(0, L - 1, max(1, cache_layers))})
    out: dict[str, Any] = {
        "tokens_in_log": int(N),
        "tokens_used": int(sub.shape[0]),
        "documents_used": int(len(sub_offs) - 1),
        "seg_lens": list(seg_lens),
        "sch_definition": SCH_DEFINITION,
    }
    out.update(srp_sch(sub, sub_offs, E, seg_lens, rhos, want_sch=False))
    out.update(srp_sch(csub, csub_offs, E, seg_lens, rhos, want_srp=False, layers=lays))
    out["sch"]["tokens_used"] = int(csub.shape[0])
    out["sch"]["documents_used"] = int(len(csub_offs) - 1)
    caps = out["sch"]["capacities"]
    out["cache"] = cache_hit_rates(csub, E, caps, layers=lays, doc_offsets=csub_offs)
    out["cache"]["tokens_used"] = int(csub.shape[0])
    return out


def _subset(log: np.ndarray, offs: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if keep.all():
        return log, offs
    lens = np.diff(offs)
    kept_docs = [int(d) for d in range(len(lens)) if lens[d] > 0 and keep[offs[d]]]
    sub = log[keep]
    new = np.concatenate([[0], np.cumsum([lens[d] for d in kept_docs])]).astype(np.int64)
    return sub, new
