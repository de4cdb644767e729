"""How concentrated routing is, and how far a resident set chosen from a trace can be trusted.

Conventions used everywhere in moesift:

- *coverage* of a resident set = share of a layer's routes (token x top-k selections) that land on it;
- `experts_for_coverage(counts, s)` = smallest number of the most-selected experts whose counts reach
  share ``s`` of the layer's routes (``cumsum >= s * total``; the WCER ``expert-trace/1`` rule);
- `select_top(scores, n)` = the ``n`` highest-scoring experts, ties to the lower expert id;
- *held-out coverage*: for each fold f, a set chosen on all folds but f, measured on fold f's routes;
  mean and standard deviation over folds.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..core.errors import MoesiftError

PCTS = (50, 80, 90, 95, 99)
# budgets as fractions of the experts of a layer (exact for 8, 64, 128, 256 experts)
BUDGETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
HEADLINE_BUDGETS = (0.25, 0.5, 0.75)


def budget_key(b: float) -> str:
    return f"{b:g}"


def budget_n(b: float, n_experts: int) -> int:
    """Experts kept at budget fraction `b` (at least 1)."""
    return max(1, min(n_experts, int(round(b * n_experts))))


# ---- one layer --------------------------------------------------------------------------------------


def _order(scores_row: np.ndarray) -> np.ndarray:
    """Expert ids from highest to lowest score, ties to the lower id."""
    s = np.asarray(scores_row, dtype=np.float64)
    return np.argsort(-s, kind="stable")


def select_top(scores_row: np.ndarray, n: int) -> np.ndarray:
    """Sorted ids of the `n` highest-scoring experts (ties to the lower id)."""
    n = int(n)
    if n < 0:
        raise MoesiftError(f"cannot keep {n} experts")
    return np.sort(_order(scores_row)[:n]).astype(np.int64)


def coverage_curve(counts_row: np.ndarray) -> np.ndarray:
    """Coverage of the n most-selected experts for n = 0..E: float [E+1] (all zeros for an empty layer)."""
    c = np.sort(np.asarray(counts_row, dtype=np.float64))[::-1]
    tot = c.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])
    return cum / tot if tot > 0 else np.zeros_like(cum)


def experts_for_coverage(counts_row: np.ndarray, share: float) -> int:
    """Smallest number of the most-selected experts whose counts reach `share` of the layer's routes.

    `share` may be a fraction (0.9) or a percentage (90). Exact integer arithmetic for whole percentages,
    so 0.9 of 1000 routes needs a cumulative count of 900, not 900.0000001.
    """
    share = float(share)
    if share > 1.0:
        share = share / 100.0
    if not 0.0 <= share <= 1.0:
        raise MoesiftError(f"coverage share {share} must lie in [0, 1]")
    c = np.sort(np.asarray(counts_row, dtype=np.int64))[::-1]
    tot = int(c.sum())
    if tot == 0 or share == 0.0:
        return 0
    cum = np.cumsum(c)
    pct = share * 100.0
    if abs(pct - round(pct)) < 1e-9:  # whole percentage: compare 100 * cum >= pct * total in integers
        need = cum * 100 >= int(round(pct)) * tot
    else:
        need = cum >= share * tot * (1 - 1e-12)
    return int(np.argmax(need)) + 1


def coverage_of(counts_row: np.ndarray, resident_ids) -> float:
    """Share of the layer's routes that land on `resident_ids`."""
    c = np.asarray(counts_row, dtype=np.float64)
    tot = c.sum()
    if tot <= 0:
        return float("nan")
    ids = np.asarray(list(resident_ids), dtype=np.int64)
    return float(c[ids].sum() / tot) if ids.size else 0.0


def gini(counts_row: np.ndarray) -> float:
    """Gini coefficient of expert loads (0 = perfectly even, (E-1)/E = all on one expert)."""
    x = np.sort(np.asarray(counts_row, dtype=np.float64))
    n, tot = x.size, x.sum()
    if tot <= 0 or n == 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float((2.0 * (i * x).sum()) / (n * tot) - (n + 1.0) / n)


