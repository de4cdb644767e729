"""Planning for the offload runtime (`plan --offload`): the device bytes of a resident set plus cache slots,
the checkpoint budget left under a device-memory limit, and the cache hit rate the simulator predicts
in-sample and on held-out folds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..analysis.cachesim import simulate, token_rows
from ..core.errors import MoesiftError
from ..core.values import fmt_bytes


def device_bytes(idx: Any, resident: Mapping[int, Sequence[int]], slots: Mapping[int, int]) -> dict[str, int]:
    """Bytes on the device, from the checkpoint headers: every tensor that is not a routed expert (routers
    whole) and, per MoE layer, its resident experts plus its cache slots."""
    E = idx.spec.n_experts
    fixed = 0
    per_layer: dict[int, int] = {}
    for t in idx.tensors:
        r = t.role
        if r.kind == "expert" and r.layer is not None:
            per_layer[r.layer] = per_layer.get(r.layer, 0) + t.nbytes
        else:
            fixed += t.nbytes
    experts = 0
    for layer, total in per_layer.items():
        n = len(resident.get(layer, range(E))) + int(slots.get(layer, 0))
        experts += n * total // E
    return {"non_expert": fixed, "experts": experts, "total": fixed + experts,
            "expert_bytes_per_layer": {int(k): v // E for k, v in per_layer.items()}}


def simulate_layer(log: Any, capacity: int, policy: str, pinned: Sequence[int]) -> dict[str, Any]:
    """`cachesim.simulate`, and for `capacity` 0 (no cache) the pinned hits alone."""
    if capacity > 0:
        return simulate(log, capacity, policy, pinned=pinned)
    _, hits, acc = token_rows(log, pinned)
    return {"hits": hits, "misses": acc - hits, "accesses": acc, "hit_rate": hits / acc if acc else float("nan")}


def offload_budget(index: Any, memory: int, cache_slots: int | None) -> tuple[int, int]:
    """(bytes left for the plan's checkpoint-size budget, cache slots per layer) when `memory` device bytes
    must hold the non-expert weights (routers whole), the resident experts and the cache slots. The plan
    budget counts the trimmed checkpoint (routers sliced), so the whole routers are set aside as well."""
    spec = index.spec
    if cache_slots is None:
        cache_slots = 2 * spec.top_k
    cache_slots = int(cache_slots)
    if cache_slots < 0:
        raise MoesiftError("--cache-slots must be >= 0")
    if cache_slots > spec.n_experts:
        raise MoesiftError(f"--cache-slots {cache_slots} is larger than the {spec.n_experts} experts of a layer")
    fixed = device_bytes(index, {}, {})
    fixed_bytes = fixed["non_expert"]
    if memory < fixed_bytes:
        raise MoesiftError(f"--memory {fmt_bytes(memory)} is below the {fmt_bytes(fixed_bytes)} of "
                           f"non-expert weights of {str(index.directory)!r} (embeddings, attention, routers, "
                           "shared experts); raise --memory")
    per = fixed["expert_bytes_per_layer"]
    slot_bytes = sum(cache_slots * b for b in per.values())
    router = sum(t.nbytes for t in index.tensors if t.role.kind in ("router", "router_bias"))
    left = memory - slot_bytes - router
    if left < fixed_bytes:
        raise MoesiftError(f"--memory {fmt_bytes(memory)} holds the non-expert weights "
                           f"({fmt_bytes(fixed_bytes)}) but not {cache_slots} cache slots per layer "
                           f"({fmt_bytes(slot_bytes)}) and any resident expert; raise --memory or lower "
                           "--cache-slots")
    return left, cache_slots


def _fold_logs(trace: Any) -> list[Any] | None:
    """Routing log rows of each fold (documents dealt round-robin, document i -> fold i % F), or None."""
    log, offs, fc = trace.get("routing_log"), trace.get("doc_offsets"), trace.get("fold_counts")
    if log is None or offs is None or fc is None or fc.shape[0] < 2:
        return None
    F = fc.shape[0]
    parts: list[list[Any]] = [[] for _ in range(F)]
    for i in range(len(offs) - 1):
        parts[i % F].append(np.arange(int(offs[i]), int(offs[i + 1])))
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def offload_prediction(traces: Sequence[Any], resident: Sequence[Sequence[int]], slots: int, policy: str = "lru",
                       index: Any = None, moe_layers: Sequence[Any] | None = None) -> dict[str, Any]:
    """Hit rate `cachesim` predicts for this runtime: resident experts pinned, `slots` cache slots per
    layer. In-sample on the traces' routing logs; held-out per fold (the resident set of each layer chosen
    as the same number of most-routed experts of the other folds, simulated on the fold's documents)."""
    logs = [t for t in traces if t.get("routing_log") is not None and t.get("routing_log").shape[0]]
    out: dict[str, Any] = {"cache_slots": int(slots), "policy": policy}
    if index is not None and moe_layers is not None and None not in moe_layers:
        res = {int(layer): list(r) for layer, r in zip(moe_layers, resident, strict=True)}
        E = index.spec.n_experts
        sl = {layer: min(slots, E - len(r)) for layer, r in res.items()}
        out["device_bytes"] = device_bytes(index, res, sl)["total"]
    if not logs:
        out["note"] = "the traces have no routing log (trace with --log-routing); no hit rate can be predicted"
        return out
    E = int(logs[0].n_experts)
    hits = acc = 0
    per_layer = []
    for p, r in enumerate(resident):
        cap = min(int(slots), E - len(r))
        h = a = 0
        for t in logs:
            s = simulate_layer(np.asarray(t.get("routing_log")[:, p, :], dtype=np.int64), cap, policy, r)
            h, a = h + s["hits"], a + s["accesses"]
        per_layer.append(h / a if a else None)
        hits, acc = hits + h, acc + a
    out["hit_rate"] = hits / acc if acc else None
    out["hit_rate_layers"] = per_layer
    folds = [(t, _fold_logs(t)) for t in logs]
    if any(f is None for _, f in folds):
        out["heldout_note"] = "the traces have no folds; the held-out hit rate cannot be estimated"
        return out
    hh = ha = 0
    for t, parts in folds:
        fc = t.get("fold_counts")
        log = t.get("routing_log")
        for f, rows in enumerate(parts):
            if rows.size == 0:
                continue
            other = fc.sum(axis=0) - fc[f]
            for p, r in enumerate(resident):
                n = len(r)
                pick = sorted(np.argsort(-other[p], kind="stable")[:n].tolist())
                cap = min(int(slots), E - n)
                s = simulate_layer(np.asarray(log[rows, p, :], dtype=np.int64), cap, policy, pick)
                hh, ha = hh + s["hits"], ha + s["accesses"]
    out["heldout_hit_rate"] = hh / ha if ha else None
    out["heldout_note"] = ("each fold's resident sets: the same number of most-routed experts of the other folds "
                           "per layer; simulated on the fold's documents, cache cold at each fold")
    return out
