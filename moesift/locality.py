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
    x = np.zeros((n + 1, n_experts), dtype=np.int16 if n < 32767 else np.int32)
    rows = np.repeat(np.arange(1, n + 1), ids.shape[1])
    x[rows, ids.reshape(-1).astype(np.int64)] = 1
    np.cumsum(x, axis=0, out=x)
    return x


def _last_use(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """U [N+1, E] int32: U[t, e] = last token before t that selected e (-1 if none)."""
    n, K = ids.shape
    use = np.full((n + 1, n_experts), -1, dtype=np.int16 if n < 32767 else np.int32)
    rows = np.repeat(np.arange(1, n + 1), K)
    use[rows, ids.reshape(-1).astype(np.int64)] = rows - 1
    np.maximum.accumulate(use, axis=0, out=use)
    return use


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


def sch_ranks(ids: np.ndarray, offs: np.ndarray, n_experts: int, m: int, stride: int = 1, chunk: int = 2048,
              C=None, U=None) -> np.ndarray:
    """For one layer: histogram R [E] of the cache rank of every activation of the evaluated tokens (every
    `stride`-th token) under the SCH(m) ordering; the hit rate of a cache of C experts is
    R[:C].sum() / R.sum()."""
    n, K = ids.shape
    E = n_experts
    if C is None:
        C = _one_hot_cumsum(ids, E)
    if U is None:
        U = _last_use(ids, E)
    start, end = _doc_ids(offs, n)
    hist = np.zeros(E, dtype=np.int64)
    dmax = int(np.diff(offs).max()) + 2 if len(offs) > 1 else 2
    dt = np.int32 if (m + 1) * dmax * E < 2**31 - 1 else np.int64
    tie = (E - 1 - np.arange(E)).astype(dt)
    ts = np.arange(0, n, stride)
    for a in range(0, ts.size, chunk):
        t = ts[a : a + chunk]
        hi = np.minimum(t + m, end[t])
        cnt = (C[hi] - C[t]).astype(dt)  # [T, E] uses in t..t+m-1 (inside the document)
        st = start[t, None].astype(dt)
        lu = U[t].astype(dt)  # last use strictly before t
        lu = np.where(lu >= st, lu - st + 1, 0)  # position in the document + 1; 0 = not used before in it
        key = (cnt * dt(dmax) + lu) * dt(E) + tie  # larger = kept first; all distinct within a row
        ks = np.take_along_axis(key, ids[t].astype(np.int64), axis=1)  # [T, K]
        rank = (key[:, None, :] > ks[:, :, None]).sum(axis=2)  # [T, K] experts ranked above
        hist += np.bincount(rank.reshape(-1), minlength=E)[:E]
    return hist


def _check_log(log: np.ndarray, n_experts: int) -> np.ndarray:
    log = np.asarray(log)
    if log.ndim != 3:
        raise MoesiftError(f"routing_log must be [tokens, layers, top_k], got shape {log.shape}")
    if log.size and (log.min() < 0 or log.max() >= n_experts):
        raise MoesiftError(f"routing_log holds expert ids outside 0..{n_experts - 1}")
    return log


def srp_sch(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS, rhos=RHOS, stride: int = 1,
            want_srp: bool = True, want_sch: bool = True) -> dict[str, Any]:
    """SRP and SCH in one pass over the layers (the per-layer count arrays are shared)."""
    log = _check_log(log, n_experts)
    N, L, K = log.shape
    offs = _offsets(doc_offsets, N)
    rhos = [r for r in rhos if r * K <= n_experts]
    h_tot = {m: np.zeros(m + 1, dtype=np.int64) for m in seg_lens}
    r_tot = {m: np.zeros(n_experts, dtype=np.int64) for m in seg_lens}
    srp_layers, sch_layers = [], []
    for li in range(L):
        ids = log[:, li, :]
        C = _one_hot_cumsum(ids, n_experts)
        if want_srp:
            hs = srp_histograms(ids, offs, n_experts, seg_lens, C=C)
            srp_layers.append({str(m): srp_from_histogram(hs[m], m, K) for m in seg_lens})
            for m in seg_lens:
                h_tot[m] += hs[m]
        if want_sch:
            U = _last_use(ids, n_experts)
            row = {}
            for m in seg_lens:
                h = sch_ranks(ids, offs, n_experts, m, stride=stride, C=C, U=U)
                r_tot[m] += h
                row[str(m)] = _rates(h, rhos, K)
            sch_layers.append(row)
    out: dict[str, Any] = {}
    if want_srp:
        out["srp"] = {"overall": {str(m): srp_from_histogram(h_tot[m], m, K) for m in seg_lens}, "layers": srp_layers}
    if want_sch:
        out["sch"] = {"overall": {str(m): _rates(r_tot[m], rhos, K) for m in seg_lens}, "layers": sch_layers,
                      "rhos": rhos, "stride": stride}
    return out


def srp(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS) -> dict[str, Any]:
    """SRP per layer and overall for every segment length. log: [N, L, K]."""
    return srp_sch(log, doc_offsets, n_experts, seg_lens, want_sch=False)["srp"]


def sch(log: np.ndarray, doc_offsets, n_experts: int, seg_lens=SEG_LENS, rhos=RHOS, stride: int = 1) -> dict[str, Any]:
    """SCH per layer and overall for every segment length and cache size rho * top-k, evaluated at every
    `stride`-th token (each evaluated token's cache is exact: it depends only on the log)."""
    return srp_sch(log, doc_offsets, n_experts, seg_lens, rhos, stride=stride, want_srp=False)["sch"]


def _rates(h: np.ndarray, rhos, K: int) -> dict[str, float]:
    acts = h.sum()
    cum = np.cumsum(h)
    return {str(r): float(cum[r * K - 1] / acts) if acts else float("nan") for r in rhos}


def cache_hit_rates(log: np.ndarray, n_experts: int, capacities, policies=("lru", "lfu", "belady"),
                    layers=None) -> dict[str, Any]:
    """Hit rates of a per-layer cache of C experts for each policy, via `moesift.cachesim.simulate`, on the
    MoE layers `layers` (all by default); overall = hits / accesses summed over those layers."""
    from .cachesim import simulate

    log = _check_log(log, n_experts)
    N, L, K = log.shape
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    out: dict[str, Any] = {"capacities": [int(c) for c in capacities], "moe_layers": layers, "layers": [], "overall": {}}
    sums = {(p, c): [0, 0] for p in policies for c in capacities}
    for li in layers:
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


def locality(trace, seg_lens=SEG_LENS, rhos=RHOS, max_tokens: int | None = 8192, cache_tokens: int | None = 2048,
             cache_rhos=(2,), sch_stride: int | None = None, cache_layers: int | None = 6) -> dict[str, Any] | None:
    """Locality section of a report: SRP, SCH and cache-policy hit rates (None without a routing log).

    SRP and SCH use up to `max_tokens` logged tokens (whole documents spread over the log), SCH evaluated
    at every `sch_stride`-th of them (default: about 4096 evaluated tokens). The cache simulation replays
    up to `cache_tokens` of those tokens on `cache_layers` MoE layers spread evenly (None: all layers), for
    caches of rho * top-k experts per layer (`cache_rhos`; 2k is the setting of arXiv 2505.16056)."""
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
    }
    out.update(srp_sch(sub, sub_offs, E, seg_lens, rhos, stride=sch_stride or max(1, -(-sub.shape[0] // 4096))))
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
    if cache_layers is None or cache_layers >= L:
        lays = list(range(L))
    else:
        lays = sorted({int(round(x)) for x in np.linspace(0, L - 1, max(1, cache_layers))})
    out["cache"] = cache_hit_rates(csub, E, caps, layers=lays)
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
