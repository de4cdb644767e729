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
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoesiftError

SCHEMA = "moesift-plan/1"
WCER_MANIFEST = "resident-manifest/1"
STRATEGIES = ("frequency", "weighted", "saliency", "contribution", "calibrated", "random")


# ------------------------------------------------------------------------------------------------
# The plan object
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Resident experts per MoE layer.

    ``layers``: one dict per MoE layer: ``layer`` (decoder layer id, or None when only the MoE position is
    known, as in WCER manifests), ``moe_index`` (position among the MoE layers), ``resident`` (sorted
    original ids), optional ``coverage`` / ``heldout_coverage``.
    """

    model: dict[str, Any]
    layers: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # file the plan was read from

    # ---- views -------------------------------------------------------------------------------------
    @property
    def positions_only(self) -> bool:
        """True when the plan knows MoE positions but not decoder layer ids (plans from WCER traces or
        manifests made without --model: their `layer` is the MoE position, `model.layer_index` says so)."""
        return self.model.get("layer_index") == "moe_position" or any(e.get("layer") is None for e in self.layers)

    @property
    def resident(self) -> dict[int, list[int]]:
        """{decoder layer: sorted resident ids}. Plans that know only MoE positions need `resolve(spec)`."""
        if self.positions_only:
            raise MoesiftError(
                f"plan {self.source or ''!s} names MoE positions only; resolve it against the model "
                "(moesift does this when a model is given)"
            )
        return {int(e["layer"]): sorted(int(i) for i in e["resident"]) for e in self.layers}

    @property
    def uniform(self) -> bool:
        return len({len(e["resident"]) for e in self.layers}) <= 1

    def counts(self) -> list[int]:
        return [len(e["resident"]) for e in self.layers]

    def resolve(self, spec: Any, config: Mapping[str, Any] | None = None, model_name: str | None = None,
                force_plan: bool = False) -> dict[int, list[int]]:
        """{decoder layer: ids} for the model described by `spec` (MoESpec); refuses a plan made for
        another model. With `config` (the model's config.json as a dict), also refuses a plan whose
        `config_hash` names another config (a same-family model of other shapes) unless `force_plan`."""
        where = f"plan {self.source!r}" if self.source else "the plan"
        if config is not None:
            check_plan_config(self, config, model_name, force_plan)
        m = self.model
        mt = m.get("model_type")
        if mt and spec.model_type and mt != spec.model_type:
            raise MoesiftError(f"{where} was made for a {mt} model, not {spec.model_type}; plan again for this model")
        if m.get("n_experts") is not None and int(m["n_experts"]) != spec.n_experts:
            raise MoesiftError(
                f"{where} was made for a model with {m['n_experts']} experts per layer; this one has "
                f"{spec.n_experts}; plan again for this model"
            )
        if m.get("top_k") is not None and int(m["top_k"]) != spec.top_k:
            raise MoesiftError(f"{where} was made for top-k {m['top_k']}; this model routes to {spec.top_k}")
        if m.get("moe_layers") is not None and list(m["moe_layers"]) != list(spec.moe_layers):
            raise MoesiftError(
                f"{where} was made for MoE layers {list(m['moe_layers'])}; this model has {list(spec.moe_layers)}"
            )
        out: dict[int, list[int]] = {}
        positions = self.positions_only
        for e in self.layers:
            layer = e.get("layer")
            if positions:
                i = int(e["moe_index"])
                if len(self.layers) != len(spec.moe_layers) or i >= len(spec.moe_layers):
                    raise MoesiftError(
                        f"{where} has {len(self.layers)} MoE layers; this model has {len(spec.moe_layers)}"
                    )
                layer = spec.moe_layers[i]
            layer = int(layer)
            if layer not in spec.moe_layers:
                raise MoesiftError(f"{where} names decoder layer {layer}, which is not a MoE layer of this model")
            ids = sorted(int(i) for i in e["resident"])
            if ids and (ids[0] < 0 or ids[-1] >= spec.n_experts):
                raise MoesiftError(f"{where}: layer {layer} names expert ids outside 0..{spec.n_experts - 1}")
            out[layer] = ids
        return out

    # ---- io ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "layers": self.layers,
            "provenance": self.provenance,
            "predictions": self.predictions,
        }

    def save(self, path: str | os.PathLike, force: bool = True) -> Path:
        from .io import write_json

        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> Plan:
        where = repr(source) if source else "plan"
        schema = d.get("schema") or d.get("schema_version")
        if schema == WCER_MANIFEST:
            return _from_wcer_manifest(d, source)
        if schema != SCHEMA:
            raise MoesiftError(f"{where} has schema {schema!r}; expected {SCHEMA} or {WCER_MANIFEST}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not layers:
            raise MoesiftError(f"{where} has no 'layers' list; it is not a valid {SCHEMA} file")
        model = d.get("model") or {}
        if not isinstance(model, Mapping):
            raise MoesiftError(f"{where}: 'model' must be a JSON object")
        for k in ("provenance", "predictions"):
            if d.get(k) is not None and not isinstance(d[k], Mapping):
                raise MoesiftError(f"{where}: {k!r} must be a JSON object")
        E = _plan_int(where, model, "n_experts", 1)
        _plan_int(where, model, "top_k", 1, E)
        moe = model.get("moe_layers")
        if moe is not None and (not isinstance(moe, list) or not all(_is_int(x) and x >= 0 for x in moe)
                                or len(set(moe)) != len(moe)):
            raise MoesiftError(f"{where}: model 'moe_layers' must be a list of distinct decoder layer ids")
        for k in ("config_hash", "model_type", "name"):
            if model.get(k) is not None and not isinstance(model[k], str):
                raise MoesiftError(f"{where}: model {k!r} must be a string")
        if model.get("config") is not None and not isinstance(model["config"], Mapping):
            raise MoesiftError(f"{where}: model 'config' must be a JSON object")
        clean, seen_layers, seen_pos = [], set(), set()
        for i, e in enumerate(layers):
            if not isinstance(e, Mapping) or not isinstance(e.get("resident"), list):
                raise MoesiftError(f"{where}: layers[{i}] has no 'resident' list")
            ids = _resident_ids(f"{where}: layers[{i}].resident", e["resident"], E)
            entry = dict(e)
            entry["resident"] = ids
            entry.setdefault("moe_index", i)
            layer, pos = entry.get("layer"), entry["moe_index"]
            if layer is not None and (not _is_int(layer) or layer < 0):
                raise MoesiftError(f"{where}: layers[{i}].layer must be a decoder layer id (got {str(layer)[:40]})")
            if not _is_int(pos) or pos < 0:
                raise MoesiftError(f"{where}: layers[{i}].moe_index must be a non-negative integer")
            if moe is not None and layer is not None and model.get("layer_index") != "moe_position" \
                    and layer not in moe:
                raise MoesiftError(f"{where}: layers[{i}] names decoder layer {layer}, not one of the plan's "
                                   f"MoE layers {moe}")
            if (layer is not None and layer in seen_layers) or pos in seen_pos:
                raise MoesiftError(f"{where}: layers[{i}] repeats a layer")
            seen_layers.add(layer)
            seen_pos.add(pos)
            clean.append(entry)
        return cls(
            model=dict(model),
            layers=clean,
            provenance=dict(d.get("provenance") or {}),
            predictions=dict(d.get("predictions") or {}),
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a `moesift-plan/1` file, a WCER `resident-manifest/1` file, or the `moesift_plan.json` of
        a trimmed checkpoint (its plan)."""
        p = Path(path)
        if p.is_dir() and (p / "moesift_plan.json").is_file():
            p = p / "moesift_plan.json"
        if not p.is_file():
            raise MoesiftError(f"plan file {str(p)!r} not found")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoesiftError(f"{str(p)!r} is not a JSON plan file (moesift-plan/1 or resident-manifest/1)") from None
        if not isinstance(d, dict):
            raise MoesiftError(f"{str(p)!r} is not a plan (expected a JSON object)")
        if d.get("schema") == "moesift-trimmed/1" and isinstance(d.get("plan"), dict):
            d = d["plan"]
        return cls.from_dict(d, source=str(p))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plan_int(where: str, d: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi) or v > 1 << 20:
        raise MoesiftError(f"{where}: {key!r} must be an integer in {lo}..{hi or 1 << 20} (got {str(v)[:40]})")
    return int(v)


def _resident_ids(where: str, ids: list[Any], n_experts: int | None) -> list[int]:
    """Sorted resident ids: integers, no repeats, in 0..n_experts-1 when the plan states the expert count."""
    if not all(_is_int(x) for x in ids):
        raise MoesiftError(f"{where} must hold integer expert ids")
    out = sorted(int(x) for x in ids)
    if len(set(out)) != len(out):
        raise MoesiftError(f"{where} repeats an expert id")
    if out and (out[0] < 0 or (n_experts is not None and out[-1] >= n_experts)):
        hi = f"{n_experts - 1}" if n_experts is not None else "..."
        raise MoesiftError(f"{where} holds expert ids outside 0..{hi}")
    return out


def _from_wcer_manifest(d: Mapping[str, Any], source: str | None) -> Plan:
    where = repr(source) if source else "manifest"
    per = d.get("per_layer_resident")
    if not isinstance(per, list) or not per:
        raise MoesiftError(f"{where} is a resident-manifest/1 without 'per_layer_resident'")
    E = _plan_int(where, d, "n_experts", 1)
    _plan_int(where, d, "top_k", 1, E)
    layers = []
    for i, ids in enumerate(per):
        if not isinstance(ids, list):
            raise MoesiftError(f"{where}: per_layer_resident[{i}] is not a list")
        layers.append({"layer": i, "moe_index": i,
                       "resident": _resident_ids(f"{where}: per_layer_resident[{i}]", ids, E)})
    model = {
        "layer_index": "moe_position",
        "name": d.get("model_id"),
        "revision": d.get("model_revision"),
        "n_experts": d.get("n_experts"),
        "top_k": d.get("top_k"),
        "n_moe_layers": d.get("n_layers", len(per)),
    }
    prov = {
        "imported_from": WCER_MANIFEST,
        "bank_name": d.get("bank_name"),
        "traces": [{"path": d.get("built_from_trace")}] if d.get("built_from_trace") else [],
        "budget": {"keep": d.get("budget_frac")},
        "hash_layers_moe_index": d.get("hash_layers", []),
    }
    return Plan(model=model, layers=layers, provenance=prov, predictions={}, source=source)


# Config keys that say how a file was written, not what the model computes: a plan made on a copy of the
# model saved by another transformers version, or in another dtype, still fits.
CONFIG_KEYS_IGNORED = frozenset({
    "transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "auto_map", "pad_token_id", "bos_token_id", "eos_token_id",
})


def _flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k in CONFIG_KEYS_IGNORED:
            continue
        if isinstance(v, Mapping):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(recorded: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """`key: recorded vs actual` for every config field both configs name with different values. A field
    only one of them names is not compared: a config saved by `save_pretrained` leaves out library
    defaults that `config.to_dict()` spells out, so absence means "the default", not "different"."""
    a, b = _flat_config(recorded), _flat_config(actual)
    return [f"{k}: {_short(a[k])} vs {_short(b[k])}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def check_plan_config(plan: Plan, config: Mapping[str, Any], model_name: str | None = None,
                      force_plan: bool = False, what: str = "plan") -> None:
    """Refuse (unless `force_plan`) a plan whose model `config_hash` is not that of `config`, naming the
    config fields that differ when the plan records its model's config. Plans without a config hash
    (hand-written maps, WCER manifests) are checked by shape only, in `Plan.resolve`."""
    from .tracer import config_hash

    want = plan.model.get("config_hash")
    if not want or force_plan or config_hash(dict(config)) == want:
        return
    where = f"{what} {plan.source!r}" if plan.source else f"the {what}"
    model = f"model {model_name!r}" if model_name else "this model"
    recorded = plan.model.get("config")
    fix = f"{what} again on this model, or pass --force-plan (force_plan=True) to use it anyway"
    if isinstance(recorded, Mapping):
        diffs = config_differences(recorded, config)
        if not diffs:
            return  # the configs differ only in how they were saved
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise MoesiftError(f"{where} was made for another config than {model}: "
                           f"{'; '.join(diffs[:5])}{more} ({what} vs model); {fix}")
    raise MoesiftError(f"{where} was made for config {str(want)[:12]}, {model} has config "
                       f"{config_hash(dict(config))[:12]} (the {what} does not record which fields differ); {fix}")


def as_plan(plan: Plan | str | os.PathLike | Mapping[int, Sequence[int]]) -> Plan:
    """A Plan from a Plan, a plan file, or a {decoder layer: ids} mapping."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    if isinstance(plan, Mapping):
        layers = [
            {"layer": int(k), "moe_index": i, "resident": sorted(int(x) for x in v)}
            for i, (k, v) in enumerate(sorted(plan.items()))
        ]
        return Plan(model={}, layers=layers)
    raise MoesiftError(f"not a plan: {type(plan).__name__}")


def resident_for(plan: Plan | str | os.PathLike | Mapping[int, Sequence[int]], spec: Any,
                 config: Mapping[str, Any] | None = None, model_name: str | None = None,
                 force_plan: bool = False) -> dict[int, list[int]]:
    """{decoder layer: resident ids} of `plan` for the model described by `spec` (checks identity; with
    `config`, also the plan's config hash unless `force_plan`)."""
    return as_plan(plan).resolve(spec, config=config, model_name=model_name, force_plan=force_plan)


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
    from .io import sha256_file
    from .tracefile import Trace

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


def parse_bytes(s: str | int | float) -> int:
    """'20GiB', '1.5GB', '300MB', '123' -> bytes."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(s))
    if not m:
        raise MoesiftError(f"cannot read the size {s!r}; write it like 20GiB, 1.5GB or 300MB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * (1024 if binary else 1000) ** power)


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
        from .arch.base import equal_group_floor

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
        from .arch.base import MoESpec

        hash_dec = tuple(layers[h] for h in sorted(hash_pos) if h < L)
        spec = MoESpec(mt, tuple(layers), E, int(m["top_k"]), int(m.get("n_shared") or 0),
                       m.get("scoring", "softmax"), m.get("n_group"), m.get("topk_group"), hash_dec)
    return _Spec(mt, layers, E, int(m["top_k"]), m.get("n_group"), m.get("topk_group"), hash_pos, spec,
                 group_score_top=_group_score_top(mt))


def _group_score_top(model_type: str | None) -> int:
    from .arch import adapter_for

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
            f"needs {_fmt(used)}, above --memory {_fmt(memory)}"
        )
    if uniform:
        free = [p for p in range(L) if p not in sp.hash_pos]
        n = max((counts[p] for p in free), default=0)
        for p in free:
            counts[p] = n
        used = fixed + sum(sum(ub[p][: counts[p]]) for p in range(L))
        if used > memory:
            raise MoesiftError(
                f"cannot meet the plan: a uniform plan needs at least {_fmt(used)}, above --memory {_fmt(memory)}"
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
    from .calibrate import Calibration, calibrate

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
    from .calibrate import _check_layer

    where = str(calibration) if isinstance(calibration, (str, os.PathLike)) else "the calibration"
    for i, e in enumerate(cal.layers):
        _check_layer(e, sp.n_experts, f"{where!r}: layers[{i}]")
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


def _fmt(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


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
    device: str = "cpu",
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
    from . import __version__

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
        from .io import check_output_path

        check_output_path(out, force)
    bank = _load_bank(traces)
    index = None
    if model is not None:
        from .checkpoint import CheckpointIndex

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
        from .offload import offload_budget

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
        from .arch import adapter_for

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
        from .offload import offload_prediction

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


def plan_diff(a: Any, b: Any, model: str | os.PathLike | None = None, force_plan: bool = False) -> dict[str, Any]:
    """Per MoE layer Jaccard of the resident sets of plans `a` and `b`, and (with `model`) the bytes to
    load when switching from bank `a` to bank `b` (experts resident in b but not in a)."""
    pa, pb = as_plan(a), as_plan(b)
    index = None
    if model is not None:
        from .checkpoint import CheckpointIndex

        index = CheckpointIndex.build(model)
        ra = pa.resolve(index.spec, index.config, str(model), force_plan)
        rb = pb.resolve(index.spec, index.config, str(model), force_plan)
    else:
        if len(pa.layers) != len(pb.layers):
            raise MoesiftError(f"the plans cover {len(pa.layers)} and {len(pb.layers)} MoE layers; not the same model")
        for k in ("model_type", "n_experts"):
            if pa.model.get(k) is not None and pb.model.get(k) is not None and pa.model[k] != pb.model[k]:
                raise MoesiftError(f"the plans are for different models ({k}: {pa.model[k]} vs {pb.model[k]})")
        key = (lambda e: e["moe_index"]) if pa.positions_only or pb.positions_only else (lambda e: e["layer"])
        ra = {key(e): e["resident"] for e in pa.layers}
        rb = {key(e): e["resident"] for e in pb.layers}
        if set(ra) != set(rb):
            raise MoesiftError("the plans cover different MoE layers; not the same model")
    per = index.expert_bytes() if index is not None else None
    layers, jac, load_b, evict_b = [], [], 0, 0
    for layer in sorted(ra):
        sa, sb = set(ra[layer]), set(rb[layer])
        j = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
        jac.append(j)
        e = {"layer": layer, "jaccard": j, "common": len(sa & sb), "load": sorted(sb - sa), "evict": sorted(sa - sb)}
        if per is not None:
            e["bytes_to_load"] = int(sum(per[layer][x] for x in sb - sa))
            e["bytes_to_evict"] = int(sum(per[layer][x] for x in sa - sb))
            load_b += e["bytes_to_load"]
            evict_b += e["bytes_to_evict"]
        layers.append(e)
    out: dict[str, Any] = {
        "a": pa.source, "b": pb.source, "layers": layers,
        "mean_jaccard": float(np.mean(jac)) if jac else math.nan,
        "experts_to_load": int(sum(len(e["load"]) for e in layers)),
        "experts_to_evict": int(sum(len(e["evict"]) for e in layers)),
    }
    if per is not None:
        out["bytes_to_load"] = load_b
        out["bytes_to_evict"] = evict_b
    else:
        out["bytes_note"] = "pass --model to get the bytes to load"
    return out