def normalised_entropy(counts_row: np.ndarray) -> float:
    """Shannon entropy of the load distribution divided by log(E) (1 = uniform)."""
    x = np.asarray(counts_row, dtype=np.float64)
    tot = x.sum()
    if tot <= 0 or x.size < 2:
        return float("nan")
    p = x[x > 0] / tot
    return float(-(p * np.log(p)).sum() / np.log(x.size))


def layer_stats(counts_row: np.ndarray, hot_factor: float = 2.0) -> dict[str, Any]:
    """Concentration figures of one layer's selection counts."""
    c = np.asarray(counts_row, dtype=np.int64)
    E = c.size
    tot = int(c.sum())
    mean = tot / E if E else 0.0
    order = _order(c)
    hot = [int(e) for e in order if mean > 0 and c[e] >= hot_factor * mean]
    efc = {str(p): experts_for_coverage(c, p) for p in PCTS}
    return {
        "routes": tot,
        "experts_for_coverage": efc,
        "fraction_for_coverage": {k: v / E for k, v in efc.items()},
        "imbalance": float(c.max() / mean) if mean > 0 else float("nan"),
        "entropy": normalised_entropy(c),
        "gini": gini(c),
        "hot": hot,
        "hot_share": float(c[hot].sum() / tot) if tot and hot else 0.0,
        "never_selected": [int(e) for e in np.flatnonzero(c == 0)],
        "top": [[int(e), int(c[e])] for e in order[: min(E, 8)]],
    }


# ---- unseen mass -------------------------------------------------------------------------------------


def good_turing_unseen(counts_row: np.ndarray, tokens: int) -> dict[str, float]:
    """Estimated share of future routes that fall on experts this trace never selected.

    Each token selects top-k *distinct* experts, so counts are incidence counts over `tokens` sampling
    units. Turing's estimate of the unseen mass is Q1 / U (Q1 = experts selected on exactly one token,
    U = routes). `chao` adds the Chao-Jost (2012) incidence correction
    (T-1) Q1 / ((T-1) Q1 + 2 Q2), which matters when Q2 is small. Both assume tokens are independent;
    routing within a document is correlated, so treat them as lower bounds and compare with the
    held-out figure (share of a left-out fold's routes on experts the other folds never selected).
    """
    c = np.asarray(counts_row, dtype=np.int64)
    U = int(c.sum())
    if U == 0:
        return {"good_turing": float("nan"), "chao": float("nan"), "singletons": 0, "doubletons": 0}
    q1 = int((c == 1).sum())
    q2 = int((c == 2).sum())
    T = max(int(tokens), 1)
    gt = q1 / U
    if q1 == 0:
        corr = 0.0
    elif q2 > 0:
        corr = (T - 1) * q1 / ((T - 1) * q1 + 2 * q2)
    else:
        corr = (T - 1) * (q1 - 1) / ((T - 1) * (q1 - 1) + 2) if q1 > 1 else (T - 1) / (T + 1)
    return {"good_turing": gt, "chao": gt * corr, "singletons": q1, "doubletons": q2}


# ---- folds -------------------------------------------------------------------------------------------


def _fold_curves(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Coverage of test routes by the n top experts of `train`, n = 0..E: [L, E+1] (nan for empty layers).
    train, test: [L, E]."""
    order = np.argsort(-train.astype(np.float64), axis=1, kind="stable")
    got = np.take_along_axis(test.astype(np.float64), order, axis=1)
    tot = got.sum(axis=1, keepdims=True)
    cum = np.concatenate([np.zeros((got.shape[0], 1)), np.cumsum(got, axis=1)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, cum / np.where(tot > 0, tot, 1), np.nan)


def heldout_curves(fold_scores: np.ndarray, fold_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-fold-out coverage at every budget n = 0..E.

    Returns (mean [L, E+1], std [L, E+1], per_fold [F, L, E+1]); folds with no routes in a layer are left
    out of that layer's mean."""
    fs = np.asarray(fold_scores, dtype=np.float64)
    fc = np.asarray(fold_counts, dtype=np.float64)
    if fs.shape != fc.shape or fs.ndim != 3:
        raise MoesiftError(f"fold scores {fs.shape} and fold counts {fc.shape} must both be [F, L, E]")
    F = fs.shape[0]
    if F < 2:
        raise MoesiftError("held-out coverage needs at least 2 folds")
    total = fs.sum(axis=0)
    per = np.stack([_fold_curves(total - fs[f], fc[f]) for f in range(F)])
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(per, axis=0)
        std = np.nanstd(per, axis=0)
    return mean, std, per


class _quiet:
    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)


