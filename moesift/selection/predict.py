"""What a plan predicts: in-sample coverage per layer, held-out coverage over the traces' folds (a set
chosen the plan's way from the other folds), the calibrated error of sets the calibration measured, and
why layers keep more experts than the budget asked for."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .units import SelectionSpec, flatten_units, selection_units, units_for_count


def heldout(sp: SelectionSpec, fold_scores: np.ndarray, fold_counts: np.ndarray,
             resident: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer mean and std over folds of the share of a left-out fold's routes covered by a set chosen
    the way the plan chose its own (same selection units: experts, or whole groups; same number of units)
    from the scores of the other folds."""
    F, L, E = fold_counts.shape
    total = fold_scores.sum(axis=0)
    cov = np.full((F, L), np.nan)
    for p in range(L):
        n_units = units_for_count(selection_units(sp, p, total[p]), len(resident[p]))
        for f in range(F):
            routes = fold_counts[f, p].sum()
            if routes <= 0:
                continue
            if len(resident[p]) >= E:
                cov[f, p] = 1.0  # a layer kept whole covers everything
                continue
            ids = flatten_units(selection_units(sp, p, total[p] - fold_scores[f, p]), n_units)
            cov[f, p] = fold_counts[f, p, ids].sum() / routes
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers no fold routed to stay NaN
        return np.nanmean(cov, axis=0), np.nanstd(cov, axis=0)


def calibrated_error(cal: Any, resident: Sequence[Sequence[int]], mode: str = "whole") -> list[float | None]:
    """Per layer, the calibrated relative output error of a resident set that drops a prefix of the
    calibration's removal order (None for other sets: the calibration did not measure them)."""
    out: list[float | None] = []
    for e, r in zip(cal.layers, resident, strict=True):
        if e.get("order") is None:
            out.append(0.0)
            continue
        e = cal.entry(e, mode)
        keep = set(r)
        dropped = [not (set(u) & keep) for u in e["order"]]
        n = dropped.index(False) if False in dropped else len(dropped)
        prefix = all(not d for d in dropped[n:]) and all(set(u) <= keep for u in e["order"][n:])
        out.append(float(e["error"][n]) if prefix else None)
    return out


def budget_note(sp: SelectionSpec, kind: str, value: Any, resident: Sequence[Sequence[int]], uniform: bool,
                allocate: bool) -> str | None:
    """Why layers keep more experts than a --keep / --keep-experts budget asked for (None when none do)."""
    if kind not in ("keep", "keep_experts"):
        return None
    L = len(resident)
    asked = int(round(float(value) * sp.n_experts)) if kind == "keep" else int(value)
    raised = [p for p in range(L) if len(resident[p]) > asked]
    if not raised:
        return None
    why = []
    if any(p in sp.hash_pos for p in raised):
        why.append("hash-routed layers are kept whole")
    if sp.grouped and sp.group_mode == "whole":
        why.append(f"the router picks {sp.topk_group or 1} of {sp.n_group} expert groups per token, so "
                   f"whole groups are kept and at least {sp.topk_group or 1} of them (--groups equal keeps "
                   "the same number in every group instead)")
    elif sp.grouped:
        why.append(f"the same number of experts is kept in every one of the {sp.n_group} groups, at least "
                   f"{sp.equal_floor()} (a group's score needs {sp.group_score_top} and the "
                   f"{sp.topk_group or sp.n_group} selectable groups top-k {sp.top_k})")
    if uniform:
        why.append("--uniform gives every layer the largest count")
    if allocate:
        why.append("--allocate moves experts between layers under the same total")
    return (f"the budget asks for {asked} experts per layer; {len(raised)} of {L} MoE layers keep "
            f"more (up to {max(len(resident[p]) for p in raised)}): " + "; ".join(why or ["top-k"]))


