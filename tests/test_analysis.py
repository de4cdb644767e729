"""Coverage figures against the WCER files' own numbers, held-out coverage against a known routing
distribution, unseen mass, learning curve, affinity and workload comparison against direct computations."""

from __future__ import annotations

import importlib
import itertools
import json

import numpy as np
import pytest
from conftest import WCER_DIR

from moesift.analysis.stats import (
    PCTS,
    analyse,
    budget_n,
    coverage_curve,
    coverage_of,
    experts_for_coverage,
    gini,
    good_turing_unseen,
    heldout_coverage,
    heldout_curves,
    heldout_unseen,
    learning_curve,
    normalised_entropy,
    select_top,
)
from moesift.formats.trace import Trace

WCER_FILES = sorted(WCER_DIR.glob("*.json"))


# ---- synthetic routing from a known distribution -------------------------------------------------------


def draw(logits: np.ndarray, n: int, k: int, rng) -> np.ndarray:
    """n tokens routed top-k without replacement (Plackett-Luce via Gumbel top-k) from `logits` [E]."""
    g = logits[None, :] + rng.gumbel(size=(n, logits.size))
    return np.argpartition(-g, k, axis=1)[:, :k]


def make_trace(L=4, E=16, K=2, n_tokens=2000, doc_len=50, folds=8, seed=0, logits=None, log=True, label="syn"):
    """A trace drawn from a known routing distribution: counts, folds (documents round-robin), transitions and
    a routing log, all consistent with each other."""
    rng = np.random.default_rng(seed)
    if logits is None:
        logits = rng.normal(0, 1.2, size=(L, E))
    ids = np.stack([draw(logits[li], n_tokens, K, rng) for li in range(L)], axis=1)  # [N, L, K]
    offs = np.arange(0, n_tokens + 1, doc_len)
    if offs[-1] != n_tokens:
        offs = np.append(offs, n_tokens)
    doc = np.repeat(np.arange(len(offs) - 1), np.diff(offs))
    fold = np.zeros((folds, L, E), np.int64)
    for li in range(L):
        for k in range(K):
            np.add.at(fold, (doc % folds, li, ids[:, li, k]), 1)
    trans = np.zeros((max(L - 1, 0), E, E), np.int64)
    for li in range(L - 1):
        for a in range(K):
            for b in range(K):
                np.add.at(trans[li], (ids[:, li, a], ids[:, li + 1, b]), 1)
    arrays = {"prefill_counts": fold.sum(axis=0), "fold_counts": fold, "transitions": trans}
    if log:
        arrays.update(routing_log=ids.astype(np.int16), doc_offsets=offs.astype(np.int64))
    model = {"name": "synthetic", "model_type": "synthetic", "config_hash": "0", "moe_layers": list(range(L)),
             "n_experts": E, "top_k": K, "n_shared": 0}
    workload = {"label": label, "documents": len(offs) - 1, "prefill_tokens": n_tokens, "decode_tokens": 0}
    return Trace(model=model, workload=workload, arrays=arrays)


def true_share(logits: np.ndarray, K: int, rng, n: int = 40000) -> np.ndarray:
    """Share of routes each expert receives, from many fresh draws."""
    ids = draw(logits, n, K, rng)
    return np.bincount(ids.ravel(), minlength=logits.size) / (n * K)


# ---- WCER ----------------------------------------------------------------------------------------------


def test_fifteen_wcer_files_present():
    assert len(WCER_FILES) == 15


@pytest.mark.parametrize("path", WCER_FILES, ids=lambda p: p.stem)
def test_experts_for_coverage_equals_wcer(path):
    d = json.loads(path.read_text())
    hist = d["per_layer_histogram"]
    want = d["experts_needed_for_pct_coverage_per_layer"]
    assert len(hist) == len(want) == d["n_layers"]
    for row, w in zip(hist, want, strict=True):
        assert set(w) == {str(p) for p in PCTS}
        got = {str(p): experts_for_coverage(row, p) for p in PCTS}
        assert got == w
        assert {k: experts_for_coverage(row, int(k) / 100) for k in w} == w


