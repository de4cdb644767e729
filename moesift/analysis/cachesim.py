"""Expert-cache simulation for one MoE layer: LRU, LFU and Belady-optimal hit rates.

Model of the cache (one definition for every policy):

- The input is a routing log of ONE layer, ``log [N, K]`` of expert ids, tokens in order. A token's
  ids are accessed together: before the token's expert computation runs, every one of its (non-pinned)
  experts must be resident at the same time. Duplicate ids in a row count once; negative ids (padding)
  are ignored. ``accesses`` is the number of (token, distinct expert) pairs.
- ``pinned`` experts are always resident, always hit, and take no cache slot.
- The cache holds at most ``capacity`` non-pinned experts and starts empty (cold misses count).
  ``capacity`` must be at least the largest number of distinct non-pinned experts of one token.
- A token's experts already resident are hits; the others are misses and are loaded (demand paging).
  When slots run out, victims are chosen among resident experts the current token does not use:
    * ``lru``: least recently used; experts used by the same token are ordered by their column in the
      row (an earlier column counts as less recent).
    * ``lfu``: fewest accesses since the start of the log (frequency survives eviction), ties broken
      by least recent use as in LRU.
    * ``belady``: the expert whose next use is furthest in the future (never again = infinitely far),
      ties broken by the smaller expert id. Evicting the furthest next use is optimal: no policy,
      online or offline, takes fewer misses on the same log (checked by exhaustive search in tests).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.progress import progress_bar
from ..core.values import check_int
from ..formats.checkpoint import CheckpointIndex
from ..formats.plan import Plan, as_plan, check_plan_config
from ..formats.trace import Trace

ONLINE_POLICIES = ("lru", "lfu")  # the policies a runtime can apply (Belady needs the future)
POLICIES = (*ONLINE_POLICIES, "belady")


class OnlineCache:
    """The cache model above for an online policy (``lru`` or ``lfu``), one token at a time: the resident
    experts, their recency, access counts and last use, and the eviction rule. A runtime cache (the expert
    slots of `moesift.apply.offload`) is this class with slots added, so its hits are the simulation's;
    `simulate` computes the same hits for a whole log with faster equivalents (tests check both agree)."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if policy not in ONLINE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose one of {', '.join(ONLINE_POLICIES)}")
        self.capacity = int(capacity)
        self.policy = policy
        self.recency: OrderedDict[int, None] = OrderedDict()  # resident experts, least recently used first
        self.freq: dict[int, int] = {}  # accesses since the start (kept across evictions)
        self.last: dict[int, int] = {}  # access clock of the last use
        self.clock = 0
        self.hits = self.accesses = self.loads = 0

    def victims(self, row: list[int], over: int) -> list[int]:
        """The `over` resident experts evicted for token `row` (fewer when the others are all in `row`)."""
        cur = set(row)
        if self.policy == "lru":
            return [e for e in self.recency if e not in cur][:over]
        return sorted((e for e in self.recency if e not in cur), key=lambda e: (self.freq[e], self.last[e]))[:over]

    def evict(self, expert: int) -> None:
        del self.recency[expert]

    def use(self, row: list[int]) -> None:
        """Record one token's accesses, column order (every expert of `row` is resident now)."""
        for e in row:
            self.recency[e] = None
            self.recency.move_to_end(e)
            self.freq[e] = self.freq.get(e, 0) + 1
            self.last[e] = self.clock
            self.clock += 1

    def token(self, row: list[int]) -> list[int]:
        """Access the distinct non-pinned experts `row` of one token: hits and loads counted, victims evicted,
        misses loaded. Returns the victims."""
        miss = [e for e in row if e not in self.recency]
        self.accesses += len(row)
        self.hits += len(row) - len(miss)
        self.loads += len(miss)
        over = len(self.recency) + len(miss) - self.capacity
        victims = self.victims(row, over) if over > 0 else []
        if len(victims) < over:
            raise ValueError(f"cache capacity {self.capacity} is below the {len(row)} non-pinned experts one token "
                             "needs at once")
        for v in victims:
            self.evict(v)
        self.use(row)
        return victims


