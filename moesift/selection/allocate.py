"""How many selection units each MoE layer keeps under a budget: the same count everywhere, the smallest
set reaching a coverage, or a total (experts, or checkpoint bytes for --memory) spread over layers
greedily by what each next unit is worth (coverage, the strategy's score share, or calibrated error)."""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.values import fmt_bytes
from .units import SelectionSpec, flatten_units, min_units, selection_units, units_for_count


def auto_group_modes(sp: SelectionSpec, budget: dict[str, Any], cal: Any = None) -> list[str]:
    """The group modes `groups="auto"` tries, in order: whole groups, unless keeping the same number in
    every group comes closer to a --keep / --keep-experts budget (one below the whole-group floor), or, for
    the calibrated strategy where both keep the same count, the calibration measured a lower end-to-end KL
    for the equal-count sets; for --memory whole groups first, then the same count when whole groups do
    not fit."""
    if budget["kind"] == "memory":
        return ["whole", "equal"]
    if budget["kind"] not in ("keep", "keep_experts"):
        return ["whole"]
    n = int(round(budget["value"] * sp.n_experts)) if budget["kind"] == "keep" else int(budget["value"])
    row = np.zeros(sp.n_experts)
    kept = {}
    for mode in ("whole", "equal"):
        s = dataclasses.replace(sp, group_mode=mode)
        units = selection_units(s, 0, row)
        kept[mode] = len(flatten_units(units, max(units_for_count(units, n), min_units(s, -1, units))))
    if kept["equal"] != kept["whole"]:
        return ["equal"] if kept["equal"] < kept["whole"] else ["whole"]
    if cal is not None:
        kl = {mode: cal.uniform_kl(mode, kept[mode], sp.n_experts) for mode in ("whole", "equal")}
        if kl["whole"] is not None and kl["equal"] is not None and kl["equal"] < kl["whole"]:
            return ["equal"]
    return ["whole"]


def select_resident(
    sp: SelectionSpec, scores: np.ndarray, share: np.ndarray, budget: dict[str, Any], uniform: bool, index: Any,
    gain: Any = None,
) -> list[list[int]]:
    """Resident ids per MoE position under the budget. `gain(p, n)`: with --allocate, what the n-th unit of
    layer p (in score order) is worth; a --keep / --keep-experts total is then spread over layers by it."""
    L, E = scores.shape
    units = [selection_units(sp, p, scores[p]) for p in range(L)]
    mins = [min_units(sp, p, units[p]) for p in range(L)]
    kind, value = budget["kind"], budget["value"]
    if kind in ("keep", "keep_experts"):
        n = int(round(value * E)) if kind == "keep" else int(value)
        what = f"--keep {value} keeps {n} of {E} experts per layer" if kind == "keep" else f"--keep-experts {n}"
        if n > E:
            raise MoesiftError(f"{what}, but the model has only {E} experts per layer")
        if n < sp.top_k:
            raise MoesiftError(
                f"cannot meet the plan: {what}, below top-k {sp.top_k}; the router needs at least {sp.top_k} "
                "resident experts per layer (raise the budget)"
            )
        counts = [len(units[p]) if p in sp.hash_pos else max(units_for_count(units[p], n), mins[p]) for p in range(L)]
        if gain is not None:
            counts = _allocate_count(sp, units, mins, n, gain)
    elif kind == "coverage":
        if not 0 < value <= 1:
            raise MoesiftError(f"--coverage must be in (0, 1]; got {value}")
        counts = []
        for p in range(L):
            n, cov = 0, 0.0
            total = share[p].sum()
            while n < len(units[p]) and (total <= 0 or cov < value * total - 1e-12):
                cov += share[p, units[p][n]].sum()
                n += 1
            counts.append(max(n, mins[p]))
    elif kind == "memory":
        counts = _allocate_memory(sp, units, mins, share, int(value), uniform, index, gain)
    else:
        raise MoesiftError(f"unknown budget {kind!r}")
    if uniform:
        free = [p for p in range(L) if p not in sp.hash_pos]
        if free:
            target = max(counts[p] for p in free)
            for p in free:
                counts[p] = target
    return [flatten_units(units[p], counts[p]) for p in range(L)]