@pytest.mark.parametrize("path", WCER_FILES, ids=lambda p: p.stem)
def test_wcer_through_trace_load(path):
    importlib.import_module("moesift.formats.wcer")
    from moesift.surfaces.report import report

    d = json.loads(path.read_text())
    a = report(path, json=True)  # the --json object, through Trace.load and the WCER importer
    json.dumps(a, allow_nan=False)
    assert len(a["layers"]) == d["n_layers"]
    assert [s["experts_for_coverage"] for s in a["layers"]] == d["experts_needed_for_pct_coverage_per_layer"]
    assert a["overall"]["mean_fraction_for_90"] == pytest.approx(
        np.mean([w["90"] / d["n_experts"] for w in d["experts_needed_for_pct_coverage_per_layer"]]))
    # imbalance (max/mean) is one of the file's own summaries too
    assert [s["imbalance"] for s in a["layers"]] == pytest.approx(d["imbalance_ratio_per_layer"])


def test_experts_for_coverage_edges():
    assert experts_for_coverage([0, 0, 0], 90) == 0
    assert experts_for_coverage([5, 0, 5], 1.0) == 2
    assert experts_for_coverage([9, 1], 90) == 1  # exactly 90% reaches 90%
    assert experts_for_coverage([899, 101], 90) == 2
    assert experts_for_coverage([1, 1, 1, 1], 0.5) == 2
    assert experts_for_coverage([3, 1, 1, 1], 1 / 3) == 1  # non-percentage share


def test_concentration_figures():
    assert gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 8]) == pytest.approx(0.75)
    assert normalised_entropy([3, 3, 3]) == pytest.approx(1.0)
    assert normalised_entropy([0, 7, 0]) == pytest.approx(0.0)
    c = np.array([6, 0, 3, 1])
    assert coverage_of(c, [0, 2]) == pytest.approx(0.9)
    assert list(select_top(c, 2)) == [0, 2]
    assert list(select_top([1, 2, 2, 0], 2)) == [1, 2]  # ties to the lower id
    assert coverage_curve(c).tolist() == pytest.approx([0, 0.6, 0.9, 1.0, 1.0])


# ---- held-out coverage -----------------------------------------------------------------------------------


def test_heldout_coverage_matches_a_loop():
    rng = np.random.default_rng(3)
    fc = rng.poisson(rng.gamma(0.7, 4.0, size=(1, 3, 12)), size=(5, 3, 12))
    mean, std = heldout_coverage(fc, fc, 4)
    for li in range(3):
        vals = []
        for f in range(5):
            train = fc[[g for g in range(5) if g != f], li].sum(axis=0)
            keep = np.argsort(-train, kind="stable")[:4]
            vals.append(fc[f, li, keep].sum() / fc[f, li].sum())
        assert mean[li] == pytest.approx(np.mean(vals))
        assert std[li] == pytest.approx(np.std(vals))
    m2, _ = heldout_coverage(fc, fc, np.array([1, 4, 12]))
    assert m2[1] == pytest.approx(mean[1]) and m2[2] == pytest.approx(1.0)


def _fit_and_truth(n_tokens, seed, L=6, E=64, K=4):
    rng = np.random.default_rng(100 + seed)
    logits = rng.normal(0, 1.2, size=(L, E))
    t = make_trace(L=L, E=E, K=K, n_tokens=n_tokens, doc_len=16, seed=seed, logits=logits, log=False)
    truth = np.stack([true_share(logits[li], K, rng) for li in range(L)])
    c = t.counts
    fold = t.get("fold_counts")
    mean, _, _ = heldout_curves(fold, fold)
    out = {}
    for b in (0.25, 0.5):
        n = budget_n(b, E)
        chosen = [select_top(c[li], n) for li in range(L)]
        out[b] = {
            "true": float(np.mean([truth[li, chosen[li]].sum() for li in range(L)])),
            "in_sample": float(np.mean([coverage_of(c[li], chosen[li]) for li in range(L)])),
            "heldout": float(np.mean(mean[:, n])),
        }
    return out