def heldout_coverage(fold_scores: np.ndarray, fold_counts: np.ndarray, n_keep) -> tuple[np.ndarray, np.ndarray]:
    """Held-out coverage of `n_keep` experts per layer (int or [L]): (mean [L], std [L]) over folds.

    For each fold f the set is the `n_keep` top experts by the scores of all folds but f; its coverage is the
    share of fold f's routes it holds."""
    mean, std, _ = heldout_curves(fold_scores, fold_counts)
    L = mean.shape[0]
    n = np.broadcast_to(np.asarray(n_keep, dtype=np.int64), (L,))
    if (n < 0).any() or (n > mean.shape[1] - 1).any():
        raise MoesiftError(f"n_keep must lie in 0..{mean.shape[1] - 1}")
    rows = np.arange(L)
    return mean[rows, n], std[rows, n]


def heldout_unseen(fold_counts: np.ndarray) -> np.ndarray:
    """Per layer: mean over folds of the share of fold f's routes on experts no other fold selected."""
    fc = np.asarray(fold_counts, dtype=np.float64)
    total = fc.sum(axis=0)
    vals = []
    for f in range(fc.shape[0]):
        rest = total - fc[f]
        tot = fc[f].sum(axis=1)
        miss = (fc[f] * (rest == 0)).sum(axis=1)
        vals.append(np.where(tot > 0, miss / np.where(tot > 0, tot, 1), np.nan))
    with _quiet():
        return np.nanmean(np.stack(vals), axis=0)


def learning_curve(fold_counts: np.ndarray, top_k: int, budgets=HEADLINE_BUDGETS, tolerance: float = 0.01) -> dict[str, Any]:
    """Held-out coverage against tokens traced, from subsets of folds.

    For s = 1..F-1 folds: for every fold f, a set chosen on the s folds after f (cyclically) is measured on
    those s folds (in-sample) and on fold f (held-out). The gap in-sample minus held-out (mean over layers)
    is fitted as gap = a * tokens^b on the points with a positive gap; solving for gap = `tolerance` gives
    the tokens needed for the two to agree within 1 point. Reported only when the fit decreases
    (b < 0) over at least two points."""
    fc = np.asarray(fold_counts, dtype=np.float64)
    F, L, E = fc.shape
    tokens_per_fold = fc.sum(axis=2).max(axis=1) / max(int(top_k), 1)
    points = []
    for s in range(1, F):
        tok, ins, held = [], {b: [] for b in budgets}, {b: [] for b in budgets}
        for f in range(F):
            idx = [(f + 1 + i) % F for i in range(s)]
            train = fc[idx].sum(axis=0)
            tok.append(tokens_per_fold[idx].sum())
            cin = _fold_curves(train, train)
            cout = _fold_curves(train, fc[f])
            for b in budgets:
                n = budget_n(b, E)
                ins[b].append(cin[:, n])
                held[b].append(cout[:, n])
        with _quiet():
            row = {"folds": s, "tokens": float(np.mean(tok))}
            for b in budgets:
                row[budget_key(b)] = {
                    "in_sample": float(np.nanmean(ins[b])),
                    "heldout": float(np.nanmean(held[b])),
                    "heldout_std": float(np.nanstd(np.nanmean(np.stack(held[b]), axis=1))),
                }
        points.append(row)
    full_tokens = float(tokens_per_fold.sum())
    full = _fold_curves(fc.sum(axis=0), fc.sum(axis=0))
    estimates = {}
    for b in budgets:
        k = budget_key(b)
        n = budget_n(b, E)
        with _quiet():
            full_in = float(np.nanmean(full[:, n]))
        last_gap = points[-1][k]["in_sample"] - points[-1][k]["heldout"] if points else float("nan")
        x = np.array([p["tokens"] for p in points])
        g = np.array([p[k]["in_sample"] - p[k]["heldout"] for p in points])
        ok = (g > 0) & (x > 0)
        est: dict[str, Any] = {"gap_at_full": full_in - points[-1][k]["heldout"] if points else float("nan"),
                               "gap_last_subset": last_gap}
        if points and est["gap_at_full"] <= tolerance:
            est.update(tokens_needed=full_tokens, status="agrees",
                       note=f"in-sample and held-out already agree within {tolerance * 100:g} point at this trace size")
        elif ok.sum() >= 2:
            b_, a_ = np.polyfit(np.log(x[ok]), np.log(g[ok]), 1)
            if b_ < 0:
                need = float(np.exp((np.log(tolerance) - a_) / b_))
                est.update(tokens_needed=need, status="extrapolated", exponent=float(b_),
                           note=f"gap ~ tokens^{b_:.2f}; extrapolated from {int(ok.sum())} fold subsets")
            else:
                est.update(tokens_needed=None, status="cannot",
                           note="the gap does not shrink with more folds; trace more documents")
        else:
            est.update(tokens_needed=None, status="cannot",
                       note="too few fold subsets with a positive gap to extrapolate")
        estimates[k] = est
    return {"points": points, "tokens_traced": full_tokens, "tolerance": tolerance, "estimates": estimates}