def token_rows(log: np.ndarray, pinned) -> tuple[list[list[int]], int, int]:
    """Rows as lists of distinct non-negative non-pinned ids in column order; pinned hit count; accesses."""
    log = np.asarray(log)
    if log.ndim == 1:
        log = log[:, None]
    if log.ndim != 2:
        raise ValueError(f"routing log of one layer must be [N, K], got shape {tuple(log.shape)}")
    if log.size and not np.issubdtype(log.dtype, np.integer):
        raise ValueError(f"routing log must hold integer expert ids, got {log.dtype}")
    log = log.astype(np.int64, copy=False)
    N, K = log.shape
    valid = log >= 0
    if K > 1:
        # drop repeats of an id within a row (keep the first column)
        srt = np.sort(log, axis=1)
        has_dup = bool((srt[:, 1:] == srt[:, :-1]).any()) if N else False
        if has_dup:
            for j in range(1, K):
                valid[:, j] &= ~(log[:, :j] == log[:, j : j + 1]).any(axis=1)
    accesses = int(valid.sum())
    pin = np.asarray(sorted({int(p) for p in pinned}), dtype=np.int64)
    pinned_mask = np.isin(log, pin) & valid if pin.size else np.zeros_like(valid)
    pinned_hits = int(pinned_mask.sum())
    keep = valid & ~pinned_mask
    if keep.all():
        rows = log.tolist()
    else:
        rows = [[e for e, k in zip(r, m, strict=True) if k] for r, m in zip(log.tolist(), keep.tolist(), strict=True)]
    return rows, pinned_hits, accesses


def _check_capacity(rows: list[list[int]], capacity: int) -> None:
    need = max((len(r) for r in rows), default=0)
    if capacity < need:
        raise ValueError(f"cache capacity {capacity} is below the {need} non-pinned experts one token needs at once")


def _lru(rows: list[list[int]], capacity: int) -> int:
    od: OrderedDict[int, None] = OrderedDict()
    move, pop = od.move_to_end, od.popitem
    hits = 0
    for r in rows:
        miss = 0
        for e in r:
            if e in od:
                hits += 1
                move(e)
            else:
                miss += 1
        if miss:
            # the current token's resident experts sit at the end, so the front holds the victims
            over = len(od) + miss - capacity
            for _ in range(over):
                pop(last=False)
        for e in r:
            od[e] = None
            move(e)
    return hits


def _lfu(rows: list[list[int]], capacity: int) -> int:
    freq: dict[int, int] = {}
    key: dict[int, tuple[int, int]] = {}  # resident expert -> (freq, time) of its live heap entry
    heap: list[tuple[int, int, int]] = []
    hits = 0
    t = 0  # access clock: one tick per (token, expert), column order within a token
    for r in rows:
        cur = set(r)
        miss = [e for e in r if e not in key]
        hits += len(r) - len(miss)
        over = len(key) + len(miss) - capacity
        held = []
        while over > 0:
            f, tt, e = heapq.heappop(heap)
            if key.get(e) != (f, tt):
                continue  # stale entry
            if e in cur:
                held.append((f, tt, e))
                continue
            del key[e]
            over -= 1
        for h in held:
            heapq.heappush(heap, h)
        for e in r:
            f = freq.get(e, 0) + 1
            freq[e] = f
            key[e] = (f, t)
            heapq.heappush(heap, (f, t, e))
            t += 1
        if len(heap) > 4 * capacity + 64:
            heap = [(f, tt, e) for e, (f, tt) in key.items()]
            heapq.heapify(heap)
    return hits


def next_use(rows: list[list[int]]) -> list[list[int]]:
    """For each (token, expert) of ``rows``, the index of the next token that uses the expert (N if none)."""
    N = len(rows)
    k0 = len(rows[0]) if N else 0
    uniform = N > 0 and all(len(r) == k0 for r in rows)
    if uniform:
        lens = np.full(N, k0, dtype=np.int64)
        flat = np.array(rows, dtype=np.int64).reshape(-1)
    else:
        lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=N)
        flat = np.fromiter((e for r in rows for e in r), dtype=np.int64, count=int(lens.sum()))
    tok = np.repeat(np.arange(N, dtype=np.int64), lens)
    order = np.lexsort((tok, flat))
    nxt_sorted = np.full(flat.size, N, dtype=np.int64)
    if flat.size > 1:
        same = flat[order][1:] == flat[order][:-1]
        nxt_sorted[:-1][same] = tok[order][1:][same]
    nxt = np.empty_like(nxt_sorted)
    nxt[order] = nxt_sorted
    if uniform:
        return nxt.reshape(N, k0).tolist()
    out, pos = [], 0
    nl = nxt.tolist()
    for n in lens.tolist():
        out.append(nl[pos : pos + n])
        pos += n
    return out