def test_heldout_estimate_within_one_point_of_true_coverage():
    for seed in (0, 1):
        for b, r in _fit_and_truth(2048, seed).items():
            assert abs(r["heldout"] - r["true"]) < 0.01, (seed, b, r)


def test_in_sample_is_optimistic_on_small_traces():
    for seed in (0, 1):
        for b, r in _fit_and_truth(192, seed).items():
            assert r["in_sample"] - r["true"] > 0.015, (seed, b, r)  # visibly optimistic
            assert abs(r["heldout"] - r["true"]) < r["in_sample"] - r["true"], (seed, b, r)


# ---- unseen mass, learning curve ---------------------------------------------------------------------------


def test_good_turing_formula():
    c = np.array([1, 1, 2, 5, 0, 3])
    g = good_turing_unseen(c, tokens=6)
    assert g["singletons"] == 2 and g["doubletons"] == 1
    assert g["good_turing"] == pytest.approx(2 / 12)
    assert g["chao"] == pytest.approx(2 / 12 * (5 * 2) / (5 * 2 + 2))
    assert good_turing_unseen(np.array([4, 4, 0]), 4)["good_turing"] == 0.0


def test_good_turing_tracks_true_unseen_mass():
    rng = np.random.default_rng(7)
    E, K, n = 256, 2, 400
    logits = rng.normal(0, 2.0, size=E)
    truth = true_share(logits, K, rng, n=40000)
    est, real = [], []
    for _ in range(20):
        c = np.bincount(draw(logits, n, K, rng).ravel(), minlength=E)
        est.append(good_turing_unseen(c, n)["good_turing"])
        real.append(truth[c == 0].sum())
    assert np.mean(real) > 0.02  # the setting has real unseen mass
    assert np.mean(est) == pytest.approx(np.mean(real), abs=0.01)


def test_heldout_unseen():
    fc = np.zeros((2, 1, 3), np.int64)
    fc[0, 0] = [4, 0, 1]
    fc[1, 0] = [2, 2, 0]
    # fold 0: expert 2 (1 of 5 routes) unseen in fold 1; fold 1: expert 1 (2 of 4) unseen in fold 0
    assert heldout_unseen(fc)[0] == pytest.approx((1 / 5 + 2 / 4) / 2)


def test_learning_curve_gap_shrinks_and_is_extrapolated():
    t = make_trace(L=4, E=128, K=4, n_tokens=256, doc_len=4, seed=5, log=False)
    lc = learning_curve(t.get("fold_counts"), 4)
    pts = lc["points"]
    assert [p["folds"] for p in pts] == list(range(1, 8))
    assert pts[0]["tokens"] < pts[-1]["tokens"]
    g = [p["0.5"]["in_sample"] - p["0.5"]["heldout"] for p in pts]
    assert g[0] > g[-1] > 0
    e = lc["estimates"]["0.5"]
    assert e["status"] == "extrapolated" and e["tokens_needed"] > lc["tokens_traced"]
    assert e["exponent"] < 0


def test_learning_curve_says_when_it_cannot():
    fc = np.zeros((4, 1, 4), np.int64)
    fc[:, 0] = [10, 10, 0, 0]  # every fold identical: no gap at all
    e = learning_curve(fc, 1)["estimates"]["0.5"]
    assert e["status"] == "agrees"
    fc2 = np.zeros((2, 1, 4), np.int64)
    fc2[0, 0] = [5, 0, 5, 0]
    fc2[1, 0] = [0, 5, 0, 5]
    e2 = learning_curve(fc2, 1)["estimates"]["0.5"]
    assert e2["status"] == "cannot" and e2["tokens_needed"] is None


