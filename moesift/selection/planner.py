"""Resident-set plans: which experts of each MoE layer stay resident, chosen from traces.

A plan file (`moesift-plan/1`, JSON) holds the model identity, one entry per MoE layer with the resident
expert ids (original global ids, sorted), how the set was chosen (traces and their sha256, strategy, budget,
seed) and predictions (coverage in-sample and on held-out folds, bytes when the checkpoint is known).
WCER `resident-manifest/1` files are read too (their layers count MoE layers in order).

Budgets (exactly one): ``keep`` (fraction of experts per MoE layer), ``keep_experts`` (count per layer),
``coverage`` (smallest set per layer whose routes reach the share; counts differ by layer) and ``memory``
(size of the whole checkpoint; experts allocated across layers by marginal coverage per byte, from the
checkpoint headers). Constraints come from the family adapter (`plan_problems`): at least top-k experts
per layer, hash-routed layers whole, and for group-limited routers whole groups or the same number of experts in
every group (`groups`), so the plan can be served.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.registry import adapter_for
from ..arch.spec import MoESpec, equal_group_floor
from ..core.errors import MoesiftError
from ..core.io import check_output_path, sha256_file
from ..core.values import fmt_bytes
from ..core.version import __version__
from ..formats.calibration import Calibration, check_layer
from ..formats.checkpoint import CheckpointIndex
from ..formats.plan import STRATEGIES, Plan, check_plan_config, parse_bytes
from ..formats.trace import Trace
from .calibrate import calibrate
from .offload_budget import offload_budget, offload_prediction

# ------------------------------------------------------------------------------------------------
# The plan object
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Scores and banks
# ------------------------------------------------------------------------------------------------


def strategy_scores(trace: Any, strategy: str, seed: int = 0) -> np.ndarray:
    """Per MoE layer and expert, how much the strategy wants the expert resident: float64 [L, E].

    frequency: selection counts; weighted: the routing weights the model applied (``weight_mass``, after any
    top-k renormalisation and scaling; not WCER's ``per_layer_weight_mass``, which moesift keeps as
    ``selected_prob_mass``); saliency: mean gate x ||expert output|| over routed tokens (REAP: pruning for
    all traffic, blind to how often an expert is used); contribution: the sum of gate x ||expert output||
    over routed tokens (the expert's total contribution to this workload's outputs: the resident-set
    score); random: seeded uniform scores (ablation). `calibrated` scores come from a calibration
    (`moesift.calibrate`), not from the trace."""
    if strategy == "frequency":
        return trace.counts.astype(np.float64)
    if strategy == "weighted":
        wm = trace.get("weight_mass")
        if wm is None:
            extra = (" (a WCER file's per_layer_weight_mass is the router probability before renormalisation, "
                     "kept as selected_prob_mass, not the applied weights)" if trace.get("selected_prob_mass") is not None
                     else "")
            raise MoesiftError(
                f"trace {trace.label!r} has no applied router-weight mass{extra}; the 'weighted' strategy needs a "
                "trace that records weight_mass (moesift trace records it by default)"
            )
        return np.asarray(wm, dtype=np.float64)
    if strategy == "saliency":
        s, c = trace.get("saliency_sum"), trace.get("saliency_count")
        if s is None or c is None:
            raise MoesiftError(
                f"trace {trace.label!r} has no saliency; record one with `moesift trace --saliency`"
            )
        s = np.asarray(s, dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        return np.divide(s, c, out=np.zeros_like(s), where=c > 0)
    if strategy == "contribution":
        s = trace.get("saliency_sum")
        if s is None:
            raise MoesiftError(
                f"trace {trace.label!r} has no saliency; record one with `moesift trace --saliency`"
            )
        return np.asarray(s, dtype=np.float64)
    if strategy == "calibrated":
        raise MoesiftError("the calibrated strategy ranks from a calibration, not a trace; pass --calibration "
                           "FILE (moesift calibrate) or --calib DATA with --model")
    if strategy == "random":
        rng = np.random.default_rng(seed)
        return rng.random((trace.n_layers, trace.n_experts))
    raise MoesiftError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    s = a.sum(axis=-1, keepdims=True)
    return np.divide(a, s, out=np.zeros_like(a, dtype=np.float64), where=s > 0)


def _parse_trace_arg(t: Any) -> tuple[Any, float]:
    """(path or Trace, weight) from "path:0.7", a path, a Trace, or a (trace, weight) pair."""
    if isinstance(t, tuple) and len(t) == 2:
        return t[0], float(t[1])
    if isinstance(t, (str, os.PathLike)):
        s = str(t)
        m = re.fullmatch(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", s)
        if m and not Path(s).exists():
            return m.group(1), float(m.group(2))
        return s, 1.0
    return t, 1.0


@dataclass
class Bank:
    """Several traces of one model mixed by weight: each trace's counts / scores are normalised to its
    own routes per layer (so a long trace does not drown a short one) before weighting."""

    traces: list[Any]
    weights: list[float]
    sources: list[dict[str, Any]]

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.traces[0].model)

    def counts(self) -> np.ndarray:
        """Weighted share of routes [L, E] (each layer sums to 1 when the layer saw routes)."""
        return sum(w * _normalise_rows(t.counts.astype(np.float64)) for t, w in zip(self.traces, self.weights, strict=True))

    def scores(self, strategy: str, seed: int) -> np.ndarray:
        if strategy == "random":
            return strategy_scores(self.traces[0], "random", seed)
        return sum(w * _normalise_rows(strategy_scores(t, strategy, seed)) for t, w in zip(self.traces, self.weights, strict=True))

    def fold_counts(self) -> np.ndarray | None:
        """Weighted per-fold shares [F, L, E], or None when a trace has no folds or fold counts differ."""
        folds = [t.get("fold_counts") for t in self.traces]
        if any(f is None for f in folds) or len({f.shape for f in folds}) != 1 or folds[0].shape[0] < 2:
            return None
        out = np.zeros(folds[0].shape, dtype=np.float64)
        for t, w, f in zip(self.traces, self.weights, folds, strict=True):
            routes = t.counts.sum(axis=-1).astype(np.float64)  # [L]
            out += w * np.divide(f, routes[None, :, None], out=np.zeros(f.shape), where=routes[None, :, None] > 0)
        return out


def _load_bank(traces: Sequence[Any]) -> Bank:

    if isinstance(traces, (str, os.PathLike, Trace)):
        traces = [traces]
    if not traces:
        raise MoesiftError("plan needs at least one trace")
    objs, weights, sources = [], [], []
    for t in traces:
        ref, w = _parse_trace_arg(t)
        if w <= 0:
            raise MoesiftError(f"trace weight must be positive (got {w} for {ref})")
        if isinstance(ref, Trace):
            tr = ref
            src = {"label": tr.label, "token_sha256": tr.workload.get("token_sha256")}
        else:
            tr = Trace.load(ref)
            src = {"path": str(ref), "sha256": sha256_file(ref), "label": tr.label,
                   "token_sha256": tr.workload.get("token_sha256")}
        objs.append(tr)
        weights.append(w)
        sources.append(src)
    first = objs[0]
    for tr, src in zip(objs[1:], sources[1:], strict=True):
        if tr.model_key() != first.model_key():
            raise MoesiftError(
                f"trace {src.get('path', src['label'])!r} is of another model than the first trace "
                f"({tr.model.get('name')!r} vs {first.model.get('name')!r}); a bank mixes traces of one model"
            )
    total = sum(weights)
    weights = [w / total for w in weights]
    for s, w in zip(sources, weights, strict=True):
        s["weight"] = w
    return Bank(objs, weights, sources)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


@dataclass
class _Spec:
    """What selection needs to know about the model (from the checkpoint config when given, else the trace)."""

    model_type: str | None
    moe_layers: list[int | None]  # decoder ids (None when unknown)
    n_experts: int
    top_k: int
    n_group: int | None
    topk_group: int | None
    hash_pos: set[int]  # MoE positions kept whole
    adapter_spec: Any = None  # MoESpec when known
    # group-limited routers: "whole" keeps whole groups, "equal" the same number of experts in every group
    group_mode: str = "whole"
    group_score_top: int = 2  # a kept group needs at least this many resident experts (its score's terms)

    @property
    def grouped(self) -> bool:
        return bool(self.n_group and self.n_group > 1)

    def equal_floor(self) -> int:
        """Fewest experts per group when every group keeps the same number."""

        return equal_group_floor(self.n_experts, int(self.n_group), self.topk_group, self.top_k,
                                 self.group_score_top)


def _spec_from(bank: Bank, index: Any) -> _Spec:
    m = bank.model
    L = bank.traces[0].n_layers
    E = int(m["n_experts"])
    if index is not None:
        spec = index.spec
        if spec.n_experts != E or int(m["top_k"]) != spec.top_k or len(spec.moe_layers) != L:
            raise MoesiftError(
                f"the traces are of a model with {L} MoE layers x {E} experts (top-k {m['top_k']}), but "
                f"{str(index.directory)!r} has {len(spec.moe_layers)} x {spec.n_experts} (top-k {spec.top_k}); "
                "use the model the traces were recorded on"
            )
        if m.get("moe_layers") is not None and list(m["moe_layers"]) != list(spec.moe_layers):
            raise MoesiftError(
                f"the traces cover MoE layers {list(m['moe_layers'])}; {str(index.directory)!r} has "
                f"{list(spec.moe_layers)}"
            )
        if m.get("model_type") and m["model_type"] != spec.model_type:
            raise MoesiftError(
                f"the traces are of a {m['model_type']} model; {str(index.directory)!r} is {spec.model_type}"
            )
        hash_pos = {spec.moe_layers.index(h) for h in spec.hash_layers if h in spec.moe_layers}
        return _Spec(spec.model_type, list(spec.moe_layers), E, spec.top_k, spec.n_group, spec.topk_group,
                     hash_pos, spec, group_score_top=_group_score_top(spec.model_type))
    moe = m.get("moe_layers")
    layers = [int(x) for x in moe] if moe is not None and len(moe) == L else [None] * L
    hash_pos = {int(h) for h in (m.get("hash_layers") or [])}
    spec = None
    mt = m.get("model_type")
    if mt and layers[0] is not None:

        hash_dec = tuple(layers[h] for h in sorted(hash_pos) if h < L)
        spec = MoESpec(mt, tuple(layers), E, int(m["top_k"]), int(m.get("n_shared") or 0),
                       m.get("scoring", "softmax"), m.get("n_group"), m.get("topk_group"), hash_dec)
    return _Spec(mt, layers, E, int(m["top_k"]), m.get("n_group"), m.get("topk_group"), hash_pos, spec,
                 group_score_top=_group_score_top(mt))


def _group_score_top(model_type: str | None) -> int:

    try:
        return int(adapter_for({"model_type": model_type}).group_score_top) if model_type else 2
    except MoesiftError:
        return 2


GROUP_MODES = ("auto", "whole", "equal")


def _units(sp: _Spec, pos: int, scores_row: np.ndarray) -> list[list[int]]:
    """Selection units of one MoE layer, best first: experts; for group-limited routers whole groups
    (``group_mode="whole"``), or rounds of one expert from every group (``"equal"``: the i-th unit holds
    each group's i-th best expert, so any number of units keeps the same count in every group). Either
    way the plan is a standard checkpoint, and no group is left with too few experts to be selected."""
    if sp.grouped:
        per = sp.n_experts // sp.n_group
        groups = [list(range(g * per, (g + 1) * per)) for g in range(sp.n_group)]
        if sp.group_mode == "equal":
            ranked = [sorted(g, key=lambda e: (-float(scores_row[e]), e)) for g in groups]
            return [[r[i] for r in ranked] for i in range(per)]
        gscore = [float(scores_row[g].sum()) for g in groups]
        order = sorted(range(sp.n_group), key=lambda g: (-gscore[g], g))
        return [groups[g] for g in order]
    order = sorted(range(sp.n_experts), key=lambda e: (-float(scores_row[e]), e))
    return [[e] for e in order]


def _min_units(sp: _Spec, pos: int, units: list[list[int]]) -> int:
    """Fewest units a layer may keep: all for hash-routed layers, else enough for top-k (and top-k groups)."""
    if pos in sp.hash_pos:
        return len(units)
    if sp.grouped and sp.group_mode == "equal":
        return min(sp.equal_floor(), len(units))
    n, got = 0, 0
    while got < sp.top_k and n < len(units):
        got += len(units[n])
        n += 1
    if sp.n_group and sp.n_group > 1 and sp.topk_group:
        n = max(n, min(int(sp.topk_group), len(units)))
    return n


def _units_for_count(units: list[list[int]], n_experts: int) -> int:
    got, n = 0, 0
    while got < n_experts and n < len(units):
        got += len(units[n])
        n += 1
    return n


def _flatten(units: list[list[int]], n: int) -> list[int]:
    return sorted(e for u in units[:n] for e in u)


def _auto_group_modes(sp: _Spec, budget: dict[str, Any], cal: Any = None) -> list[str]:
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
        units = _units(s, 0, row)
        kept[mode] = len(_flatten(units, max(_units_for_count(units, n), _min_units(s, -1, units))))
    if kept["equal"] != kept["whole"]:
        return ["equal"] if kept["equal"] < kept["whole"] else ["whole"]
    if cal is not None:
        kl = {mode: cal.uniform_kl(mode, kept[mode], sp.n_experts) for mode in ("whole", "equal")}
        if kl["whole"] is not None and kl["equal"] is not None and kl["equal"] < kl["whole"]:
            return ["equal"]
    return ["whole"]


def _select(
    sp: _Spec, scores: np.ndarray, share: np.ndarray, budget: dict[str, Any], uniform: bool, index: Any,
    gain: Any = None,
) -> list[list[int]]:
    """Resident ids per MoE position under the budget. `gain(p, n)`: with --allocate, what the n-th unit of
    layer p (in score order) is worth; a --keep / --keep-experts total is then spread over layers by it."""
    L, E = scores.shape
    units = [_units(sp, p, scores[p]) for p in range(L)]
    mins = [_min_units(sp, p, units[p]) for p in range(L)]
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
        counts = [len(units[p]) if p in sp.hash_pos else max(_units_for_count(units[p], n), mins[p]) for p in range(L)]
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
    return [_flatten(units[p], counts[p]) for p in range(L)]


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


def _allocate_count(sp: _Spec, units: list[list[list[int]]], mins: list[int], n: int, gain: Any) -> list[int]:
    """Units per layer under one total: as many experts as `n` per layer would keep in all the layers that
    are not hash-routed (hash-routed layers stay whole, every layer keeps its floor), spent greedily on
    the unit worth most per expert, `gain(p, i)` being what the i-th unit of layer p is worth."""
    L = len(units)
    free = [p for p in range(L) if p not in sp.hash_pos]
    counts = [len(units[p]) if p in sp.hash_pos else mins[p] for p in range(L)]
    size = [[len(u) for u in units[p]] for p in range(L)]
    total = sum(sum(size[p][: max(_units_for_count(units[p], n), mins[p])]) for p in free)
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


def _gain_function(sp: _Spec, scores: np.ndarray, calibration: Any = None) -> Any:
    """gain(p, i) for --allocate: the calibrated error the i-th unit of layer p saves when kept (from the
    calibration's greedy removal), or else the unit's share of the layer's scores (for frequency: its
    share of the routes, i.e. coverage)."""
    L = scores.shape[0]
    units = [_units(sp, p, scores[p]) for p in range(L)]
    if calibration is not None:
        gains = calibration.unit_gains(sp.group_mode)
        floors = calibration.floor_units(sp.group_mode)

        def cal_gain(p: int, i: int) -> float:
            g = gains[p]
            j = i - floors[p]
            return float(g[j]) if g is not None and 0 <= j < len(g) else 0.0

        return cal_gain
    tot = scores.sum(axis=1)

    def score_gain(p: int, i: int) -> float:
        return float(scores[p, units[p][i]].sum() / tot[p]) if tot[p] > 0 else 0.0

    return score_gain


_CALIBRATIONS: dict[tuple, Any] = {}


def _calibration_for(sp: _Spec, calibration: Any, calib: Any, model: Any, calib_samples: int | None,
                     calib_length: int, device: str, dtype: str | None, progress: bool) -> Any:
    """The Calibration the calibrated strategy ranks by: given (object or file), or measured on `calib`
    (workload files) with the checkpoint `model` (kept for the process: sweeps plan many budgets)."""

    if calibration is not None:
        cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    elif calib is not None:
        if model is None:
            raise MoesiftError("--strategy calibrated with --calib needs --model (the checkpoint to calibrate)")
        files = tuple(str(x) for x in ([calib] if isinstance(calib, (str, os.PathLike)) else calib))
        key = (str(Path(str(model)).resolve()), files, calib_samples, calib_length, device, dtype)
        cal = _CALIBRATIONS.get(key)
        if cal is None:
            cal = _CALIBRATIONS[key] = calibrate(model, list(files), max_samples=calib_samples,
                                                 max_length=calib_length, device=device, dtype=dtype,
                                                 progress=progress)
    else:
        raise MoesiftError("--strategy calibrated needs --calibration FILE (from `moesift calibrate`) or --calib "
                           "DATA with --model (calibration prompts: never the evaluation data)")

    where = str(calibration) if isinstance(calibration, (str, os.PathLike)) else "the calibration"
    for i, e in enumerate(cal.layers):
        check_layer(e, sp.n_experts, f"{where!r}: layers[{i}]")
    m = cal.model
    layers = [e.get("layer") for e in cal.layers]
    if (m.get("n_experts") is not None and int(m["n_experts"]) != sp.n_experts) or len(layers) != len(sp.moe_layers) \
            or (sp.moe_layers[0] is not None and list(layers) != list(sp.moe_layers)):
        raise MoesiftError(f"the calibration ({m.get('checkpoint')}) is of another model than the traces: "
                           f"{len(layers)} MoE layers x {m.get('n_experts')} experts; calibrate this model")
    return cal


def _calibrated_error(cal: Any, resident: Sequence[Sequence[int]], mode: str = "whole") -> list[float | None]:
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




# ------------------------------------------------------------------------------------------------
# Held-out prediction
# ------------------------------------------------------------------------------------------------


def _heldout(sp: _Spec, fold_scores: np.ndarray, fold_counts: np.ndarray,
             resident: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer mean and std over folds of the share of a left-out fold's routes covered by a set chosen
    the way the plan chose its own (same selection units: experts, or whole groups; same number of units)
    from the scores of the other folds."""
    F, L, E = fold_counts.shape
    total = fold_scores.sum(axis=0)
    cov = np.full((F, L), np.nan)
    for p in range(L):
        n_units = _units_for_count(_units(sp, p, total[p]), len(resident[p]))
        for f in range(F):
            routes = fold_counts[f, p].sum()
            if routes <= 0:
                continue
            if len(resident[p]) >= E:
                cov[f, p] = 1.0  # a layer kept whole covers everything
                continue
            ids = _flatten(_units(sp, p, total[p] - fold_scores[f, p]), n_units)
            cov[f, p] = fold_counts[f, p, ids].sum() / routes
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers no fold routed to stay NaN
        return np.nanmean(cov, axis=0), np.nanstd(cov, axis=0)


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------


def plan(
    traces: Any,
    out: str | os.PathLike | None = None,
    keep: float | None = None,
    keep_experts: int | None = None,
    coverage: float | None = None,
    memory: str | int | None = None,
    model: str | os.PathLike | None = None,
    strategy: str = "frequency",
    uniform: bool = False,
    seed: int = 0,
    force: bool = False,
    offload: bool = False,
    cache_slots: int | None = None,
    policy: str = "lru",
    force_plan: bool = False,
    allocate: bool = False,
    calibration: Any = None,
    calib: Any = None,
    calib_samples: int | None = 64,
    calib_length: int = 256,
    device: str = "auto",
    dtype: str | None = None,
    progress: bool = True,
    groups: str = "auto",
) -> Plan:
    """Choose the resident experts of every MoE layer from one or more traces (a bank) under one budget.

    `traces`: paths (``"path:0.7"`` sets a weight), Trace objects, or (trace, weight) pairs.
    Exactly one of `keep`, `keep_experts`, `coverage`, `memory` (needs `model`).
    `offload`: plan for `moesift.load_offloaded` (`memory` is device memory for the non-expert weights, the
    resident experts and `cache_slots` slots per layer; the predicted cache hit rate is added).
    With `model`, traces of another config (same family, other shapes) are refused unless `force_plan`.
    `allocate`: spread the --keep / --keep-experts / --memory total over layers by measured marginal loss
    (calibrated error, or the strategy's score share: coverage for frequency) instead of the same count
    everywhere. `strategy="calibrated"` ranks by `calibration` (a `moesift.calibrate` result or file), or
    calibrates `model` on `calib` (workload files, never the evaluation data; `calib_samples` documents of
    `calib_length` tokens, on `device` in `dtype`).
    `groups` (group-limited routers): "whole" keeps whole groups, "equal" the same number of experts in
    every group; "auto" keeps whole groups unless the same count in every group comes closer to a --keep /
    --keep-experts budget (below the whole-group floor) or only it fits --memory, and for the calibrated
    strategy, where both keep the same count, takes the layout whose sets the calibration measured at the
    lower KL."""

    given = {k: v for k, v in (("keep", keep), ("keep_experts", keep_experts), ("coverage", coverage),
                               ("memory", memory)) if v is not None}
    if len(given) != 1:
        raise MoesiftError("give exactly one budget: --keep, --keep-experts, --coverage or --memory")
    kind, value = next(iter(given.items()))
    if kind == "keep" and not 0 < float(value) <= 1:
        raise MoesiftError(f"--keep is a fraction of experts in (0, 1]; got {value}")
    if strategy not in STRATEGIES:
        raise MoesiftError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if allocate and kind == "coverage":
        raise MoesiftError("--allocate spreads a total (--keep, --keep-experts or --memory); --coverage is per layer")
    if allocate and uniform:
        raise MoesiftError("--allocate gives layers different counts; it cannot be combined with --uniform")
    if groups not in GROUP_MODES:
        raise MoesiftError(f"unknown --groups {groups!r}; use one of {', '.join(GROUP_MODES)}")
    if out is not None:

        check_output_path(out, force)
    bank = _load_bank(traces)
    index = None
    if model is not None:

        index = CheckpointIndex.build(model)
        probe = Plan(model=bank.model, layers=[], source=bank.sources[0].get("path", bank.sources[0]["label"]))
        check_plan_config(probe, index.config, str(model), force_plan, what="trace")
    sp = _spec_from(bank, index)
    if not sp.grouped and groups != "auto":
        raise MoesiftError(f"--groups {groups} is for group-limited routers (DeepSeek-V3-style expert groups); "
                           "this model's router has no groups")
    share = bank.counts()
    budget = {"kind": kind, "value": parse_bytes(value) if kind == "memory" else float(value)}
    if kind == "keep_experts":
        budget["value"] = int(value)
    if offload:

        if kind != "memory" or index is None:
            raise MoesiftError("--offload plans for a device budget: give --memory GiB and --model")
        budget["value"], cache_slots = offload_budget(index, budget["value"], cache_slots)
    cal = None
    if strategy == "calibrated":
        cal = _calibration_for(sp, calibration, calib, model, calib_samples, calib_length, device, dtype, progress)
    if not sp.grouped:
        modes = ["whole"]  # no groups: one layout
    else:
        modes = [groups] if groups != "auto" else _auto_group_modes(sp, budget, cal)
    resident = None
    for i, mode in enumerate(modes):
        sp = dataclasses.replace(sp, group_mode=mode)
        scores = cal.scores(sp.n_experts, mode) if cal is not None else bank.scores(strategy, seed)
        gain = _gain_function(sp, scores, cal) if allocate else None
        try:
            resident = _select(sp, scores, share, budget, uniform, index, gain)
            break
        except MoesiftError as e:
            if i + 1 < len(modes):
                continue  # auto: whole groups do not fit; the same count in every group may
            if not offload:
                raise
            raise MoesiftError(f"{e}, which is what --memory leaves after {cache_slots} cache slots per layer and "
                               "the whole routers (--offload); raise --memory or lower --cache-slots") from None
    assert resident is not None
    if cal is not None:
        # sets the calibration chose end to end for these counts replace the ranked prefix
        resident = [cal.end_to_end_set(p, len(r), sp.group_mode if sp.grouped else "whole") or r
                    for p, r in enumerate(resident)]

    # constraints from the adapter (top-k, groups, hash layers)
    if sp.adapter_spec is not None and sp.model_type:

        try:
            ad = adapter_for({"model_type": sp.model_type})
        except MoesiftError:
            ad = None
        if ad is not None:
            res = {sp.moe_layers[p]: resident[p] for p in range(len(resident))}
            problems = ad.plan_problems(sp.adapter_spec, res, standard=uniform)
            if problems:
                raise MoesiftError("cannot meet the plan: " + "; ".join(problems[:4])
                                   + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))
    else:
        for p, ids in enumerate(resident):
            if len(ids) < sp.top_k:
                raise MoesiftError(f"cannot meet the plan: MoE layer {p} keeps {len(ids)} experts, below top-k")
        if uniform and len({len(r) for r in resident if r}) > 1:
            raise MoesiftError("cannot meet the plan: --uniform with hash-routed layers kept whole")

    # predictions
    L = len(resident)
    budget_note = None
    if kind in ("keep", "keep_experts"):
        asked = int(round(float(value) * sp.n_experts)) if kind == "keep" else int(value)
        raised = [p for p in range(L) if len(resident[p]) > asked]
        if raised:
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
            budget_note = (f"the budget asks for {asked} experts per layer; {len(raised)} of {L} MoE layers keep "
                           f"more (up to {max(len(resident[p]) for p in raised)}): " + "; ".join(why or ["top-k"]))
    insample = [float(share[p, resident[p]].sum() / share[p].sum()) if share[p].sum() > 0 else None for p in range(L)]
    folds = bank.fold_counts()
    held_mean = held_std = None
    held_note = None
    freq_gap = None
    if folds is not None:
        sizes = [len(r) for r in resident]
        if strategy in ("frequency", "random"):
            # random sets do not depend on the data: each fold is held out for them as it stands
            fold_scores = folds if strategy == "frequency" else np.broadcast_to(scores, folds.shape).copy()
            held_mean, held_std = _heldout(sp, fold_scores, folds, resident)
        else:
            # weighted / saliency scores are not kept per fold, so this set cannot be chosen without a fold
            # and measured on it. Report how optimistic in-sample coverage is for count-chosen sets of the
            # same sizes instead, and leave the held-out figure empty rather than quote another set's.
            f_sets = [_flatten(u, _units_for_count(u, sizes[p]))
                      for p, u in ((p, _units(sp, p, share[p])) for p in range(L))]
            f_mean, _ = _heldout(sp, folds, folds, f_sets)
            tot = share.sum(axis=1)
            f_in = [float(share[p, f_sets[p]].sum() / tot[p]) if tot[p] > 0 else np.nan for p in range(L)]
            gaps = np.asarray(f_in) - np.asarray(f_mean, dtype=np.float64)
            freq_gap = float(np.nanmean(gaps)) if np.isfinite(gaps).any() else None
            held_note = (f"{strategy} scores are not kept per fold, so the held-out coverage of this set cannot be "
                         f"measured; for count-chosen sets of the same sizes in-sample coverage exceeds held-out by "
                         f"{freq_gap if freq_gap is not None else float('nan'):.4f}")
    layers = []
    positions = sp.moe_layers[0] is None
    for p in range(L):
        e = {"layer": p if positions else sp.moe_layers[p], "moe_index": p, "resident": resident[p], "n_resident": len(resident[p]),
             "coverage": insample[p]}
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
    if budget_note:
        pred["budget_note"] = budget_note
    if strategy == "weighted":
        pred["strategy_note"] = ("weighted ranks experts by the routing weights the model applied (weight_mass, after "
                                 "top-k renormalisation), not by the router probability before it (selected_prob_mass, "
                                 "WCER's per_layer_weight_mass)")
    if cal is not None:
        ce = _calibrated_error(cal, resident, sp.group_mode)
        for e, c in zip(layers, ce, strict=True):
            e["calibrated_error"] = c
        known = [c for c in ce if c is not None]
        pred["calibrated_error"] = float(np.mean(known)) if known else None
    if held_note:
        pred["heldout_note"] = held_note
        pred["frequency_insample_minus_heldout"] = freq_gap
    elif held_mean is None:
        pred["heldout_note"] = "the traces have no folds; held-out coverage cannot be estimated"
    model_id = {k: v for k, v in bank.model.items() if k in ("name", "model_type", "config_hash", "config",
                                                                "n_experts", "top_k", "n_shared", "hash_layers")}
    model_id["moe_layers"] = None if positions else list(sp.moe_layers)
    if positions:
        model_id["layer_index"] = "moe_position"  # decoder ids unknown: `layer` counts MoE layers in order
    if index is not None:
        res = {sp.moe_layers[p]: resident[p] for p in range(L)}
        pred["bytes"] = int(index.predicted_bytes(res))
        pred["bytes_full"] = int(index.total_bytes())
        pred["bytes_fraction"] = pred["bytes"] / max(pred["bytes_full"], 1)
        model_id["checkpoint"] = str(index.directory)
    prov = {
        "traces": bank.sources,
        "strategy": strategy,
        "budget": {kind: value if kind != "memory" else str(value), **({"bytes": budget["value"]} if kind == "memory" else {})},
        "uniform": bool(uniform),
        "allocate": bool(allocate),
        **({"groups": sp.group_mode} if sp.grouped else {}),
        "seed": int(seed),
        "tool": {"name": "moesift", "version": __version__},
    }
    if offload:

        pred["offload"] = offload_prediction(bank.traces, resident, int(cache_slots or 0), policy, index,
                                             sp.moe_layers)
        pred["offload"]["memory_bytes"] = parse_bytes(value)
    if cal is not None:
        prov["calibration"] = {"settings": cal.settings, "timing": cal.timing,
                               "local": [e.get("local") for e in cal.layers]}
    result = Plan(model=model_id, layers=layers, provenance=prov, predictions=pred)
    if out is not None:
        result.save(out, force=force)
        result.source = str(out)
    return result


# ------------------------------------------------------------------------------------------------
# Comparing two banks
# ------------------------------------------------------------------------------------------------