def _belady(rows: list[list[int]], capacity: int) -> int:
    nu = next_use(rows)
    key: dict[int, int] = {}  # resident expert -> its next use
    heap: list[tuple[int, int]] = []  # (-next_use, expert): smallest = furthest next use, then smaller id
    hits = 0
    for r, nr in zip(rows, nu, strict=True):
        miss = 0
        for e in r:
            if e in key:
                hits += 1
            else:
                miss += 1
        over = len(key) + miss - capacity
        while over > 0:
            ne, e = heapq.heappop(heap)
            if key.get(e) != -ne:
                continue  # stale entry
            # a resident expert of the current token has next use == this token, the nearest of all, so it
            # is popped only after every other resident; the capacity check keeps that from happening.
            del key[e]
            over -= 1
        for e, n in zip(r, nr, strict=True):
            key[e] = n
            heapq.heappush(heap, (-n, e))
        if len(heap) > 4 * capacity + 64:
            heap = [(-n, e) for e, n in key.items()]
            heapq.heapify(heap)
    return hits


def simulate(log: np.ndarray, capacity: int, policy: str = "lru", pinned=()) -> dict[str, Any]:
    """Simulate an expert cache of ``capacity`` slots on one layer's routing log ``[N, K]``.

    Returns ``{"hits", "misses", "accesses", "hit_rate"}`` (hits include pinned experts; misses are expert
    loads). See the module docstring for the exact cache model.
    """
    policy = str(policy).lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
    capacity = int(capacity)
    rows, pinned_hits, accesses = token_rows(log, pinned)
    _check_capacity(rows, capacity)
    fn = {"lru": _lru, "lfu": _lfu, "belady": _belady}[policy]
    cached_hits = fn(rows, capacity) if rows else 0
    hits = cached_hits + pinned_hits
    misses = accesses - hits
    return {
        "hits": int(hits),
        "misses": int(misses),
        "accesses": int(accesses),
        "hit_rate": float(hits / accesses) if accesses else float("nan"),
    }


def capacity_for_hit_rate(log: np.ndarray, target: float, policy: str = "lru", pinned=()) -> int | None:
    """Smallest cache capacity whose hit rate reaches ``target``, by bisection between the experts one token
    needs and the distinct experts of the log (exact for LRU and Belady, whose hit rate never falls as the
    cache grows; for LFU a capacity that reaches the target). None when ``target`` is above what caching every
    expert gives (cold misses)."""
    rows, _, _ = token_rows(log, pinned)
    lo = max((len(r) for r in rows), default=0)
    hi = max(lo, len({e for r in rows for e in r}))
    if not simulate(log, hi, policy, pinned)["hit_rate"] >= target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if simulate(log, mid, policy, pinned)["hit_rate"] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


simulate_cache = simulate


def _pinned_per_layer(resident, trace, force_plan: bool = False) -> list[list[int]]:
    """Resident ids per MoE position from a plan file, a Plan or {decoder layer: ids}. A plan made for another
    model than the trace's (model type, expert count or config hash) is refused unless `force_plan`."""
    moe_layers = [int(x) for x in (trace.model.get("moe_layers") or range(trace.n_layers))]
    L = trace.n_layers
    if isinstance(resident, dict):
        entries = [{"layer": k, "resident": v} for k, v in resident.items()]
        where = "resident set"
    else:
        plan = resident if isinstance(resident, Plan) else Plan.load(resident)
        entries = plan.layers
        where = f"plan {str(resident)!r}"
        for key in ("model_type", "n_experts", "config_hash"):
            a, b = plan.model.get(key), trace.model.get(key)
            if a is not None and b is not None and a != b and not (force_plan and key == "config_hash"):
                raise MoesiftError(f"{where} was made for another model than the trace ({key} {str(a)[:16]} vs "
                                   f"{str(b)[:16]}); plan from a trace of this model"
                                   + ("" if key != "config_hash" else ", or pass --force-plan"))
    out: list[list[int]] = [[] for _ in range(L)]
    for i, e in enumerate(entries):
        layer = e.get("layer")
        if layer is not None and int(layer) in moe_layers:
            pos = moe_layers.index(int(layer))
        elif layer is None:
            pos = int(e.get("moe_index", i))
        else:
            raise MoesiftError(f"{where} names decoder layer {layer}, which is not a MoE layer of the trace")
        if pos >= L:
            raise MoesiftError(f"{where} has more MoE layers than the trace ({L})")
        ids = sorted(int(x) for x in e["resident"])
        if ids and (ids[0] < 0 or ids[-1] >= trace.n_experts):
            raise MoesiftError(f"{where} names expert ids outside 0..{trace.n_experts - 1}")
        out[pos] = ids
    return out


