"""Simulated figures of an expert placement: per-layer load balance, the share of layer-to-layer hops that
cross GPUs, and all-to-all bytes per token (see `moesift.selection.place` for the model and the figures)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import MoesiftError


def _gpu_share(phy2log: np.ndarray, E: int, G: int) -> np.ndarray:
    """[L, E, G]: share of expert e's tokens that run on GPU g (replicas split evenly)."""
    L, P = phy2log.shape
    per = P // G
    share = np.zeros((L, E, G))
    for li in range(L):
        ok = phy2log[li] >= 0
        np.add.at(share[li], (phy2log[li][ok], (np.arange(P) // per)[ok]), 1.0)
    tot = share.sum(-1, keepdims=True)
    if (tot == 0).any():
        raise MoesiftError("a placement leaves an expert without a slot")
    return share / tot


def transitions_from_log(log: np.ndarray, E: int) -> np.ndarray:
    """Hop counts T [L-1, E, E] between consecutive MoE layers from a routing log [N, L, K] (-1 = none)."""
    N, L, K = log.shape
    T = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    for li in range(L - 1):
        a = log[:, li, :].astype(np.int64)
        b = log[:, li + 1, :].astype(np.int64)
        idx = (a[:, :, None] * E + b[:, None, :]).reshape(-1)
        idx = idx[(np.repeat(a, K, axis=1).reshape(-1) >= 0) & (np.tile(b, (1, K)).reshape(-1) >= 0)]
        T[li] = np.bincount(idx, minlength=E * E).reshape(E, E)
    return T


def _bytes_per_token(log: np.ndarray, phy2log: np.ndarray, E: int, G: int, hidden: int, dtype_bytes: int) -> float:
    """All-to-all bytes a token sends and receives over the MoE layers, mean over the logged tokens."""
    N, L, K = log.shape
    P = phy2log.shape[1]
    per = P // G
    # replicas of each logical expert, used round-robin over tokens
    l2p = [[np.flatnonzero(phy2log[li] == e) for e in range(E)] for li in range(L)]
    tok = np.arange(N)
    remote = 0.0
    prev = None
    for li in range(L):
        ids = log[:, li, :].astype(np.int64)
        cnt = np.array([len(x) for x in l2p[li]])
        width = cnt.max()
        table = np.full((E, width), -1)
        for e in range(E):
            table[e, : cnt[e]] = l2p[li][e]
        safe = np.maximum(ids, 0)
        slot = table[safe, tok[:, None] % cnt[safe]]
        g = slot // per
        mask = np.zeros(N, dtype=np.uint64)
        for k in range(K):
            valid = ids[:, k] >= 0
            mask[valid] |= np.left_shift(np.uint64(1), g[valid, k].astype(np.uint64))
        n_gpus = np.bitwise_count(mask).astype(np.float64)
        if prev is None:
            remote += float((n_gpus * (1 - 1 / G)).sum())
        else:
            remote += float(np.bitwise_count(mask & ~prev).sum())
        prev = mask
    return 2.0 * hidden * dtype_bytes * remote / max(N, 1)


def simulate_placement(trace, phy2log: np.ndarray, G: int, hidden: int | None = None, dtype_bytes: int = 2
                       ) -> dict[str, Any]:
    """Load balance, cross-GPU hop share and all-to-all bytes of one placement (phy2log [L, E + R])."""
    E = trace.n_experts
    counts = trace.counts.astype(np.float64)
    share = _gpu_share(phy2log, E, G)
    load = np.einsum("le,leg->lg", counts, share)
    mean = load.mean(1)
    ratio = np.where(mean > 0, load.max(1) / np.where(mean > 0, mean, 1), 1.0)
    out: dict[str, Any] = {
        "load_max_over_mean": float(ratio.mean()),
        "load_max_over_mean_worst_layer": float(ratio.max()),
        "load_max_over_mean_per_layer": [float(x) for x in ratio],
    }
    log = trace.get("routing_log")
    if log is not None and log.shape[0] > 0:
        T = transitions_from_log(log, E)
        out["source"] = "routing_log"
    elif trace.get("transitions") is not None:
        T = trace.get("transitions").astype(np.int64)
        out["source"] = "transitions"
    else:
        T = None
        out["source"] = "counts"
    if T is not None and len(T):
        same = sum(float(np.einsum("ij,ig,jg->", T[li], share[li], share[li + 1])) for li in range(len(T)))
        tot = float(T.sum())
        out["hops"] = tot
        out["cross_gpu_hop_share"] = float(1 - same / tot) if tot else 0.0
    if hidden and log is not None and log.shape[0] > 0:
        if G > 64:
            out["all_to_all_note"] = "all-to-all bytes are simulated for at most 64 GPUs"
        else:
            out["all_to_all_bytes_per_token"] = _bytes_per_token(log, phy2log, E, G, hidden, dtype_bytes)
    return out
