"""Plan files (`moesift-plan/1`, JSON): the model identity, per MoE layer the resident expert ids (original
global ids, sorted), how the set was chosen and what it predicts. WCER `resident-manifest/1` files are read
too (their layers count MoE layers in order). `plan_diff` compares two plans of one model.

The planner that writes plans lives in `moesift.selection.planner`."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.identity import config_differences, config_hash
from ..core.io import write_json
from ..core.values import is_int
from .checkpoint import CheckpointIndex

SCHEMA = "moesift-plan/1"


WCER_MANIFEST = "resident-manifest/1"


STRATEGIES = ("frequency", "weighted", "saliency", "contribution", "calibrated", "random")


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
        missing = [la for la in spec.moe_layers if la not in out and la not in spec.hash_layers]
        if missing and self.source:  # a plan file names every MoE layer: one left out is a damaged plan
            raise MoesiftError(f"{where} names no resident experts for MoE layer{'s' if len(missing) > 1 else ''} "
                               f"{missing[:8]}; a plan lists every MoE layer of its model (to keep a layer whole, "
                               "list all its experts)")
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

    def save(self, path: str | os.PathLike, force: bool = True, inputs: Iterable[str | os.PathLike] = ()) -> Path:
        """Write the plan as JSON atomically; `inputs`: files it must not replace (the traces it came from)."""
        return write_json(path, self.to_dict(), force=force, inputs=inputs)

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
        if moe is not None and (not isinstance(moe, list) or not all(is_int(x) and x >= 0 for x in moe)
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
            ids = resident_ids(f"{where}: layers[{i}].resident", e["resident"], E)
            entry = dict(e)
            entry["resident"] = ids
            entry.setdefault("moe_index", i)
            layer, pos = entry.get("layer"), entry["moe_index"]
            if layer is not None and (not is_int(layer) or layer < 0):
                raise MoesiftError(f"{where}: layers[{i}].layer must be a decoder layer id (got {layer!r:.40})")
            if not is_int(pos) or pos < 0:
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


def _plan_int(where: str, d: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not is_int(v) or v < lo or (hi is not None and v > hi) or v > 1 << 20:
        raise MoesiftError(f"{where}: {key!r} must be an integer in {lo}..{hi or 1 << 20} (got {v!r:.40})")
    return int(v)


def resident_ids(where: str, ids: list[Any], n_experts: int | None) -> list[int]:
    """Sorted resident ids: integers, no repeats, in 0..n_experts-1 when the plan states the expert count."""
    if not all(is_int(x) for x in ids):
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
                       "resident": resident_ids(f"{where}: per_layer_resident[{i}]", ids, E)})
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


def check_plan_config(plan: Plan, config: Mapping[str, Any], model_name: str | None = None,
                      force_plan: bool = False, what: str = "plan") -> None:
    """Refuse (unless `force_plan`) a plan whose model `config_hash` is not that of `config`, naming the
    config fields that differ when the plan records its model's config. Plans without a config hash
    (hand-written maps, WCER manifests) are checked by shape only, in `Plan.resolve`."""
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


def plan_diff(a: Any, b: Any, model: str | os.PathLike | None = None, force_plan: bool = False) -> dict[str, Any]:
    """Per MoE layer Jaccard of the resident sets of plans `a` and `b`, and (with `model`) the bytes to
    load when switching from bank `a` to bank `b` (experts resident in b but not in a)."""
    pa, pb = as_plan(a), as_plan(b)
    index = None
    if model is not None:
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


def planned_offload(p: Any) -> dict[str, Any] | None:
    pred = (p.predictions or {}).get("offload") if p is not None else None
    return pred if isinstance(pred, dict) else None
