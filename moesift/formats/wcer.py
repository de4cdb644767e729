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

from typing import Any

import numpy as np

from .trace import WCER_SCHEMA, Trace

SCHEMA = WCER_SCHEMA
COVERAGE_PCTS = (50, 80, 90, 95, 99)
COVERAGE_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOP_M = 16


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


