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
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.io import check_output_path, input_paths, sha256_file
from ..core.version import __version__
from ..formats.calibration import Calibration, check_layer
from ..formats.checkpoint import CheckpointIndex
from ..formats.gguf import GGUFIndex, is_gguf, read_gguf
from ..formats.gguf_identity import gguf_index_for
from ..formats.plan import STRATEGIES, Plan, check_plan_config, parse_bytes
from ..formats.trace import Trace
from .allocate import auto_group_modes, gain_function, select_resident
from .auto import AUTO, choose, format_choice
from .calibrate import calibrate
from .offload_budget import offload_budget, offload_prediction
from .predict import budget_note, predictions
from .units import GROUP_MODES, SelectionSpec, spec_from

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


def _normalise_total(a: np.ndarray) -> np.ndarray:
    m = float(a.sum(axis=-1).mean()) if a.size else 0.0
    return a / m if m > 0 else np.zeros_like(a, dtype=np.float64)


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

    def scores(self, strategy: str, seed: int, one_scale: bool = False) -> np.ndarray:
        """The strategy's scores [L, E], each trace normalised per layer (every layer sums to 1), or with
        `one_scale` by its mean layer total (layers keep their relative sizes: contribution's scale)."""
        if strategy == "random":
            return strategy_scores(self.traces[0], "random", seed)
        if one_scale:
            return sum(w * _normalise_total(strategy_scores(t, strategy, seed))
                       for t, w in zip(self.traces, self.weights, strict=True))
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
    """The bank of `traces` (see `_parse_trace_arg`), weights normalised to sum 1; traces of one model only."""
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
# Calibrated ranking
# ------------------------------------------------------------------------------------------------


_CALIBRATIONS: dict[tuple, Any] = {}