def heldout_coverage(sp: SelectionSpec, bank: Any, share: np.ndarray, strategy: str, scores: np.ndarray,
                     resident: Sequence[Sequence[int]]) -> tuple[Any, Any, str | None, float | None]:
    """(mean, std per layer of held-out coverage, or None; the note when it cannot be measured; the in-sample
    minus held-out gap of count-chosen sets of the same sizes, for strategies not kept per fold)."""
    folds = bank.fold_counts()
    if folds is None:
        return None, None, None, None
    L = len(resident)
    sizes = [len(r) for r in resident]
    if strategy in ("frequency", "random"):
        # random sets do not depend on the data: each fold is held out for them as it stands
        fold_scores = folds if strategy == "frequency" else np.broadcast_to(scores, folds.shape).copy()
        held_mean, held_std = heldout(sp, fold_scores, folds, resident)
        return held_mean, held_std, None, None
    # weighted / saliency scores are not kept per fold, so this set cannot be chosen without a fold
    # and measured on it. Report how optimistic in-sample coverage is for count-chosen sets of the
    # same sizes instead, and leave the held-out figure empty rather than quote another set's.
    f_sets = [flatten_units(u, units_for_count(u, sizes[p]))
              for p, u in ((p, selection_units(sp, p, share[p])) for p in range(L))]
    f_mean, _ = heldout(sp, folds, folds, f_sets)
    tot = share.sum(axis=1)
    f_in = [float(share[p, f_sets[p]].sum() / tot[p]) if tot[p] > 0 else np.nan for p in range(L)]
    gaps = np.asarray(f_in) - np.asarray(f_mean, dtype=np.float64)
    freq_gap = float(np.nanmean(gaps)) if np.isfinite(gaps).any() else None
    held_note = (f"{strategy} scores are not kept per fold, so the held-out coverage of this set cannot be "
                 f"measured; for count-chosen sets of the same sizes in-sample coverage exceeds held-out by "
                 f"{freq_gap if freq_gap is not None else float('nan'):.4f}")
    return None, None, held_note, freq_gap


def predictions(sp: SelectionSpec, bank: Any, share: np.ndarray, resident: list[list[int]], strategy: str,
                scores: np.ndarray, cal: Any, note: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the plan's layer entries, its predictions): coverage in-sample and held out, the budget note, and
    the calibrated error when a calibration ranked the experts."""
    L = len(resident)
    insample = [float(share[p, resident[p]].sum() / share[p].sum()) if share[p].sum() > 0 else None for p in range(L)]
    held_mean, held_std, held_note, freq_gap = heldout_coverage(sp, bank, share, strategy, scores, resident)
    layers = []
    positions = sp.moe_layers[0] is None
    for p in range(L):
        e = {"layer": p if positions else sp.moe_layers[p], "moe_index": p, "resident": resident[p],
             "n_resident": len(resident[p]), "coverage": insample[p]}
        if held_mean is not None:
            e["heldout_coverage"] = None if np.isnan(held_mean[p]) else float(held_mean[p])
            e["heldout_std"] = None if np.isnan(held_std[p]) else float(held_std[p])
        layers.append(e)
    vals = [c for c in insample if c is not None]
    pred: dict[str, Any] = {
        "coverage": float(np.mean(vals)) if vals else None,
        "heldout_coverage": float(np.nanmean(held_mean)) if held_mean is not None else None,
        "experts_resident": int(sum(len(r) for r in resident)),
        "experts_total": int(L * sp.n_experts),
    }
    if note:
        pred["budget_note"] = note
    if strategy == "weighted":
        pred["strategy_note"] = ("weighted ranks experts by the routing weights the model applied (weight_mass, after "
                                 "top-k renormalisation), not by the router probability before it (selected_prob_mass, "
                                 "WCER's per_layer_weight_mass)")
    if cal is not None:
        ce = calibrated_error(cal, resident, sp.group_mode)
        for e, c in zip(layers, ce, strict=True):
            e["calibrated_error"] = c
        known = [c for c in ce if c is not None]
        pred["calibrated_error"] = float(np.mean(known)) if known else None
    if held_note:
        pred["heldout_note"] = held_note
        pred["frequency_insample_minus_heldout"] = freq_gap
    elif held_mean is None:
        pred["heldout_note"] = "the traces have no folds; held-out coverage cannot be estimated"
    return layers, pred
