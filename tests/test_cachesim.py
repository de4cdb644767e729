"""Expert cache simulator against brute-force references on tiny logs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesift.analysis.cachesim import capacity_for_hit_rate, next_use, simulate


def rand_log(N, K, E, seed, sticky=0.0):
    rng = np.random.default_rng(seed)
    rows, prev = [], None
    for _ in range(N):
        if prev is not None and rng.random() < sticky:
            row = prev.copy()
            j = rng.integers(K)
            row[j] = rng.choice([e for e in range(E) if e not in row])
        else:
            row = rng.choice(E, K, replace=False)
        rows.append(row)
        prev = row
    return np.array(rows, dtype=np.int64)


# ---- independent references: explicit lists, scan everything every time -------------------------------


def ref_policy(log, cap, policy, pinned=()):
    """Slow reference: cache as a list of [expert, last_time, freq]; victim by full scan."""
    cache: dict[int, list[int]] = {}  # expert -> [last access clock, ...]
    freq: dict[int, int] = {}
    clock = 0
    hits = acc = 0
    N = len(log)
    for t in range(N):
        row = []
        for e in log[t]:
            e = int(e)
            if e >= 0 and e not in row:
                row.append(e)
        acc += len(row)
        need = [e for e in row if e not in pinned]
        hits += len(row) - len(need)
        for e in need:
            if e in cache:
                hits += 1
        missing = [e for e in need if e not in cache]
        for e in missing:
            if len(cache) >= cap:
                cands = [x for x in cache if x not in need]
                if policy == "lru":
                    v = min(cands, key=lambda x: cache[x][0])
                elif policy == "lfu":
                    v = min(cands, key=lambda x: (freq[x], cache[x][0]))
                else:
                    def nxt(x, t=t):
                        for u in range(t + 1, N):
                            if x in [int(y) for y in log[u]]:
                                return u
                        return N + 1

                    v = max(cands, key=nxt)
                del cache[v]
            cache[e] = [0]
        for e in need:
            cache[e][0] = clock
            freq[e] = freq.get(e, 0) + 1
            clock += 1
    return hits, acc


def opt_misses(log, cap, pinned=()):
    """Fewest misses over every sequence of eviction choices (demand paging), by dynamic programming over
    cache states: exhaustive, so it is the optimum whatever the policy."""
    states = {frozenset(): 0}
    for row in log:
        need = {int(e) for e in row if int(e) >= 0 and int(e) not in pinned}
        nxt: dict[frozenset, int] = {}
        for s, m in states.items():
            miss = need - s
            keep_opts = s - need
            room = cap - len(need)
            if len(keep_opts) <= room:
                choices = [keep_opts]
            else:
                choices = [frozenset(c) for c in itertools.combinations(sorted(keep_opts), room)]
            for c in choices:
                ns = frozenset(c) | need
                v = m + len(miss)
                if nxt.get(ns, 1 << 30) > v:
                    nxt[ns] = v
        # also allow keeping fewer than allowed (never better, but keeps the search honest)
        states = nxt
    return min(states.values())


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_policies_match_reference(policy):
    for seed in range(12):
        K = 1 + seed % 3
        E = 5 + seed % 4
        log = rand_log(40, K, E, seed, sticky=0.5)
        for cap in range(K, E + 1):
            r = simulate(log, cap, policy)
            h, a = ref_policy(log, cap, policy)
            assert (r["hits"], r["accesses"]) == (h, a), (seed, cap)
            assert r["hits"] + r["misses"] == r["accesses"]


def test_belady_is_optimal_by_exhaustive_search():
    for seed in range(10):
        K = 1 + seed % 2
        E = 5 + seed % 2
        log = rand_log(12, K, E, seed, sticky=0.3)
        for cap in range(K, E):
            assert simulate(log, cap, "belady")["misses"] == opt_misses(log, cap), (seed, cap)


def test_belady_never_below_lru_or_lfu_random():
    for seed in range(6):
        log = rand_log(600, 4, 24, seed, sticky=0.6)
        for cap in (4, 6, 8, 12, 16):
            b = simulate(log, cap, "belady")["hit_rate"]
            assert b >= simulate(log, cap, "lru")["hit_rate"] - 1e-12
            assert b >= simulate(log, cap, "lfu")["hit_rate"] - 1e-12


def test_pinned_take_no_slot_and_always_hit():
    log = rand_log(300, 2, 10, 3, sticky=0.4)
    pinned = (0, 1, 2)
    n_pinned = int(np.isin(log, pinned).sum())
    for policy in ("lru", "lfu", "belady"):
        r = simulate(log, 2, policy, pinned=pinned)
        h, a = ref_policy(log, 2, policy, pinned=set(pinned))
        assert (r["hits"], r["accesses"]) == (h, a)
        assert r["hits"] >= n_pinned
    r = simulate(log, 0, "lru", pinned=range(10))
    assert r["hit_rate"] == 1.0 and r["misses"] == 0
    assert simulate(log, 0, "belady", pinned=range(10))["misses"] == 0
    # pinning everything but one expert: a cache of one slot misses only on that expert's cold start
    r = simulate(log, 1, "lru", pinned=range(1, 10))
    assert r["misses"] == (1 if (log == 0).any() else 0)


def test_full_cache_only_cold_misses_and_monotone():
    log = rand_log(500, 3, 12, 5, sticky=0.5)
    distinct = len(np.unique(log))
    for policy in ("lru", "lfu", "belady"):
        assert simulate(log, 12, policy)["misses"] == distinct
    prev = -1.0
    for cap in range(3, 13):
        hr = simulate(log, cap, "belady")["hit_rate"]
        assert hr >= prev
        prev = hr
    c = capacity_for_hit_rate(log, 0.5, "lru")
    assert simulate(log, c, "lru")["hit_rate"] >= 0.5
    if c > 3:
        assert simulate(log, c - 1, "lru")["hit_rate"] < 0.5
    assert capacity_for_hit_rate(log, 1.0, "lru") is None  # cold misses make 100% impossible


def test_capacity_below_top_k_and_bad_policy_refused():
    log = rand_log(20, 4, 8, 1)
    with pytest.raises(ValueError, match="capacity 3"):
        simulate(log, 3, "lru")
    with pytest.raises(ValueError, match="unknown cache policy"):
        simulate(log, 4, "fifo")


def test_duplicates_and_padding_count_once():
    log = np.array([[1, 1], [2, -1], [1, 2]])
    r = simulate(log, 2, "lru")
    assert r["accesses"] == 4 and r["hits"] == 2


def test_next_use():
    rows = [[1, 2], [3], [2, 1], [1]]
    assert next_use(rows) == [[2, 2], [4], [4, 3], [4]]


# ---- the cache command ------------------------------------------------------------------------------------


def _trace(L=3, E=12, K=2, N=400, seed=0, moe_layers=None):
    from moesift.formats.trace import Trace

    log = np.stack([rand_log(N, K, E, seed + li, sticky=0.6) for li in range(L)], axis=1).astype(np.int16)
    counts = np.stack([np.bincount(log[:, li].ravel(), minlength=E) for li in range(L)]).astype(np.int64)
    model = {"name": "synthetic", "model_type": "synthetic", "config_hash": "0",
             "moe_layers": moe_layers or list(range(L)), "n_experts": E, "top_k": K, "n_shared": 0}
    return Trace(model=model, workload={"label": "s"},
                 arrays={"prefill_counts": counts, "routing_log": log, "doc_offsets": np.array([0, N])})


def test_cache_report_matches_simulator(tmp_path):
    from moesift.analysis.cachesim import cache

    t = _trace()
    r = cache(t, capacity=4, json=True)
    log = t.get("routing_log").astype(np.int64)
    for li in range(3):
        for p in ("lru", "lfu", "belady"):
            s = simulate(log[:, li], 4, p)
            assert r["layers"][li][p]["hits"] == s["hits"]
            assert r["layers"][li][p]["loads_per_token"] == pytest.approx(s["misses"] / 400)
        c = r["layers"][li]["capacity_for_target"]["belady"]
        assert c is None or simulate(log[:, li], c, "belady")["hit_rate"] >= 0.9
    o = r["overall"]
    assert o["belady"]["hit_rate"] >= o["lru"]["hit_rate"] and o["belady"]["hit_rate"] >= o["lfu"]["hit_rate"]
    # a pinned resident set from a plan file (layers named by decoder layer id)
    plan = {"schema": "moesift-plan/1", "model": {"n_experts": 12, "top_k": 2},
            "layers": [{"layer": i, "moe_index": i, "resident": [0, 1, 2, 3]} for i in range(3)]}
    pf = tmp_path / "plan.json"
    pf.write_text(__import__("json").dumps(plan))
    rp = cache(t, capacity=4, resident=pf, json=True)
    for li in range(3):
        s = simulate(log[:, li], 4, "lru", pinned=(0, 1, 2, 3))
        assert rp["layers"][li]["lru"]["hits"] == s["hits"] and rp["layers"][li]["pinned"] == 4
        assert "cache_only_equal_memory" in rp["layers"][li]
    assert rp["overall"]["belady"]["hit_rate"] > r["overall"]["belady"]["hit_rate"]


def test_cache_errors(tmp_path):
    from moesift.analysis.cachesim import cache
    from moesift.core.errors import MoesiftError
    from moesift.formats.trace import Trace

    t = _trace()
    with pytest.raises(MoesiftError, match="cannot hold"):
        cache(t, capacity=1)
    with pytest.raises(MoesiftError, match="exactly one"):
        cache(t)
    with pytest.raises(MoesiftError, match="needs --model"):
        cache(t, memory=1.0)
    nolog = Trace(model=t.model, workload=t.workload, arrays={"prefill_counts": t.arrays["prefill_counts"]})
    with pytest.raises(MoesiftError, match="--log-routing"):
        cache(nolog, capacity=4)


def test_cache_memory_from_model_headers(tiny_dir):
    from moesift.analysis.cachesim import cache
    from moesift.formats.checkpoint import CheckpointIndex

    d = tiny_dir("qwen3_moe")
    idx = CheckpointIndex.build(d)
    spec = idx.spec
    L, E, K = len(spec.moe_layers), spec.n_experts, spec.top_k
    t = _trace(L=L, E=E, K=K, N=200, moe_layers=list(spec.moe_layers))
    eb = idx.expert_bytes()
    per = max(eb[spec.moe_layers[0]].values())
    want_cap = K + 1
    mem = (want_cap * per * L + per // 2) / 2**30
    r = cache(t, memory=mem, model=d, json=True)
    assert r["capacity_per_layer"] == [want_cap] * L
    lay0 = r["layers"][0]["lru"]
    assert lay0["bytes_per_token"] == pytest.approx(lay0["misses"] * per / 200)
