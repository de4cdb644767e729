"""SRP, SCH and cache hit rates against brute-force implementations written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from moesift.locality import locality, sample_documents, sch, srp


def random_log(N=60, L=2, K=2, E=6, seed=0, sticky=0.5):
    """Routing log with some locality: a token repeats its predecessor's experts with probability `sticky`."""
    rng = np.random.default_rng(seed)
    log = np.zeros((N, L, K), np.int16)
    for t in range(N):
        for li in range(L):
            if t and rng.random() < sticky:
                log[t, li] = log[t - 1, li]
            else:
                log[t, li] = rng.choice(E, size=K, replace=False)
    return log


def docs_of(offs):
    return [(int(a), int(b)) for a, b in zip(offs[:-1], offs[1:], strict=True)]


def brute_srp(log, offs, E, m, layers=None):
    """Per the definition: windows of m tokens (stride 1, inside documents); one threshold j for the aggregate."""
    N, L, K = log.shape
    layers = range(L) if layers is None else layers
    best = (-1.0, None)
    for j in range(m + 1):
        matches = preds = actual = 0
        for li in layers:
            for a, b in docs_of(offs):
                for w in range(a, b - m + 1):
                    c = [0] * E
                    for t in range(w, w + m):
                        for e in log[t, li]:
                            c[int(e)] += 1
                    s = [e for e in range(E) if c[e] >= j]
                    matches += sum(c[e] for e in s)
                    preds += len(s) * m
                    actual += K * m
        if actual == 0:
            return None
        f1 = 2 * matches / (preds + actual)
        if f1 > best[0]:
            best = (f1, j)
    return best


def brute_sch(log, offs, E, m, C, li):
    """At token t the cache holds the C experts most frequent in tokens t..t+m-1 of the document, ties to the
    most recently used before t, then to the lower id."""
    hits = acts = 0
    for a, b in docs_of(offs):
        last = {}
        for t in range(a, b):
            cnt = [0] * E
            for u in range(t, min(t + m, b)):
                for e in log[u, li]:
                    cnt[int(e)] += 1
            order = sorted(range(E), key=lambda e: (-cnt[e], -last.get(e, -1), e))
            cache = set(order[:C])
            for e in log[t, li]:
                acts += 1
                hits += int(e) in cache
            for e in log[t, li]:
                last[int(e)] = t
    return hits / acts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_srp_matches_brute_force(seed):
    E = 7
    log = random_log(N=70, L=2, K=2, E=E, seed=seed)
    offs = np.array([0, 5, 33, 33, 70])  # short, empty and long documents
    res = srp(log, offs, E, seg_lens=(2, 4, 16))
    for m in (2, 4, 16):
        f1, j = brute_srp(log, offs, E, m)
        assert res["overall"][str(m)]["srp"] == pytest.approx(f1)
        assert res["overall"][str(m)]["threshold"] == j
        for li in range(2):
            f1l, jl = brute_srp(log, offs, E, m, layers=[li])
            assert res["layers"][li][str(m)]["srp"] == pytest.approx(f1l)


def test_srp_with_no_window_long_enough():
    log = random_log(N=10, L=1, K=2, E=4)
    res = srp(log, np.array([0, 5, 10]), 4, seg_lens=(8,))
    assert res["overall"]["8"]["srp"] is None or np.isnan(res["overall"]["8"]["srp"])


@pytest.mark.parametrize("seed", [0, 3])
def test_sch_matches_brute_force(seed):
    E, K = 8, 2
    log = random_log(N=50, L=2, K=K, E=E, seed=seed)
    offs = np.array([0, 20, 21, 50])
    res = sch(log, offs, E, seg_lens=(1, 4, 16), rhos=(1, 2, 3))
    for m in (1, 4, 16):
        for rho in (1, 2, 3):
            for li in range(2):
                want = brute_sch(log, offs, E, m, rho * K, li)
                assert res["layers"][li][str(m)][str(rho)] == pytest.approx(want), (m, rho, li)
            both = np.mean([brute_sch(log, offs, E, m, rho * K, li) for li in range(2)])
            assert res["overall"][str(m)][str(rho)] == pytest.approx(both)


def test_sample_documents_takes_whole_documents():
    offs = np.arange(0, 1001, 10)
    keep = sample_documents(offs, 1000, 100)
    assert keep.sum() == 100
    for a, b in docs_of(offs):
        assert keep[a:b].all() or not keep[a:b].any()
    assert sample_documents(offs, 1000, None).all()


def brute_cache(log, cap, policy):
    """Written from the cache model: a token's experts are accessed together; resident ones hit, the others
    are loaded; victims are resident experts the token does not use: least recently used (earlier column =
    less recent), fewest accesses so far (ties: least recent), or furthest next use (ties: smaller id)."""
    resident, last, freq, hits, acc, clock = set(), {}, {}, 0, 0, 0
    rows = [list(dict.fromkeys(int(e) for e in r)) for r in log]
    for t, row in enumerate(rows):
        need = [e for e in row if e not in resident]
        hits += len(row) - len(need)
        acc += len(row)
        for e in need:
            if len(resident) >= cap:
                cand = [x for x in resident if x not in row]

                def nxt(x, t=t):
                    return next((u for u in range(t + 1, len(rows)) if x in rows[u]), float("inf"))

                if policy == "lru":
                    victim = min(cand, key=lambda x: last[x])
                elif policy == "lfu":
                    victim = min(cand, key=lambda x: (freq[x], last[x]))
                else:
                    victim = min(cand, key=lambda x: (-nxt(x), x))
                resident.remove(victim)
            resident.add(e)
        for e in row:
            clock += 1
            last[e] = clock
            freq[e] = freq.get(e, 0) + 1
    return hits / acc


def test_cache_policies_match_brute_force_and_belady_is_best():
    cachesim = pytest.importorskip("moesift.cachesim", reason="moesift/cachesim.py not present")
    for seed in range(4):
        log = random_log(N=80, L=1, K=2, E=10, seed=seed, sticky=0.3)[:, 0, :].astype(np.int64)
        for cap in (2, 4, 6):
            got = {p: cachesim.simulate(log, cap, p) for p in ("lru", "lfu", "belady")}
            for p in got:
                assert got[p]["hit_rate"] == pytest.approx(brute_cache(log, cap, p)), (seed, cap, p)
                assert got[p]["accesses"] == log.size
            assert got["belady"]["hit_rate"] >= got["lru"]["hit_rate"] - 1e-12
            assert got["belady"]["hit_rate"] >= got["lfu"]["hit_rate"] - 1e-12


def test_locality_section(tmp_path):
    from test_analysis import make_trace

    t = make_trace(L=2, E=16, K=2, n_tokens=400, doc_len=40)
    loc = locality(t, seg_lens=(4, 16), rhos=(1, 2), max_tokens=200, cache_tokens=80, cache_layers=None)
    assert loc["tokens_used"] == 200 and loc["documents_used"] == 5
    if loc.get("cache"):
        c = loc["cache"]
        assert c["moe_layers"] == [0, 1] and c["tokens_used"] == 80
        for cap in c["capacities"]:
            assert c["overall"][str(cap)]["belady"] >= c["overall"][str(cap)]["lru"] - 1e-12
    assert set(loc["srp"]["overall"]) == {"4", "16"}
    assert 0 < loc["srp"]["overall"]["4"]["srp"] <= 1
    nolog = make_trace(L=2, E=16, K=2, n_tokens=100, log=False)
    assert locality(nolog) is None