def test_analyse_prefill_decode_apart():
    t = make_trace(L=2, E=8, K=2, n_tokens=200, seed=2, log=False)
    dec = np.zeros_like(t.arrays["prefill_counts"])
    dec[:, 0] = 10
    t.arrays["decode_counts"] = dec
    a = analyse(t)
    ph = a["phases"]
    assert ph["decode"]["experts_for_coverage"][0]["99"] == 1
    assert ph["decode_set_on_prefill"] < 1.0
    assert ph["prefill"]["routes"] == int(t.arrays["prefill_counts"].sum())
    assert a["layers"][0]["routes"] == int(t.counts[0].sum())


# ---- affinity, compare ------------------------------------------------------------------------------------


def test_affinity_independent_vs_deterministic():
    from moesift.analysis.affinity import affinity_summary, chains, conditional, layer_strength

    p = np.array([0.4, 0.3, 0.2, 0.1])
    indep = np.round(np.outer(p, p) * 1e6).astype(np.int64)
    s = layer_strength(indep)
    assert s["nmi"] == pytest.approx(0.0, abs=1e-6) and s["lift"] == pytest.approx(1.0, abs=1e-3)
    perm = [2, 0, 3, 1]
    det = np.zeros((4, 4), np.int64)
    for e, e2 in enumerate(perm):
        det[e, e2] = 100 * (e + 1)
    s2 = layer_strength(det)
    assert s2["nmi"] == pytest.approx(1.0)
    tr = np.stack([det, det])
    cond = conditional(tr)
    assert np.allclose(cond.sum(axis=2), 1.0)
    ch = chains(tr, n=1)[0]
    assert ch["experts"] == [3, perm[3], perm[perm[3]]]  # expert 3 is the most used start
    t = make_trace(L=3, E=8, K=2, n_tokens=300, seed=4, log=False)
    a = affinity_summary(t)
    assert len(a["layers"]) == 2 and a["chains"]


def test_compare_smallest_union_is_minimal():
    from moesift.surfaces.report import _smallest_union, compare

    rng = np.random.default_rng(11)
    for _ in range(5):
        shares = rng.dirichlet(np.ones(8) * 0.5, size=3)
        u = _smallest_union(shares, 0.8)
        assert (shares[:, u].sum(axis=1) >= 0.8 - 1e-9).all()
        best = min(r for r in range(9) for s in itertools.combinations(range(8), r)
                   if (shares[:, list(s)].sum(axis=1) >= 0.8 - 1e-9).all())
        assert len(u) == best
    a = make_trace(L=2, E=16, K=2, seed=1, label="a", log=False)
    b = make_trace(L=2, E=16, K=2, seed=2, label="b", log=False)
    r = compare([a, b], keep=0.25, json=True)
    n = budget_n(0.25, 16)
    want = np.mean([coverage_of(b.counts[li], select_top(a.counts[li], n)) for li in range(2)])
    assert r["cross_coverage"][0][1] == pytest.approx(want)
    assert r["jaccard"][0][0] == 1.0 and r["jaccard"][0][1] == r["jaccard"][1][0]
    for lay in r["union"]["layers"]:
        assert min(lay["coverage"]) >= 0.9 - 1e-9


def test_tokens_needed_estimate_predicts_agreement():
    """The extrapolated token count from a small trace: a fresh trace of that size from the same routing
    distribution shows in-sample and held-out within about 1 point; one a quarter that size does not."""
    rng = np.random.default_rng(42)
    logits = rng.normal(0, 1.2, size=(4, 128))
    small = make_trace(L=4, E=128, K=4, n_tokens=256, doc_len=4, seed=5, logits=logits, log=False)
    need = learning_curve(small.get("fold_counts"), 4)["estimates"]["0.5"]["tokens_needed"]
    assert 256 < need < 20000

    def gap(n, seed):
        t = make_trace(L=4, E=128, K=4, n_tokens=int(n), doc_len=4, seed=seed, logits=logits, log=False)
        return learning_curve(t.get("fold_counts"), 4)["estimates"]["0.5"]["gap_at_full"]

    assert np.mean([gap(need, s) for s in (7, 8)]) < 0.0125
    assert np.mean([gap(need / 4, s) for s in (7, 8)]) > 0.0125