def _expert_bytes(model: Any, resident: Any, force_plan: bool, E: int, L: int) -> list[float]:
    """Bytes of one expert per MoE layer, from `model`'s headers (the largest expert of the layer)."""
    idx = CheckpointIndex.build(model)
    spec = idx.spec
    if spec.n_experts != E or len(spec.moe_layers) != L:
        raise MoesiftError(f"model {str(model)!r} has {len(spec.moe_layers)} MoE layers x {spec.n_experts} "
                           f"experts; the trace has {L} x {E}; use the model the trace was made with")
    if resident is not None and not isinstance(resident, dict):
        check_plan_config(as_plan(resident), idx.config, str(model), force_plan)
    eb = idx.expert_bytes()
    return [float(max(eb[dl].values())) if dl in eb else 0.0 for dl in spec.moe_layers]


def _capacities(log: np.ndarray, capacity: int | None, memory: float | None, expert_bytes: list[float] | None,
                pinned: list[list[int]], E: int) -> list[int]:
    """Cache capacity per MoE layer: `capacity`, or `memory` GiB less the pinned experts split evenly over
    layers; checked against the experts one token needs."""
    L = len(pinned)
    if (capacity is None) == (memory is None):
        raise MoesiftError("give exactly one of --capacity (experts per layer) or --memory GiB (with --model)")
    if memory is not None:
        if expert_bytes is None:
            raise MoesiftError("--memory needs --model to know how many bytes an expert takes")
        budget = float(memory) * 2**30 - sum(len(p) * b for p, b in zip(pinned, expert_bytes, strict=True))
        if budget < 0:
            raise MoesiftError(f"--memory {memory} GiB does not even hold the pinned resident set")
        caps = [int(budget / L // b) if b > 0 else E for b in expert_bytes]
    else:
        caps = [int(capacity)] * L
    caps = [min(c, E - len(p)) for c, p in zip(caps, pinned, strict=True)]
    need = [int(((log[:, li, :] >= 0) & ~np.isin(log[:, li, :], p)).sum(1).max()) for li, p in enumerate(pinned)]
    for li in range(L):
        if caps[li] < need[li]:
            raise MoesiftError(f"a cache of {caps[li]} experts at MoE layer {li} cannot hold the {need[li]} "
                               f"non-pinned experts one token needs; raise --capacity/--memory to at least {need[li]}")
    return caps


def _overall(policies: Any, tot: dict, tot_bytes: dict, alone: dict, N: int, expert_bytes: Any,
             resident: Any) -> dict[str, Any]:
    """Hit rate, loads and bytes per token over all layers, per policy."""
    overall: dict[str, Any] = {}
    for p in policies:
        o = {"hit_rate": tot[p][0] / tot[p][1] if tot[p][1] else float("nan"),
             "loads_per_token": (tot[p][1] - tot[p][0]) / N}
        if expert_bytes is not None:
            o["bytes_per_token"] = tot_bytes[p]
        if resident is not None and alone[p][1]:
            o["cache_only_equal_memory_hit_rate"] = alone[p][0] / alone[p][1]
        overall[p] = o
    return overall


def cache(trace, capacity: int | None = None, memory: float | None = None, model=None, resident=None,
          json: bool = False, policies=POLICIES, target: float = 0.9, max_tokens: int | None = None,
          progress: bool = True, force_plan: bool = False) -> dict[str, Any]:
    """Expert offloading simulated per MoE layer from a trace's routing log.

    A cache of ``capacity`` experts per layer (or ``memory`` GiB of expert weights with ``model``, split
    evenly over layers after the pinned experts), optionally beside a pinned ``resident`` set (a plan).
    Reports hit rates per policy, expert loads and bytes moved per token, and the cache size per layer
    that reaches ``target`` hit rate. With a resident set, also the cache-only figures at equal memory.
    A resident plan made for another config than `model`'s is refused unless `force_plan`.
    """
    tr = trace if isinstance(trace, Trace) else Trace.load(trace)
    log = tr.get("routing_log")
    if log is None or log.shape[0] == 0:
        raise MoesiftError(f"trace {getattr(trace, 'name', trace)!s} has no routing log; trace again with --log-routing")
    if max_tokens is not None and log.shape[0] > max_tokens:
        log = log[: int(max_tokens)]
    N, L, K = log.shape
    E = tr.n_experts
    for p in policies:
        if p not in POLICIES:
            raise MoesiftError(f"unknown cache policy {p!r}; choose from {', '.join(POLICIES)}")
    if memory is not None and not (isinstance(memory, (int, float)) and math.isfinite(memory) and memory > 0):
        raise MoesiftError(f"--memory must be a positive number of GiB (got {memory!r})")
    if capacity is not None:
        check_int("--capacity", capacity, 0)
    pinned = _pinned_per_layer(resident, tr, force_plan) if resident is not None else [[] for _ in range(L)]
    expert_bytes = _expert_bytes(model, resident, force_plan, E, L) if model is not None else None
    caps = _capacities(log, capacity, memory, expert_bytes, pinned, E)
    layers = []
    tot = {p: [0, 0] for p in policies}
    tot_bytes = {p: 0.0 for p in policies}
    alone = {p: [0, 0] for p in policies}
    with progress_bar(not json and progress) as bar:
        task = bar.add_task("simulating caches", total=L)
        for li in range(L):
            lay = np.ascontiguousarray(log[:, li, :]).astype(np.int64)
            row: dict[str, Any] = {"moe_index": li, "layer": int((tr.model.get("moe_layers") or range(L))[li]),
                                   "capacity": caps[li], "pinned": len(pinned[li])}
            for p in policies:
                r = simulate(lay, caps[li], p, pinned[li])
                r["loads_per_token"] = r["misses"] / N
                if expert_bytes is not None:
                    r["bytes_per_token"] = r["misses"] * expert_bytes[li] / N
                    tot_bytes[p] += r["bytes_per_token"]
                tot[p][0] += r["hits"]
                tot[p][1] += r["accesses"]
                row[p] = r
                if pinned[li]:
                    a = simulate(lay, min(E, caps[li] + len(pinned[li])), p)
                    row.setdefault("cache_only_equal_memory", {})[p] = a["hit_rate"]
                    alone[p][0] += a["hits"]
                    alone[p][1] += a["accesses"]
            row["capacity_for_target"] = {p: capacity_for_hit_rate(lay, target, p, pinned[li])
                                          for p in ("lru", "belady") if p in policies}
            layers.append(row)
            bar.advance(task)
    res: dict[str, Any] = {
        "tokens": int(N), "moe_layers": L, "n_experts": E, "top_k": K, "policies": list(policies),
        "target_hit_rate": target, "capacity_per_layer": caps, "pinned_per_layer": [len(p) for p in pinned],
        "expert_bytes_per_layer": expert_bytes,
        "overall": _overall(policies, tot, tot_bytes, alone, N, expert_bytes, resident), "layers": layers,
    }
    if memory is not None:
        res["memory_gib"] = float(memory)
    return res


def format_cache(res: dict[str, Any]) -> str:
    """What `moesift cache` prints of a `cache` result."""
    lines = [f"{res['tokens']} tokens, {res['moe_layers']} MoE layers, capacity per layer {res['capacity_per_layer'][:8]}"]
    for p, o in res["overall"].items():
        line = f"  {p:7s} hit rate {o['hit_rate']:.4f}  loads/token {o['loads_per_token']:.3f}"
        if "bytes_per_token" in o:
            line += f"  bytes/token {o['bytes_per_token']:.4g}"
        if "cache_only_equal_memory_hit_rate" in o:
            line += f"  (cache only, same memory: {o['cache_only_equal_memory_hit_rate']:.4f})"
        lines.append(line)
    return "\n".join(lines)
