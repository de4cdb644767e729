"""Inter-layer expert affinity from a trace's ``transitions`` [L-1, E, E] (tokens routed to e at MoE layer l
and to e' at MoE layer l+1): the signal ExFlow (arXiv 2401.08383) uses to place experts so that tokens stay
on one device.

- ``conditional(T)``: P(e' at l+1 | e at l) = T[l, e, e'] / sum_e' T[l, e, e'];
- strength against the independent baseline P(e') (the next layer's marginal): mutual information of the
  pair (e, e'), normalised by the next layer's entropy (0 = independent, 1 = e determines e'), with the
  Miller-Madow bias an independent sample of the same size would show; mean lift of the strongest
  successor max_e' P(e'|e) / P(e');
- most affine chains: from every expert of the first MoE layer follow the most likely successor layer by
  layer; chains ranked by their joint probability p(e_0) prod P(e_{l+1} | e_l).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import MoesiftError


def conditional(transitions: np.ndarray) -> np.ndarray:
    """P(e' | e) [L-1, E, E] (rows of experts never selected are zero)."""
    t = np.asarray(transitions, dtype=np.float64)
    if t.ndim != 3 or t.shape[1] != t.shape[2]:
        raise MoesiftError(f"transitions must be [L-1, E, E], got {t.shape}")
    rs = t.sum(axis=2, keepdims=True)
    return np.divide(t, rs, out=np.zeros_like(t), where=rs > 0)


def layer_strength(t: np.ndarray) -> dict[str, float]:
    """Strength of one layer pair's affinity against independence."""
    t = np.asarray(t, dtype=np.float64)
    n = t.sum()
    E = t.shape[0]
    if n <= 0:
        return {"mi": float("nan"), "nmi": float("nan"), "mi_bias": float("nan"), "lift": float("nan"), "pairs": 0}
    p = t / n
    pr = p.sum(axis=1)
    pc = p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    hc = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    r_used, c_used = int((pr > 0).sum()), int((pc > 0).sum())
    bias = (r_used - 1) * (c_used - 1) / (2.0 * n)  # Miller-Madow: expected MI of an independent sample
    cond = np.divide(t, t.sum(axis=1, keepdims=True), out=np.zeros_like(t), where=t.sum(axis=1, keepdims=True) > 0)
    best = cond.argmax(axis=1)
    rows = np.flatnonzero(pr > 0)
    lift = cond[rows, best[rows]] / np.maximum(pc[best[rows]], 1e-300)
    return {
        "mi": mi,
        "nmi": mi / hc if hc > 0 else float("nan"),
        "mi_bias": bias,
        "nmi_excess": max(0.0, mi - bias) / hc if hc > 0 else float("nan"),
        "lift": float(np.average(lift, weights=pr[rows])),
        "pairs": int(n),
        "experts": E,
    }


def top_pairs(t: np.ndarray, n: int = 5, min_count: int = 5) -> list[dict[str, Any]]:
    """The `n` pairs (e, e') with the highest lift P(e'|e) / P(e') among pairs seen at least `min_count` times."""
    t = np.asarray(t, dtype=np.float64)
    tot = t.sum()
    if tot <= 0:
        return []
    rs = t.sum(axis=1, keepdims=True)
    pc = t.sum(axis=0) / tot
    cond = np.divide(t, rs, out=np.zeros_like(t), where=rs > 0)
    lift = np.divide(cond, pc[None, :], out=np.zeros_like(t), where=pc[None, :] > 0)
    lift[t < min_count] = 0
    flat_l = lift.reshape(-1)
    cand = np.argpartition(-flat_l, min(n, flat_l.size - 1))[: n + 1] if flat_l.size > n + 1 else np.arange(flat_l.size)
    flat = cand[np.lexsort((cand, -flat_l[cand]))][:n]
    out = []
    for f in flat:
        e, e2 = divmod(int(f), t.shape[1])
        if lift[e, e2] <= 0:
            break
        out.append({"from": e, "to": e2, "p": float(cond[e, e2]), "lift": float(lift[e, e2]), "count": int(t[e, e2])})
    return out


def chains(transitions: np.ndarray, n: int = 5) -> list[dict[str, Any]]:
    """Most affine chains: greedy most-likely successor from each start expert, ranked by joint probability."""
    t = np.asarray(transitions, dtype=np.float64)
    if t.shape[0] == 0:
        return []
    cond = conditional(t)
    p0 = t[0].sum(axis=1)
    p0 = p0 / p0.sum() if p0.sum() > 0 else p0
    E = t.shape[1]
    cur = np.arange(E)
    logp = np.log(np.maximum(p0, 1e-300))
    path = [cur]
    for li in range(t.shape[0]):
        nxt = cond[li][cur].argmax(axis=1)
        logp = logp + np.log(np.maximum(cond[li][cur, nxt], 1e-300))
        cur = nxt
        path.append(cur)
    paths = np.stack(path, axis=1)  # [E, L]
    order = np.argsort(-logp, kind="stable")
    out = []
    for s in order[:n]:
        if p0[s] <= 0:
            continue
        steps = [float(cond[li][paths[s, li], paths[s, li + 1]]) for li in range(t.shape[0])]
        out.append({"experts": [int(x) for x in paths[s]], "log_prob": float(logp[s]),
                    "mean_step_prob": float(np.mean(steps)) if steps else float("nan")})
    return out


def affinity_summary(trace, n_pairs: int = 5, n_chains: int = 5) -> dict[str, Any] | None:
    """Affinity section of a report (None when the trace has no transitions or a single MoE layer)."""
    t = trace.get("transitions")
    if t is None or t.shape[0] == 0 or t.sum() == 0:
        return None
    layers = []
    for li in range(t.shape[0]):
        s = layer_strength(t[li])
        s["moe_index"] = li
        s["top_pairs"] = top_pairs(t[li], n_pairs)
        layers.append(s)
    with np.errstate(invalid="ignore"):
        overall = {
            "mean_nmi": float(np.nanmean([s["nmi"] for s in layers])),
            "mean_nmi_excess": float(np.nanmean([s["nmi_excess"] for s in layers])),
            "mean_lift": float(np.nanmean([s["lift"] for s in layers])),
        }
    return {"overall": overall, "layers": layers, "chains": chains(t, n_chains)}