# ---- whole trace -------------------------------------------------------------------------------------


def _phase_stats(counts: np.ndarray) -> list[dict[str, Any]]:
    return [layer_stats(row) for row in counts]


def analyse(trace) -> dict[str, Any]:
    """Every concentration and trust figure of one trace (no model needed)."""
    counts = trace.counts
    L, E = counts.shape
    K = trace.top_k
    moe_layers = list(trace.model.get("moe_layers") or range(L))
    routes = counts.sum(axis=1)
    tokens = int(routes.max() // K) if K else 0
    curves = np.stack([coverage_curve(r) for r in counts])  # [L, E+1]
    layers = []
    for i in range(L):
        st = layer_stats(counts[i])
        st["layer"] = int(moe_layers[i]) if i < len(moe_layers) else i
        st["moe_index"] = i
        st["unseen_mass"] = good_turing_unseen(counts[i], routes[i] // K if K else 0)
        st["in_sample_coverage"] = {budget_key(b): float(curves[i, budget_n(b, E)]) for b in BUDGETS}
        layers.append(st)
    out: dict[str, Any] = {
        "model": {k: trace.model.get(k) for k in ("name", "model_type", "n_experts", "top_k", "n_shared", "moe_layers")},
        "workload": {k: trace.workload.get(k) for k in ("label", "documents", "prefill_tokens", "decode_tokens")},
        "n_layers": L,
        "n_experts": E,
        "top_k": K,
        "tokens": tokens,
        "budgets": [budget_key(b) for b in BUDGETS],
        "layers": layers,
        "coverage_curves": curves,
    }
    fold = trace.get("fold_counts")
    has_folds = fold is not None and fold.shape[0] >= 2 and (fold.sum(axis=(1, 2)) > 0).sum() >= 2
    if has_folds:
        fold = fold.astype(np.int64)
        keep = fold.sum(axis=(1, 2)) > 0
        fold = fold[keep]
        mean, std, _ = heldout_curves(fold, fold)
        unseen_h = heldout_unseen(fold)
        for i, st in enumerate(layers):
            st["heldout_coverage"] = {budget_key(b): float(mean[i, budget_n(b, E)]) for b in BUDGETS}
            st["heldout_std"] = {budget_key(b): float(std[i, budget_n(b, E)]) for b in BUDGETS}
            st["unseen_mass"]["heldout"] = float(unseen_h[i])
            # the set sized for p% in-sample, measured on held-out folds
            st["heldout_at_coverage_budget"] = {
                str(p): float(mean[i, st["experts_for_coverage"][str(p)]]) for p in PCTS
            }
        out["heldout_curves"] = mean
        out["heldout_curves_std"] = std
        out["n_folds"] = int(fold.shape[0])
        out["learning_curve"] = learning_curve(fold, K)
    out["overall"] = _overall(out, has_folds)
    pre, dec = trace.get("prefill_counts"), trace.get("decode_counts")
    if pre is not None and dec is not None and dec.sum() > 0 and pre.sum() > 0:
        out["phases"] = _phases(pre.astype(np.int64), dec.astype(np.int64))
    return out


def _overall(a: dict[str, Any], has_folds: bool) -> dict[str, Any]:
    layers, E = a["layers"], a["n_experts"]
    with _quiet():
        o: dict[str, Any] = {
            "mean_experts_for_coverage": {str(p): float(np.mean([s["experts_for_coverage"][str(p)] for s in layers])) for p in PCTS},
            "mean_fraction_for_coverage": {str(p): float(np.mean([s["experts_for_coverage"][str(p)] / E for s in layers])) for p in PCTS},
            "max_experts_for_coverage": {str(p): int(max(s["experts_for_coverage"][str(p)] for s in layers)) for p in PCTS},
            "mean_imbalance": float(np.nanmean([s["imbalance"] for s in layers])),
            "mean_entropy": float(np.nanmean([s["entropy"] for s in layers])),
            "mean_gini": float(np.nanmean([s["gini"] for s in layers])),
            "never_selected": int(sum(len(s["never_selected"]) for s in layers)),
            "unseen_mass_good_turing": float(np.nanmean([s["unseen_mass"]["good_turing"] for s in layers])),
            "unseen_mass_chao": float(np.nanmean([s["unseen_mass"]["chao"] for s in layers])),
            "in_sample_coverage": {b: float(np.nanmean([s["in_sample_coverage"][b] for s in layers])) for b in a["budgets"]},
        }
        o["mean_fraction_for_90"] = o["mean_fraction_for_coverage"]["90"]
        if has_folds:
            o["heldout_coverage"] = {b: float(np.nanmean([s["heldout_coverage"][b] for s in layers])) for b in a["budgets"]}
            o["heldout_std"] = {b: float(np.nanmean([s["heldout_std"][b] for s in layers])) for b in a["budgets"]}
            o["unseen_mass_heldout"] = float(np.nanmean([s["unseen_mass"]["heldout"] for s in layers]))
            o["heldout_at_coverage_budget"] = {
                str(p): float(np.nanmean([s["heldout_at_coverage_budget"][str(p)] for s in layers])) for p in PCTS
            }
    return o


def _phases(pre: np.ndarray, dec: np.ndarray) -> dict[str, Any]:
    """Prefill and decode apart, and how well a set chosen on one covers the other (at half the experts)."""
    L, E = pre.shape
    n = budget_n(0.5, E)
    out: dict[str, Any] = {}
    for name, c in (("prefill", pre), ("decode", dec)):
        st = _phase_stats(c)
        out[name] = {
            "routes": int(c.sum()),
            "experts_for_coverage": [s["experts_for_coverage"] for s in st],
            "mean_fraction_for_90": float(np.mean([s["experts_for_coverage"]["90"] / E for s in st])),
            "mean_entropy": float(np.nanmean([s["entropy"] for s in st])),
            "mean_gini": float(np.nanmean([s["gini"] for s in st])),
        }
    with _quiet():
        out["prefill_set_on_decode"] = float(np.nanmean([coverage_of(dec[i], select_top(pre[i], n)) for i in range(L)]))
        out["decode_set_on_prefill"] = float(np.nanmean([coverage_of(pre[i], select_top(dec[i], n)) for i in range(L)]))
    out["budget"] = budget_key(0.5)
    return out
