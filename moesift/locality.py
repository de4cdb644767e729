"""Routing locality from a per-token routing log (traces recorded with ``--log-routing``).

Definitions follow "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models" (arXiv 2505.16056). Windows never cross a document boundary.

- SRP(m), Segment Routing best Performance: for every window of m consecutive tokens (stride 1) let c_e be
  the number of its tokens whose top-k holds expert e. A threshold j predicts S_j = {e : c_e >= j} for every
  token of the window. Over all windows (and layers for the overall figure): matches = sum_{e in S_j} c_e,
  predictions = |S_j| m, actual = k m; F1(j) = 2 matches / (predictions + actual); SRP = max_j F1(j), one j
  for the whole aggregate (j = 0..m). ``experts_ratio`` = |S_j*| / k beside it.
- SCH(m, rho), Segment Cache best Hit rate: a cache of rho*k experts per layer; at token t it holds the
  rho*k experts most frequent in tokens t..t+m-1 of the same document, ties to the most recently used
  (before t, in the document), remaining ties to the lower expert id; SCH = hits / activations.
- LRU / LFU / Belady hit rates of a per-layer cache of C experts come from `moesift.cachesim`.

All figures are exact on the tokens they are computed on. A long log is sampled by whole documents spread
evenly over the log (``max_tokens``); the sample is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MoesiftError

SEG_LENS = (4, 16, 64, 256)
RHOS = (1, 2, 4, 8)


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
    x = np.zeros((n + 1, n_experts), dtype=np.int32)
    rows = np.repeat(np.arange(1, n + 1), ids.shape[1])
    x[rows, ids.reshape(-1).astype(np.int64)] = 1
    np.cumsum(x, axis=0, out=x)
    return x


def srp_histograms(ids: np.ndarray, offs: np.ndarray, n_experts: int, seg_lens=SEG_LENS) -> dict[int, np.ndarray]:
    """For one layer: {m: H [m+1]} with H[v] = number of (window, expert) pairs whose count is v."""
    n = ids.shape[0]
    C = _one_hot_cumsum(ids, n_experts)
    start, end = _doc_ids(offs, n)
    out = {}
    for m in seg_lens:
        if m > n:
            out[m] = np.zeros(m + 1, dtype=np.int64)
            continue
        w = np.arange(n - m + 1)
        valid = w + m <= end[: n - m + 1]
        c = C[m:][valid] - C[: n - m + 1][valid]
        out[m] = np.bincount(c.reshape(-1), minlength=m + 1).astype(np.int64)
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


def sch_ranks(ids: np.ndarray, offs: np.ndarray, n_experts: int, m: int, chunk: int = 4096) -> np.ndarray:
    """For one layer: histogram R [E] of the cache rank of every activation under the SCH(m) ordering;
    the hit rate of a cache of C experts is R[:C].sum() / activations."""
    n, K = ids.shape
    E = n_experts
    C = _one_hot_cumsum(ids, E)
    start, end = _doc_ids(offs, n)
    # last use before t within the document: running max of use positions, shifted by one token
    use = np.full((n + 1, E), -1, dtype=np.int64)
    rows = np.repeat(np.arange(1, n + 1), K)
    use[rows, ids.reshape(-1).astype(np.int64)] = rows - 1
    np.maximum.accumulate(use, axis=0, out=use)
    hist = np.zeros(E, dtype=np.int64)
    eid = np.arange(E)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        t = np.arange(a, b)
        hi = np.minimum(t + m, end[a:b])
        cnt = C[hi] - C[t]  # [T, E] uses in t..t+m-1
        lu = use[t]  # last use strictly before t (row t holds uses of tokens < t)
        lu = np.where(lu >= start[a:b, None], lu, -1)
        key = (cnt.astype(np.int64) * (n + 2) + (lu + 1)) * E + (E - 1 - eid)  # larger = kept first
        sel = ids[a:b].astype(np.int64)
        ks = np.take_along_axis(key, sel, axis=1)  # [T, K]
        rank = (key[:, None, :] > ks[:, :, None]).sum(axis=2)  # [T, K]
        hist += np.bincount(rank.reshape(-1), minlength=E)[:E]
    return hist


def _check_log(log: np.ndarray, n_experts: int) -> np.ndarray:
    log = np.asarray(log)
    if log.ndim != 3:
        raise MoesiftError(f"routing_log must be [tokens, layers, top_k], got shape {log.shape}")
    if log.size and (log.min() < 0 or log.max() >= n_experts):
        raise MoesiftError(f"routing_log holds expert ids outside 0..{n_experts - 1}")
    return log


def srp(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS) -> dict[str, Any]:
    """SRP per layer and overall for every segment length. log: [N, L, K]."""
    log = _check_log(log, n_experts)
    N, L, K = log.shape
    offs = _offsets(doc_offsets, N)
    total = {m: np.zeros(m + 1, dtype=np.int64) for m in seg_lens}
    per_layer = []
    for li in range(L):
        hs = srp_histograms(log[:, li, :], offs, n_experts, seg_lens)
        per_layer.append({str(m): srp_from_histogram(hs[m], m, K) for m in seg_lens})
        for m in seg_lens:
            total[m] += hs[m]
    return {"overall": {str(m): srp_from_histogram(total[m], m, K) for m in seg_lens}, "layers": per_layer}


def sch(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS, rhos=RHOS) -> dict[str, Any]:
    """SCH per layer and overall for every segment length and cache size rho * top-k."""
    log = _check_log(log, n_experts)
    N, L, K = log.shape
    offs = _offsets(doc_offsets, N)
    rhos = [r for r in rhos if r * K <= n_experts]
    acts = N * K
    tot = {m: np.zeros(n_experts, dtype=np.int64) for m in seg_lens}
    per_layer = []
    for li in range(L):
        row = {}
        for m in seg_lens:
            h = sch_ranks(log[:, li, :], offs, n_experts, m)
            tot[m] += h
            cum = np.cumsum(h)
            row[str(m)] = {str(r): float(cum[r * K - 1] / acts) if acts else float("nan") for r in rhos}
        per_layer.append(row)
    overall = {}
    for m in seg_lens:
        cum = np.cumsum(tot[m])
        overall[str(m)] = {str(r): float(cum[r * K - 1] / (acts * L)) if acts else float("nan") for r in rhos}
    return {"overall": overall, "layers": per_layer, "rhos": rhos}


def cache_hit_rates(log: np.ndarray, n_experts: int, capacities, policies=("lru", "lfu", "belady")) -> dict[str, Any]:
    """Per-layer hit rates of a cache of C experts for each policy, via `moesift.cachesim.simulate`."""
    from .cachesim import simulate

    log = _check_log(log, n_experts)
    N, L, K = log.shape
    out: dict[str, Any] = {"capacities": [int(c) for c in capacities], "layers": [], "overall": {}}
    sums = {(p, c): [0, 0] for p in policies for c in capacities}
    for li in range(L):
        row = {}
        lay = np.ascontiguousarray(log[:, li, :]).astype(np.int64)
        for c in capacities:
            row[str(c)] = {}
            for p in policies:
                r = simulate(lay, int(c), p)
                row[str(c)][p] = float(r["hit_rate"])
                sums[(p, c)][0] += int(r["hits"])
                sums[(p, c)][1] += int(r["accesses"])
        out["layers"].append(row)
    for c in capacities:
        out["overall"][str(c)] = {p: (sums[(p, c)][0] / sums[(p, c)][1] if sums[(p, c)][1] else float("nan")) for p in policies}
    return out


def locality(trace, seg_lens=SEG_LENS, rhos=RHOS, max_tokens: int | None = 16384, cache_tokens: int | None = 4096,
             cache_rhos=(1, 2, 4)) -> dict[str, Any] | None:
    """Locality section of a report: SRP, SCH and cache-policy hit rates (None without a routing log)."""
    log = trace.get("routing_log")
    if log is None or log.shape[0] == 0:
        return None
    E = trace.n_experts
    N, L, K = log.shape
    offs = _offsets(trace.get("doc_offsets"), N)
    keep = sample_documents(offs, N, max_tokens)
    sub, sub_offs = _subset(log, offs, keep)
    out: dict[str, Any] = {
        "tokens_in_log": int(N),
        "tokens_used": int(sub.shape[0]),
        "documents_used": int(len(sub_offs) - 1),
        "seg_lens": list(seg_lens),
        "srp": srp(sub, sub_offs, E, seg_lens),
        "sch": sch(sub, sub_offs, E, seg_lens, rhos),
    }
    try:
        import importlib

        importlib.import_module(".cachesim", __package__)
    except ModuleNotFoundError:
        out["cache"] = None
        out["cache_note"] = "moesift.cachesim is not available"
        return out
    ckeep = sample_documents(sub_offs, sub.shape[0], cache_tokens)
    csub, _ = _subset(sub, sub_offs, ckeep)
    caps = [r * K for r in cache_rhos if r * K <= E]
    out["cache"] = cache_hit_rates(csub, E, caps)
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