def _allocate_memory(sp, units, mins, share, memory: int, uniform: bool, index: Any, gain: Any = None) -> list[int]:
    """Units per layer so the whole checkpoint fits `memory` bytes, greedily by coverage gained per byte."""
    if index is None:
        raise MoesiftError("--memory needs --model (the checkpoint whose headers give the bytes per expert)")
    L = len(units)
    per = index.expert_bytes()
    layers = sp.moe_layers
    ub = [[sum(per[layers[p]][e] for e in u) for u in units[p]] for p in range(L)]
    fixed = index.total_bytes() - sum(sum(ub[p]) for p in range(L))
    counts = list(mins)
    used = fixed + sum(sum(ub[p][: counts[p]]) for p in range(L))
    if used > memory:
        raise MoesiftError(
            f"cannot meet the plan: the smallest servable model (top-k experts per layer, hash layers whole) "
            f"needs {fmt_bytes(used)}, above --memory {fmt_bytes(memory)}"
        )
    if uniform:
        free = [p for p in range(L) if p not in sp.hash_pos]
        n = max((counts[p] for p in free), default=0)
        for p in free:
            counts[p] = n
        used = fixed + sum(sum(ub[p][: counts[p]]) for p in range(L))
        if used > memory:
            raise MoesiftError(
                f"cannot meet the plan: a uniform plan needs at least {fmt_bytes(used)}, above --memory {fmt_bytes(memory)}"
            )
        while free and all(counts[p] < len(units[p]) for p in free):
            extra = sum(ub[p][counts[p]] for p in free)
            if used + extra > memory:
                break
            used += extra
            for p in free:
                counts[p] += 1
        return counts
    heap = []
    for p in range(L):
        if counts[p] < len(units[p]):
            u = units[p][counts[p]]
            g = float(share[p, u].sum()) if gain is None else gain(p, counts[p])
            heapq.heappush(heap, (-g / max(ub[p][counts[p]], 1), p))
    while heap:
        _, p = heapq.heappop(heap)
        b = ub[p][counts[p]]
        if used + b > memory:
            continue  # this layer's next unit does not fit; others may
        used += b
        counts[p] += 1
        if counts[p] < len(units[p]):
            u = units[p][counts[p]]
            g = float(share[p, u].sum()) if gain is None else gain(p, counts[p])
            heapq.heappush(heap, (-g / max(ub[p][counts[p]], 1), p))
    return counts


def _allocate_count(sp: SelectionSpec, units: list[list[list[int]]], mins: list[int], n: int, gain: Any) -> list[int]:
    """Units per layer under one total: as many experts as `n` per layer would keep in all the layers that
    are not hash-routed (hash-routed layers stay whole, every layer keeps its floor), spent greedily on
    the unit worth most per expert, `gain(p, i)` being what the i-th unit of layer p is worth."""
    L = len(units)
    free = [p for p in range(L) if p not in sp.hash_pos]
    counts = [len(units[p]) if p in sp.hash_pos else mins[p] for p in range(L)]
    size = [[len(u) for u in units[p]] for p in range(L)]
    total = sum(sum(size[p][: max(units_for_count(units[p], n), mins[p])]) for p in free)
    used = sum(sum(size[p][: counts[p]]) for p in free)
    heap = []
    for p in free:
        if counts[p] < len(units[p]):
            heapq.heappush(heap, (-gain(p, counts[p]) / size[p][counts[p]], p))
    while heap:
        _, p = heapq.heappop(heap)
        c = size[p][counts[p]]
        if used + c > total:
            continue
        used += c
        counts[p] += 1
        if counts[p] < len(units[p]):
            heapq.heappush(heap, (-gain(p, counts[p]) / size[p][counts[p]], p))
    return counts


def layer_error_scales(calibration: Any, mode: str = "whole") -> list[float]:
    """Per MoE layer, what turns the calibration's relative layer error (``||y_full - y_R||^2 / ||y_full||^2``)
    into the squared error the layer adds to the residual stream per calibration token (its output's mean
    squared norm), so that one total is spent on one scale across layers; 1.0 where the layer's gains are
    already the model's KL (sets chosen end to end) or the norm is not recorded."""
    out = []
    for e in calibration.layers:
        kl = e.get("e2e") if mode != "equal" else (e.get("equal") or {}).get("alone")
        n2, tok = e.get("output_norm2"), e.get("tokens")
        out.append(1.0 if kl or not n2 or not tok else float(n2) / float(tok))
    return out


def gain_function(sp: SelectionSpec, scores: np.ndarray, calibration: Any = None, absolute: bool = False) -> Any:
    """gain(p, i) for --allocate: the calibrated error the i-th unit of layer p saves when kept (from the
    calibration's greedy removal, on one scale across layers: the squared error added to the residual
    stream, see `layer_error_scales`), or else the unit's share of the layer's scores (for frequency: its
    share of the routes, i.e. coverage); `absolute`: the unit's score itself, for scores on one scale across
    layers (contribution: gate x expert output norm, summed over the routed tokens)."""
    L = scores.shape[0]
    units = [selection_units(sp, p, scores[p]) for p in range(L)]
    if calibration is not None:
        gains = calibration.unit_gains(sp.group_mode)
        floors = calibration.floor_units(sp.group_mode)
        scale = layer_error_scales(calibration, sp.group_mode)

        def cal_gain(p: int, i: int) -> float:
            g = gains[p]
            j = i - floors[p]
            return float(g[j]) * scale[p] if g is not None and 0 <= j < len(g) else 0.0

        return cal_gain
    tot = scores.sum(axis=1)
    if absolute:
        tot = np.full(L, float(tot.mean()))  # one scale for every layer

    def score_gain(p: int, i: int) -> float:
        return float(scores[p, units[p][i]].sum() / tot[p]) if tot[p] > 0 else 0.0

    return score_gain

