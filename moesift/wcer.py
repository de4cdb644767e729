"""WCER ``expert-trace/1`` JSON: import into a moesift Trace, and export a Trace back to it.

The format (one JSON object per model and workload) holds per-layer selection histograms and summaries
derived from them. Its token figures count token passes through MoE layers (one per token and layer:
``prefill_tokens`` = tokens x ``n_layers``); moesift counts tokens through the model, so the importer
divides by ``n_layers`` and the exporter multiplies back. Its layers are MoE blocks in order (decoder
layer ids unknown, unless the file carries the optional keys moesift writes: ``moe_layers`` (decoder layer
ids), ``hidden_size``, ``num_hidden_layers``), and it names the model by hub id only (no model_type / config
hash). Histograms
mix prompt and generated tokens, so an imported trace holds them all under ``prefill_counts``.
Co-activation is only present as top pairs per layer; they are kept in ``extra`` (not as a full matrix)
and written back unchanged.

``per_layer_weight_mass`` is, per layer and expert, the router probability of the selected expert before
top-k renormalisation (full softmax over all experts), summed over routed tokens: moesift's
``selected_prob_mass`` (for sigmoid routers, the sigmoid score as the model computes it, before the selection
bias and renormalisation). It is imported into, and exported from, ``selected_prob_mass``, never
``weight_mass`` (the weights the model applies, after renormalisation). A trace recorded before
``selected_prob_mass`` existed is exported with ``per_layer_weight_mass: null`` and ``router_weights`` saying
why. ``max_tokens_per_prompt`` is the generation budget (the trace's ``generate``; 0 for prefill-only traces).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoesiftError
from .tracefile import MAX_COUNT, MAX_MASS, Trace, validate_trace

SCHEMA = "expert-trace/1"
COVERAGE_PCTS = (50, 80, 90, 95, 99)
COVERAGE_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOP_M = 16


def load_expert_trace(path: str | os.PathLike) -> Trace:
    """Import a WCER ``expert-trace/1`` JSON file as a Trace."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoesiftError(f"trace file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoesiftError(f"cannot read {str(p)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise MoesiftError(f"{str(p)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return from_expert_trace(d, str(p))


def from_expert_trace(d: Any, where: str = "expert-trace") -> Trace:
    """Trace from a parsed ``expert-trace/1`` object."""
    if not isinstance(d, dict):
        raise MoesiftError(f"{where!r} is not an {SCHEMA} object (top level is {type(d).__name__})")
    if d.get("schema_version") != SCHEMA:
        raise MoesiftError(
            f"{where!r} has schema_version {d.get('schema_version')!r}; expected {SCHEMA!r} "
            "(or a moesift-trace/1 safetensors file)"
        )
    for k in ("n_layers", "n_experts", "top_k", "per_layer_histogram"):
        if k not in d:
            raise MoesiftError(f"{where!r} is missing {k!r}; not a complete {SCHEMA} file")
    L, E, K = (_meta_count(where, d, k) for k in ("n_layers", "n_experts", "top_k"))
    hist = _number_array(where, d["per_layer_histogram"], "per_layer_histogram", integer=True)
    if hist.shape != (L, E) or L < 1 or E < 1 or not 1 <= K <= E:
        raise MoesiftError(
            f"{where!r}: per_layer_histogram has shape {list(hist.shape)}; n_layers={L}, n_experts={E}, top_k={K}"
        )
    arrays: dict[str, np.ndarray] = {"prefill_counts": hist}
    wm = d.get("per_layer_weight_mass")
    if wm is not None:
        w = _number_array(where, wm, "per_layer_weight_mass", integer=False)
        if w.shape != (L, E):
            raise MoesiftError(f"{where!r}: per_layer_weight_mass must be [n_layers][n_experts] numbers")
        arrays["selected_prob_mass"] = w

    def per_model(key: str) -> int:
        v = d.get(key, 0) or 0
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
            raise MoesiftError(f"{where!r}: {key} must be a non-negative integer (got {str(v)[:40]})")
        return int(round(v / L))

    hash_layers = d.get("hash_layers") or []
    if not isinstance(hash_layers, list) or any(not isinstance(h, int) or not 0 <= h < L for h in hash_layers):
        raise MoesiftError(f"{where!r}: hash_layers must be a list of layer positions below {L}")
    meta = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
    extra: dict[str, Any] = {"imported_from": SCHEMA, "wcer": meta}
    pairs = d.get("coactivation_top_pairs_per_layer")
    if isinstance(pairs, list) and len(pairs) == L:
        extra["coactivation_top_pairs_per_layer"] = pairs
    for key in ("model_id", "model_type", "config_hash", "workload_label"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise MoesiftError(f"{where!r}: {key} must be a string (got {type(d[key]).__name__})")
    if d.get("n_prompts") is not None and (not isinstance(d["n_prompts"], int) or isinstance(d["n_prompts"], bool)
                                           or not 0 <= d["n_prompts"] <= MAX_COUNT):
        raise MoesiftError(f"{where!r}: n_prompts must be a non-negative integer")
    shape = _shape_keys(d, L, where)
    t = Trace(
        model={
            **shape,
            "name": d.get("model_id"),
            "model_type": d.get("model_type"),
            "config_hash": d.get("config_hash"),
            "moe_layers": shape.get("moe_layers"),
            "n_experts": E,
            "top_k": K,
            "n_shared": None,
            "hash_layers": list(hash_layers),
        },
        workload={
            "label": str(d.get("workload_label") or Path(where).stem),
            "sources": [{"path": where}],
            "token_sha256": None,
            "documents": int(d.get("n_prompts", 0) or 0),
            "prefill_tokens": per_model("prefill_tokens"),
            "decode_tokens": per_model("decode_tokens"),
        },
        arrays=arrays,
        tool={"name": d.get("tool", "wcer expert_trace"), "schema_version": SCHEMA},
        extra=extra,
    )
    return validate_trace(t, repr(where))


def _meta_count(where: str, d: dict[str, Any], key: str) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 20:
        raise MoesiftError(f"{where!r}: {key} must be a positive integer (got {str(v)[:40]})")
    return v


def _number_array(where: str, v: Any, key: str, integer: bool) -> np.ndarray:
    """A rectangular array of JSON numbers: finite, non-negative, below the trace's magnitude limits;
    counts must be whole numbers."""
    bad = f"{where!r}: {key} must be a rectangular list of lists of non-negative {'integers' if integer else 'numbers'}"
    if not isinstance(v, list) or not all(
        isinstance(row, list) and all(type(x) in (int, float) for x in row) for row in v
    ):
        raise MoesiftError(bad)
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise MoesiftError(bad) from None
    if a.ndim != 2:
        raise MoesiftError(bad)
    if not np.isfinite(a).all():
        raise MoesiftError(f"{where!r}: {key} holds NaN or infinite values")
    if a.size and a.min() < 0:
        raise MoesiftError(f"{where!r}: {key} holds negative values")
    limit = MAX_COUNT if integer else MAX_MASS
    if a.size and a.max() > limit:
        raise MoesiftError(f"{where!r}: {key} holds values above {limit:.3g}; the file is damaged")
    if integer:
        if (a != np.floor(a)).any():
            raise MoesiftError(f"{where!r}: {key} holds fractional counts")
        return a.astype(np.int64)
    return a


def dump_expert_trace(trace: Trace, top_m: int = TOP_M) -> dict[str, Any]:
    """The ``expert-trace/1`` object of `trace` (summaries computed with the format's own definitions:
    experts hottest-first, coverage = cumulative share of a layer's routes)."""
    hist = trace.counts.astype(np.int64)
    L, E = hist.shape
    co = trace.arrays.get("coactivation")
    kept_pairs = trace.extra.get("coactivation_top_pairs_per_layer")
    points = [p for p in COVERAGE_POINTS if p <= E]
    hot, imbalance, coverage_at, needed, coact_top = [], [], [], [], []
    for layer in range(L):
        h = hist[layer]
        total = int(h.sum())
        order = np.argsort(-h, kind="stable")  # ties: lower expert id first
        sorted_counts = h[order]
        cum = np.cumsum(sorted_counts) / max(total, 1)
        hot.append([[int(order[i]), int(sorted_counts[i])] for i in range(min(top_m, E))])
        mean = total / E
        imbalance.append(float(sorted_counts[0] / mean) if mean else 0.0)
        coverage_at.append({str(p): float(cum[min(p, len(cum)) - 1]) for p in points})
        needed.append({str(p): int(np.searchsorted(cum, p / 100.0) + 1) for p in COVERAGE_PCTS})
        if co is not None:
            C = np.triu(np.asarray(co[layer], dtype=np.int64), k=1)
            pairs = []
            if C.max() > 0:
                for f in np.argsort(-C, axis=None)[:top_m]:
                    i, j = np.unravel_index(f, C.shape)
                    if C[i, j] > 0:
                        pairs.append([int(i), int(j), int(C[i, j])])
            coact_top.append(pairs)
        elif kept_pairs is not None:
            coact_top.append(kept_pairs[layer])
        else:
            coact_top.append([])
    w = trace.workload
    wmeta = trace.extra.get("wcer", {}) if trace.extra.get("imported_from") == SCHEMA else {}
    prefill, decode = int(w.get("prefill_tokens") or 0), int(w.get("decode_tokens") or 0)
    spm = trace.arrays.get("selected_prob_mass")
    if wmeta.get("router_weights"):
        rw = wmeta["router_weights"]
    elif spm is not None:
        rw = ("captured (summed router probability of the selected experts before top-k renormalisation: softmax "
              "over all experts; sigmoid routers: the sigmoid score)")
    elif trace.arrays.get("weight_mass") is not None:
        rw = ("not_captured (this trace predates selected_prob_mass; its weight_mass holds the applied, "
              "renormalised weights, which are not this field; trace again to export it)")
    else:
        rw = "not_captured (indices-only)"
    out: dict[str, Any] = {
        "schema_version": SCHEMA,
        "router_weights": rw,
        "per_layer_weight_mass": np.asarray(spm, dtype=np.float64).tolist() if spm is not None else None,
        "n_layers": L,
        "n_experts": E,
        "top_k": trace.top_k,
        "n_forward_calls": int(wmeta.get("n_forward_calls", (int(w.get("documents") or 0) + decode) * L)),
        "hash_layers": [int(h) for h in (trace.model.get("hash_layers") or [])],
        "prefill_tokens": int(wmeta.get("prefill_tokens", prefill * L)),
        "decode_tokens": int(wmeta.get("decode_tokens", decode * L)),
        "total_routes": int(hist.sum()),
        "per_layer_histogram": hist.tolist(),
        "hot_experts_per_layer": hot,
        "imbalance_ratio_per_layer": imbalance,
        "coverage_fraction_at_topM_per_layer": coverage_at,
        "experts_needed_for_pct_coverage_per_layer": needed,
        "coactivation_top_pairs_per_layer": coact_top,
        "model_id": trace.model.get("name"),
        "workload_label": trace.label,
        "n_prompts": int(w.get("documents") or 0),
        "max_tokens_per_prompt": int(wmeta.get("max_tokens_per_prompt", w.get("generate") or 0) or 0),
        "prefill_only": bool(wmeta.get("prefill_only", decode == 0)),
    }
    if trace.model.get("model_type"):
        out["model_type"] = trace.model["model_type"]
    if trace.model.get("config_hash"):
        out["config_hash"] = trace.model["config_hash"]
    for k in ("moe_layers", "hidden_size", "num_hidden_layers"):  # optional keys, read back by the importer
        if trace.model.get(k) is not None:
            out[k] = trace.model[k]
    return out


def _shape_keys(d: dict[str, Any], L: int, where: str) -> dict[str, Any]:
    """The optional ``moe_layers`` / ``hidden_size`` / ``num_hidden_layers`` keys, checked."""
    out: dict[str, Any] = {}
    for k in ("hidden_size", "num_hidden_layers"):
        v = d.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MoesiftError(f"{where!r}: {k} must be a positive integer (got {v!r})")
            out[k] = v
    ml = d.get("moe_layers")
    if ml is not None:
        if (not isinstance(ml, list) or len(ml) != L or any(not isinstance(x, int) or isinstance(x, bool) for x in ml)
                or any(b <= a for a, b in zip(ml, ml[1:], strict=False)) or (ml and ml[0] < 0)):
            raise MoesiftError(f"{where!r}: moe_layers must list {L} increasing decoder layer ids")
        if ml and out.get("num_hidden_layers") is not None and ml[-1] >= out["num_hidden_layers"]:
            raise MoesiftError(f"{where!r}: moe_layers {ml[-1]} is not below num_hidden_layers "
                               f"{out['num_hidden_layers']}")
        out["moe_layers"] = ml
    return out
