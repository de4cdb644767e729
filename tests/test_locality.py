"""SRP, SCH and cache hit rates against brute-force implementations written from the definitions."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesift.analysis.locality import locality, sample_documents, sch, srp


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
    """Demand cache of C experts, empty at each document start. At token t: the token's cached experts hit;
    each missing one is loaded, evicting (when full) a cached expert token t does not use, the one selected by
    the fewest tokens among t..t+m-1 of the document, ties to the least recently used (columns in order).
    Returns (hits, activations)."""
    hits = acts = 0
    for a, b in docs_of(offs):
        cache = []  # list, scanned in full every time
        stamp = {}
        for t in range(a, b):
            row = []
            for e in log[t, li]:
                if int(e) not in row:
                    row.append(int(e))
            for e in row:
                acts += 1
                if e in cache:
                    hits += 1
            for e in row:
                if e in cache:
                    continue
                if len(cache) == C:
                    def uses(x, t=t, b=b):
                        return sum(1 for u in range(t, min(t + m, b)) if x in [int(y) for y in log[u, li]])

                    victim = min((x for x in cache if x not in row), key=lambda x: (uses(x), stamp[x]))
                    cache.remove(victim)
                cache.append(e)
            for j, e in enumerate(row):
                stamp[e] = (t, j)
    return hits, acts


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


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_sch_matches_brute_force(seed):
    E, K = 8, 2
    log = random_log(N=50, L=2, K=K, E=E, seed=seed)
    offs = np.array([0, 20, 21, 21, 50])  # short, empty and long documents
    res = sch(log, offs, E, seg_lens=(1, 4, 16), rhos=(1, 2, 3))
    assert res["definition"] == "paper-v3-demand-cache"
    for m in (1, 4, 16):
        for rho in (1, 2, 3):
            pooled = [0, 0]
            for li in range(2):
                h, a = brute_sch(log, offs, E, m, rho * K, li)
                pooled[0] += h
                pooled[1] += a
                assert res["layers"][li][str(m)][str(rho)] == h / a, (m, rho, li)
            assert res["overall"][str(m)][str(rho)] == pooled[0] / pooled[1]


def belady_per_document(lay, offs, cap):
    from moesift.analysis.cachesim import simulate

    h = n = 0
    for a, b in docs_of(offs):
        if b > a:
            r = simulate(lay[a:b], cap, "belady")
            h += r["hits"]
            n += r["accesses"]
    return h / n


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_sch_never_beats_belady(data):
    """No demand cache beats Belady at the same capacity: SCH <= Belady (cold start per document) on any log."""
    E = data.draw(st.integers(2, 9), label="E")
    K = data.draw(st.integers(1, min(3, E)), label="K")
    N = data.draw(st.integers(1, 40), label="N")
    rows = data.draw(st.lists(st.lists(st.integers(0, E - 1), min_size=K, max_size=K, unique=True),
                              min_size=N, max_size=N), label="rows")
    cuts = data.draw(st.lists(st.integers(0, N), max_size=4), label="cuts")
    m = data.draw(st.integers(1, 12), label="m")
    log = np.array(rows, dtype=np.int16)[:, None, :]
    offs = np.array(sorted({0, N, *cuts}))
    rhos = [r for r in range(1, E // K + 1)]
    res = sch(log, offs, E, seg_lens=(m,), rhos=rhos)
    for r in rhos:
        got = res["layers"][0][str(m)][str(r)]
        opt = belady_per_document(log[:, 0, :].astype(np.int64), offs, r * K)
        assert got <= opt + 1e-12, (r, got, opt)
        h, a = brute_sch(log, offs, E, m, r * K, 0)
        assert got == h / a


# ---- the authors' figures (moe-lrc) on a small routing log ---------------------------------------------

FIXTURE = Path(__file__).parent / "data" / "locality_moe_lrc.json"


@pytest.fixture(scope="module")
def lrc():
    d = json.loads(FIXTURE.read_text())
    docs = [np.array(doc, dtype=np.int16) for doc in d["docs"]]  # [tokens, layers, top-k] per document
    offs = np.concatenate([[0], np.cumsum([len(x) for x in docs])])
    return d, np.concatenate(docs), offs


def _keys(figs):
    for key, want in figs.items():
        layer, m, c = key.split("_")  # layer0_m4_C2
        yield int(layer[5:]), int(m[1:]), int(c[1:]), want


def test_srp_equals_moe_lrc_code(lrc):
    d, log, offs = lrc
    ms = sorted({int(m) for per in d["srp"].values() for m in per})
    res = srp(log, offs, d["num_experts"], seg_lens=ms)
    n = 0
    for layer, per in d["srp"].items():
        for m, want in per.items():
            assert abs(res["layers"][int(layer)][m]["srp"] - want) < 1e-6, (layer, m)
            n += 1
    assert n == 6


def test_sch_equals_paper_definition_exactly(lrc):
    d, log, offs = lrc
    K = d["top_k"]
    keys = list(_keys(d["sch_paper_cold"]))
    res = sch(log, offs, d["num_experts"], seg_lens=sorted({m for _, m, _, _ in keys}),
              rhos=sorted({c // K for _, _, c, _ in keys}))
    for layer, m, c, want in keys:
        assert res["layers"][layer][str(m)][str(c // K)] == want, (layer, m, c)
    assert len(keys) == 12


def moe_lrc_code_sch(log, offs, li, m, C):
    """The cache behaviour of moe-lrc's released calc_fsf, re-implemented plainly: each document starts with
    the cache pre-filled with its first C distinct experts; a token's experts are judged hit or miss against
    the cache as it stood before the token, then loaded one at a time, each miss evicting the cached expert
    with the fewest uses left in the window (ties: least recently used), which may be one this token has
    just used."""
    hits = acts = 0
    for a, b in docs_of(offs):
        rows = [[int(e) for e in log[t, li]] for t in range(a, b)]
        first = list(dict.fromkeys(e for r in rows for e in r))
        cache = set(first[:C])
        left = {}  # uses left in the window: tokens t..t+m-1, minus the uses already made
        for r in rows[:m]:
            for e in r:
                left[e] = left.get(e, 0) + 1
        stamp, clock = {}, 0
        for t, r in enumerate(rows):
            before = set(cache)
            for e in r:
                acts += 1
                hits += e in before
                if e not in cache:
                    cache.remove(min(cache, key=lambda x: (left.get(x, 0), stamp.get(x, 0))))
                    cache.add(e)
                clock += 1
                left[e] -= 1
                stamp[e] = clock
            if t + m < len(rows):
                for e in rows[t + m]:
                    left[e] = left.get(e, 0) + 1
    return hits / acts


def test_moe_lrc_code_figures_come_from_its_cache_behaviour(lrc):
    """Why the released code's figures differ from the paper's: reproduced by the behaviour the README names."""
    d, log, offs = lrc
    for layer, m, c, want in _keys(d["sch_moe_lrc_code"]):
        assert moe_lrc_code_sch(log, offs, layer, m, c) == pytest.approx(want, abs=1e-6), (layer, m, c)
    for layer, m, c, want in _keys(d["sch_paper_cold"]):
        assert moe_lrc_code_sch(log, offs, layer, m, c) > want  # the released code reports more hits


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
    cachesim = importlib.import_module("moesift.analysis.cachesim")
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

    t = make_trace(L=3, E=16, K=2, n_tokens=400, doc_len=40)
    loc = locality(t, seg_lens=(4, 16), rhos=(1, 2, 4), max_tokens=200, cache_tokens=80, cache_layers=2)
    assert loc["tokens_used"] == 200 and loc["documents_used"] == 5
    assert loc["sch_definition"] == "paper-v3-demand-cache"
    assert set(loc["srp"]["overall"]) == {"4", "16"} and len(loc["srp"]["layers"]) == 3
    assert 0 < loc["srp"]["overall"]["4"]["srp"] <= 1
    c, s = loc["cache"], loc["sch"]
    # SCH and the cache policies replay the same tokens on the same layers at the same capacities
    assert c["moe_layers"] == s["moe_layers"] == [0, 2] and c["tokens_used"] == s["tokens_used"] == 80
    assert c["capacities"] == s["capacities"] == [2, 4, 8] and c["cold_start_per_document"]
    for i in range(len(s["moe_layers"])):
        for m in ("4", "16"):
            for rho, cap in zip(s["rhos"], s["capacities"], strict=True):
                assert s["layers"][i][m][str(rho)] <= c["layers"][i][str(cap)]["belady"] + 1e-12
        for cap in c["capacities"]:
            assert c["layers"][i][str(cap)]["belady"] >= c["layers"][i][str(cap)]["lru"] - 1e-12
    nolog = make_trace(L=2, E=16, K=2, n_tokens=100, log=False)
    assert locality(nolog) is None