def _calibration_for(sp: SelectionSpec, calibration: Any, calib: Any, model: Any, calib_samples: int | None,
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
    strategy: str = "auto",
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
    auto_folds: int = 4,
    auto_rounds: int = 1,
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
    lower KL.
    `strategy="auto"` chooses per budget among frequency, weighted, contribution and calibrated, with and
    without --allocate, by perplexity on held-out folds of `calib` (`auto_folds` folds, `auto_rounds` of them
    held out in turn; see `moesift.selection.auto`); without `calib` and `model`, from the traces alone."""
    kind, value = _budget(keep, keep_experts, coverage, memory, strategy, allocate, uniform, groups)
    inputs = input_paths(traces, calibration, calib)
    if out is not None:
        check_output_path(out, force, inputs=inputs)
    bank, index, sp = _bank_and_spec(traces, model, force_plan, groups)
    share = bank.counts()
    budget, cache_slots = _budget_value(kind, value, offload, index, cache_slots)
    cal, auto = None, None
    if strategy == AUTO:
        choice = _choose_auto(bank, sp, budget, kind, seed, groups, allocate, uniform, index, offload, cache_slots,
                              model, calib, calib_samples, calib_length, auto_folds, auto_rounds, device, dtype,
                              progress, final=calibration is None)
        strategy, allocate, cal, auto = choice.strategy, choice.allocate, choice.calibration, choice.record
        if calibration is not None and strategy == "calibrated":
            cal, auto["final_calibration"] = None, str(calibration)  # the given calibration
    if strategy == "calibrated" and cal is None:
        cal = _calibration_for(sp, calibration, calib, model, calib_samples, calib_length, device, dtype, progress)
    sp, scores, resident = _select_sets(sp, bank, share, budget, strategy, seed, groups, cal, allocate, uniform,
                                        index, offload, cache_slots)
    _check_constraints(sp, resident, uniform)
    note = budget_note(sp, kind, value, resident, uniform, allocate)
    layers, pred = predictions(sp, bank, share, resident, strategy, scores, cal, note)
    model_id = _model_id(bank, sp)
    if index is not None:
        _check_gguf_counts(index, resident)
        res = {sp.moe_layers[p]: resident[p] for p in range(len(resident))}
        pred["bytes"] = int(index.predicted_bytes(res))
        pred["bytes_full"] = int(index.total_bytes())
        pred["bytes_fraction"] = pred["bytes"] / max(pred["bytes_full"], 1)
        model_id["checkpoint"] = str(index.directory)
    if offload:
        pred["offload"] = offload_prediction(bank.traces, resident, int(cache_slots or 0), policy, index,
                                             sp.moe_layers)
        pred["offload"]["memory_bytes"] = parse_bytes(value)
    prov = _provenance(bank, sp, strategy, kind, value, budget, uniform, allocate, seed, cal)
    if auto is not None:
        prov.update(strategy=AUTO, chosen=auto["chosen"], auto=auto)
    result = Plan(model=model_id, layers=layers, provenance=prov, predictions=pred)
    if out is not None:
        result.save(out, force=force, inputs=inputs)
        result.source = str(out)
    return result


def _budget(keep: Any, keep_experts: Any, coverage: Any, memory: Any, strategy: str, allocate: bool,
            uniform: bool, groups: str) -> tuple[str, Any]:
    """(kind, value) of the one budget given, after checking it goes with the other settings."""
    given = {k: v for k, v in (("keep", keep), ("keep_experts", keep_experts), ("coverage", coverage),
                               ("memory", memory)) if v is not None}
    if len(given) != 1:
        raise MoesiftError("give exactly one budget: --keep, --keep-experts, --coverage or --memory")
    kind, value = next(iter(given.items()))
    if kind == "keep" and not 0 < float(value) <= 1:
        raise MoesiftError(f"--keep is a fraction of experts in (0, 1]; got {value}")
    if strategy not in STRATEGIES and strategy != AUTO:
        raise MoesiftError(f"unknown strategy {strategy!r}; use one of {AUTO}, {', '.join(STRATEGIES)}")
    if allocate and kind == "coverage":
        raise MoesiftError("--allocate spreads a total (--keep, --keep-experts or --memory); --coverage is per layer")
    if allocate and uniform:
        raise MoesiftError("--allocate gives layers different counts; it cannot be combined with --uniform")
    if groups not in GROUP_MODES:
        raise MoesiftError(f"unknown --groups {groups!r}; use one of {', '.join(GROUP_MODES)}")
    return kind, value


def _choose_auto(bank: Bank, sp: SelectionSpec, budget: dict[str, Any], kind: str, seed: int, groups: str,
                 allocate: bool, uniform: bool, index: Any, offload: bool, cache_slots: int | None, model: Any,
                 calib: Any, calib_samples: int | None, calib_length: int, folds: int, rounds: int, device: str,
                 dtype: str | None, progress: bool, final: bool = True) -> Any:
    """`auto`'s choice (`moesift.selection.auto.choose`), every candidate selected as `plan` selects it;
    `final=False` when a calibration is given (the plan ranks by it where calibrated wins)."""

    def select(b: Bank, strategy: str, alloc: bool, cal: Any) -> list[list[int]]:
        sp2, _, resident = _select_sets(sp, b, b.counts(), budget, strategy, seed, groups, cal, alloc, uniform,
                                        index, offload, cache_slots)
        _check_constraints(sp2, resident, uniform)
        return resident

    layers = [int(x) if x is not None else p for p, x in enumerate(sp.moe_layers)]
    return choose(bank, select, layers, model, calib, allocate, not uniform and kind != "coverage", calib_samples,
                  calib_length, folds, rounds, seed, device, dtype, progress, lambda t: _load_bank([t]), final)


def _bank_and_spec(traces: Any, model: Any, force_plan: bool, groups: str) -> tuple[Bank, Any, SelectionSpec]:
    """The bank of traces, the checkpoint index (None without `model`) and what selection knows of the model."""
    bank = _load_bank(traces)
    index = _model_index(model, bank, force_plan) if model is not None else None
    sp = spec_from(bank, index)
    if not sp.grouped and groups != "auto":
        raise MoesiftError(f"--groups {groups} is for group-limited routers (DeepSeek-V3-style expert groups); "
                           "this model's router has no groups")
    return bank, index, sp


def _model_index(model: Any, bank: Bank, force_plan: bool) -> Any:
    """The headers of the model whose bytes a --memory budget counts: a safetensors checkpoint folder
    (CheckpointIndex) or a GGUF file (GGUFIndex, trimmed by `moesift trim` to one expert count per layer),
    checked against the model the traces were recorded on."""
    source = bank.sources[0].get("path", bank.sources[0]["label"])
    if is_gguf(model):
        return gguf_index_for(read_gguf(model), bank.model, f"trace {source!r}", force_plan, what="trace",
                              fix="trace this model, or a model it was converted from")
    index = CheckpointIndex.build(model)
    check_plan_config(Plan(model=bank.model, layers=[], source=source), index.config, str(model), force_plan,
                      what="trace")
    return index


def _check_gguf_counts(index: Any, resident: list[list[int]]) -> None:
    """A GGUF file has one expert count: a plan for one keeps the same count in every MoE layer."""
    counts = sorted({len(r) for r in resident})
    if isinstance(index, GGUFIndex) and len(counts) > 1:
        raise MoesiftError(f"this plan keeps a different number of experts per layer ({', '.join(map(str, counts))}), "
                           f"and the GGUF file {str(index.directory)!r} has one expert count; plan with --uniform")


def _budget_value(kind: str, value: Any, offload: bool, index: Any,
                  cache_slots: int | None) -> tuple[dict[str, Any], int | None]:
    """The budget selection spends ({"kind", "value"}: bytes for memory) and the cache slots per layer;
    with `offload`, memory is what the device keeps after the routers and the cache slots."""
    budget = {"kind": kind, "value": parse_bytes(value) if kind == "memory" else float(value)}
    if kind == "keep_experts":
        budget["value"] = int(value)
    if offload:
        if kind != "memory" or index is None:
            raise MoesiftError("--offload plans for a device budget: give --memory GiB and --model")
        if isinstance(index, GGUFIndex):
            raise MoesiftError("--offload plans for moesift.load_offloaded, which loads safetensors checkpoints, "
                               "not a GGUF file")
        budget["value"], cache_slots = offload_budget(index, budget["value"], cache_slots)
    return budget, cache_slots


def _select_sets(sp: SelectionSpec, bank: Bank, share: np.ndarray, budget: dict[str, Any], strategy: str,
                 seed: int, groups: str, cal: Any, allocate: bool, uniform: bool, index: Any, offload: bool,
                 cache_slots: int | None) -> tuple[SelectionSpec, np.ndarray, list[list[int]]]:
    """(the spec with the group layout taken, the scores that ranked the experts, resident ids per MoE
    layer): for `groups="auto"` the first layout that fits, in the order `auto_group_modes` gives."""
    if not sp.grouped:
        modes = ["whole"]  # no groups: one layout
    else:
        modes = [groups] if groups != "auto" else auto_group_modes(sp, budget, cal)
    resident = None
    for i, mode in enumerate(modes):
        sp = dataclasses.replace(sp, group_mode=mode)
        scores = cal.scores(sp.n_experts, mode) if cal is not None else bank.scores(strategy, seed)
        gain = None
        if allocate:  # contribution's scores are on one scale across layers: spend by them as they are
            one = strategy == "contribution" and cal is None
            gain = gain_function(sp, bank.scores(strategy, seed, one_scale=True) if one else scores, cal, absolute=one)
        try:
            resident = select_resident(sp, scores, share, budget, uniform, index, gain)
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
    return sp, scores, resident


def _check_constraints(sp: SelectionSpec, resident: list[list[int]], uniform: bool) -> None:
    """Refuse sets the model cannot serve: the family adapter's constraints (top-k, groups, hash layers)
    when the family is known, else top-k and --uniform."""
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
        return
    for p, ids in enumerate(resident):
        if len(ids) < sp.top_k:
            raise MoesiftError(f"cannot meet the plan: MoE layer {p} keeps {len(ids)} experts, below top-k")
    if uniform and len({len(r) for r in resident if r}) > 1:
        raise MoesiftError("cannot meet the plan: --uniform with hash-routed layers kept whole")


def _model_id(bank: Bank, sp: SelectionSpec) -> dict[str, Any]:
    """The plan's model identity (decoder ids of the MoE layers, or `moe_position` when they are unknown)."""
    model_id = {k: v for k, v in bank.model.items() if k in ("name", "model_type", "config_hash", "config",
                                                                "n_experts", "top_k", "n_shared", "hash_layers")}
    positions = sp.moe_layers[0] is None
    model_id["moe_layers"] = None if positions else list(sp.moe_layers)
    if positions:
        model_id["layer_index"] = "moe_position"  # decoder ids unknown: `layer` counts MoE layers in order
    return model_id


def _provenance(bank: Bank, sp: SelectionSpec, strategy: str, kind: str, value: Any, budget: dict[str, Any],
                uniform: bool, allocate: bool, seed: int, cal: Any) -> dict[str, Any]:
    """How the plan was chosen: traces, strategy, budget, layout, seed, tool, and the calibration used."""
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
    if cal is not None:
        prov["calibration"] = {"settings": cal.settings, "timing": cal.timing,
                               "local": [e.get("local") for e in cal.layers]}
    return prov


# ------------------------------------------------------------------------------------------------
# Text for the command line
# ------------------------------------------------------------------------------------------------


def format_plan(p: Plan, out: Any = None) -> str:
    """A plan as `moesift plan` prints it: totals, notes, bytes, the offload cache, one line per layer, and
    where it was written (`out`)."""
    pr = p.predictions
    held = pr.get("heldout_coverage")
    lines = [f"{pr['experts_resident']}/{pr['experts_total']} experts resident; coverage in-sample "
             f"{pr['coverage']:.3f}" + (f", held-out {held:.3f}" if held is not None else "")]
    if pr.get("budget_note"):
        lines.append(f"  budget: {pr['budget_note']}")
    if p.provenance.get("groups"):
        lines.append("  groups: " + ("whole expert groups kept" if p.provenance["groups"] == "whole" else
                                     "the same number of experts kept in every group"))
    if pr.get("strategy_note"):
        lines.append(f"  strategy: {pr['strategy_note']}")
    if p.provenance.get("auto"):
        lines += format_choice(p.provenance["auto"])
    if held is None and pr.get("heldout_note"):
        lines.append(f"  held-out: {pr['heldout_note']}")
    if "bytes" in pr:
        lines.append(f"predicted checkpoint {pr['bytes']:,} bytes ({pr['bytes_fraction']:.1%} of {pr['bytes_full']:,})")
    if "offload" in pr:
        o = pr["offload"]
        hr, hh = o.get("hit_rate"), o.get("heldout_hit_rate")
        lines.append(f"offload: {o['cache_slots']} {o['policy']} cache slots per layer, "
                     f"{o.get('device_bytes', 0):,} device bytes; predicted hit rate "
                     + (f"in-sample {hr:.3f}" if hr is not None else "unknown")
                     + (f", held-out {hh:.3f}" if hh is not None else ""))
        if o.get("note") or (hh is None and o.get("heldout_note")):
            lines.append(f"  {o.get('note') or o.get('heldout_note')}")
    for e in p.layers:
        h = e.get("heldout_coverage")
        lines.append(f"  layer {e['layer'] if e['layer'] is not None else e['moe_index']:>3}: {len(e['resident']):>4} "
                     f"experts  coverage {e['coverage'] if e['coverage'] is not None else float('nan'):.3f}"
                     + (f"  held-out {h:.3f}" if h is not None else ""))
    if out:
        lines.append(f"wrote {out}")
    return "\n".join(lines)


def format_plan_diff(d: dict[str, Any]) -> str:
    """A `plan_diff` result as `moesift plan diff` prints it: Jaccard, experts (and bytes) to load and evict."""
    lines = [f"mean Jaccard {d['mean_jaccard']:.3f}; experts to load {d['experts_to_load']}, "
             f"to evict {d['experts_to_evict']}"]
    if "bytes_to_load" in d:
        lines.append(f"bytes to load switching A -> B: {d['bytes_to_load']:,}")
    for e in d["layers"]:
        extra = f"  load {e['bytes_to_load']:,} B" if "bytes_to_load" in e else ""
        lines.append(f"  layer {e['layer']:>3}: Jaccard {e['jaccard']:.3f}  +{len(e['load'])} -{len(e['evict'])}{extra}")
    return "\n".join(lines)
