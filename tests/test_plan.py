"""Plans: budgets, strategies, mixed banks, constraints, predictions, plan diff and WCER manifests."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hostile import run_cli

from moesift.core.errors import MoesiftError
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.plan import Plan, plan_diff
from moesift.formats.trace import Trace
from moesift.selection.planner import plan, strategy_scores


def make_trace(counts, moe_layers=None, model_type=None, weight_mass=None, saliency=None, folds=None, top_k=2,
               label="t", **model) -> Trace:
    counts = np.asarray(counts, dtype=np.int64)
    L, E = counts.shape
    arrays = {"prefill_counts": counts}
    if weight_mass is not None:
        arrays["weight_mass"] = np.asarray(weight_mass, dtype=np.float64)
    if saliency is not None:
        s, c = saliency
        arrays["saliency_sum"] = np.asarray(s, dtype=np.float64)
        arrays["saliency_count"] = np.asarray(c, dtype=np.int64)
    if folds is not None:
        arrays["fold_counts"] = np.asarray(folds, dtype=np.int64)
    m = {"name": "synthetic", "model_type": model_type, "config_hash": None, "n_experts": E, "top_k": top_k,
         "n_shared": 0, "moe_layers": list(moe_layers if moe_layers is not None else range(L)), "hash_layers": []}
    m.update(model)
    return Trace(model=m, workload={"label": label, "documents": 1, "prefill_tokens": int(counts.sum() // top_k),
                                    "decode_tokens": 0}, arrays=arrays)


def skewed(L=3, E=8, seed=0, routes=4000, folds=4):
    """Counts drawn from Zipf-like distributions of different sharpness per layer, with folds."""
    rng = np.random.default_rng(seed)
    fold_counts = np.zeros((folds, L, E), np.int64)
    for layer in range(L):
        p = 1.0 / np.arange(1, E + 1) ** (0.3 + layer)
        p = p[rng.permutation(E)]
        p /= p.sum()
        for f in range(folds):
            fold_counts[f, layer] = rng.multinomial(routes // folds, p)
    return fold_counts.sum(0), fold_counts


def _top(row, n):
    return sorted(np.lexsort((np.arange(len(row)), -np.asarray(row, dtype=float)))[:n].tolist())


def test_keep_and_keep_experts_pick_the_most_selected():
    counts, folds = skewed()
    t = make_trace(counts, folds=folds)
    p = plan(t, keep=0.5)
    assert [e["resident"] for e in p.layers] == [_top(counts[i], 4) for i in range(3)]
    p2 = plan(t, keep_experts=3)
    assert [len(e["resident"]) for e in p2.layers] == [3, 3, 3]
    for e in p2.layers:
        assert e["resident"] == sorted(e["resident"])
        assert e["coverage"] == pytest.approx(counts[e["moe_index"], e["resident"]].sum() / counts[e["moe_index"]].sum())


def test_budget_below_top_k_and_bad_budgets_are_refused():
    t = make_trace(skewed()[0])
    with pytest.raises(MoesiftError, match="top-k"):
        plan(t, keep=0.125)  # 1 of 8 experts, top-k 2
    with pytest.raises(MoesiftError, match="top-k"):
        plan(t, keep_experts=1)
    with pytest.raises(MoesiftError, match="only 8 experts"):
        plan(t, keep_experts=9)
    with pytest.raises(MoesiftError, match="exactly one budget"):
        plan(t, keep=0.5, coverage=0.9)
    with pytest.raises(MoesiftError, match="exactly one budget"):
        plan(t)
    with pytest.raises(MoesiftError, match="--model"):
        plan(t, memory="1MB")


def test_coverage_budget_is_the_smallest_set_per_layer():
    counts, _ = skewed()
    t = make_trace(counts)
    p = plan(t, coverage=0.9)
    sizes = []
    for e in p.layers:
        row = counts[e["moe_index"]]
        ids = e["resident"]
        share = row[ids].sum() / row.sum()
        assert share >= 0.9
        if len(ids) > 2:  # dropping the least selected resident expert falls below the target
            worst = min(ids, key=lambda i: row[i])
            assert (row[ids].sum() - row[worst]) / row.sum() < 0.9
        assert ids == _top(row, len(ids))
        sizes.append(len(ids))
    assert len(set(sizes)) > 1, "layers of different sharpness need different counts"
    u = plan(t, coverage=0.9, uniform=True)
    assert [len(e["resident"]) for e in u.layers] == [max(sizes)] * 3


def test_strategies():
    E = 8
    counts = np.array([[100, 90, 80, 70, 60, 50, 40, 30]])
    wm = np.array([[1, 2, 3, 4, 50, 60, 70, 80]], dtype=float)
    sal_sum = np.array([[8, 1, 1, 1, 1, 1, 1, 30]], dtype=float)
    sal_cnt = np.array([[1, 1, 1, 1, 1, 1, 1, 10]])
    t = make_trace(counts, weight_mass=wm, saliency=(sal_sum, sal_cnt))
    assert plan(t, keep_experts=2, strategy="frequency").layers[0]["resident"] == [0, 1]
    assert plan(t, keep_experts=2, strategy="weighted").layers[0]["resident"] == [6, 7]
    assert plan(t, keep_experts=2, strategy="saliency").layers[0]["resident"] == [0, 7]  # means 8 and 3
    r0 = plan(t, keep_experts=4, strategy="random", seed=0).layers[0]["resident"]
    assert r0 == plan(t, keep_experts=4, strategy="random", seed=0).layers[0]["resident"]
    others = {tuple(plan(t, keep_experts=4, strategy="random", seed=s).layers[0]["resident"]) for s in range(1, 6)}
    assert len(others | {tuple(r0)}) > 1
    np.testing.assert_allclose(strategy_scores(t, "saliency"), sal_sum / sal_cnt)
    bare = make_trace(counts)
    with pytest.raises(MoesiftError, match="weight"):
        plan(bare, keep_experts=2, strategy="weighted")
    with pytest.raises(MoesiftError, match="saliency"):
        plan(bare, keep_experts=2, strategy="saliency")
    with pytest.raises(MoesiftError, match="unknown strategy"):
        plan(bare, keep_experts=2, strategy="magic")
    assert E == counts.shape[1]


def test_mixed_bank_normalises_each_trace_to_its_routes(tmp_path):
    a = np.array([[40, 40, 5, 5, 4, 3, 2, 1]])
    b = np.array([[1, 2, 40, 40, 6, 5, 4, 2]]) * 100  # 100x more traffic
    pa = make_trace(a, label="a").save(tmp_path / "a.trace")
    pb = make_trace(b, label="b").save(tmp_path / "b.trace")
    assert plan([f"{pa}:0.7", f"{pb}:0.3"], keep_experts=2).layers[0]["resident"] == [0, 1]
    assert plan([f"{pa}:0.3", f"{pb}:0.7"], keep_experts=2).layers[0]["resident"] == [2, 3]
    both = plan([str(pa), str(pb)], keep_experts=4)
    assert both.layers[0]["resident"] == [0, 1, 2, 3]
    prov = both.provenance["traces"]
    assert [s["weight"] for s in prov] == [0.5, 0.5]
    assert prov[0]["sha256"] == hashlib.sha256(pa.read_bytes()).hexdigest()
    # in-sample coverage of the bank is the weighted coverage of each workload
    sa, sb = a[0, [0, 1, 2, 3]].sum() / a.sum(), b[0, [0, 1, 2, 3]].sum() / b.sum()
    assert both.layers[0]["coverage"] == pytest.approx(0.5 * sa + 0.5 * sb)
    other = make_trace(np.ones((2, 8), np.int64), label="c").save(tmp_path / "c.trace")
    with pytest.raises(MoesiftError, match="another model"):
        plan([str(pa), str(other)], keep=0.5)


def test_heldout_coverage_is_computed_on_left_out_folds():
    counts, folds = skewed(L=2, E=8, routes=400, folds=4, seed=3)
    t = make_trace(counts, folds=folds)
    p = plan(t, keep_experts=3)
    for e in p.layers:
        layer = e["moe_index"]
        vals = []
        for f in range(4):
            rest = folds.sum(0)[layer] - folds[f, layer]
            ids = np.lexsort((np.arange(8), -rest))[:3]
            vals.append(folds[f, layer, ids].sum() / folds[f, layer].sum())
        assert e["heldout_coverage"] == pytest.approx(np.mean(vals))
    assert p.predictions["heldout_coverage"] == pytest.approx(np.mean([e["heldout_coverage"] for e in p.layers]))
    assert "heldout_note" in plan(make_trace(counts), keep_experts=3).predictions


def test_groups_and_hash_layers():
    counts, _ = skewed(L=3, E=8)
    t = make_trace(counts, n_group=4, topk_group=2, hash_layers=[1])
    p = plan(t, keep=0.5)
    assert p.layers[1]["resident"] == list(range(8))  # hash-routed: whole
    for e in (p.layers[0], p.layers[2]):
        groups = {i // 2 for i in e["resident"]}
        assert len(e["resident"]) == 2 * len(groups) and len(groups) >= 2  # whole groups, >= topk_group
    with pytest.raises(MoesiftError, match="cannot meet"):
        plan(t, keep=0.5, uniform=True)  # a hash layer kept whole cannot have the count of the others


def test_memory_budget_allocates_by_coverage_per_byte(tiny_dir):
    src = tiny_dir("qwen3_moe")
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    L, E = len(spec.moe_layers), spec.n_experts
    counts = np.zeros((L, E), np.int64)
    counts[0] = [1000, 1000, 5, 4, 3, 2, 1, 1]  # concentrated
    counts[1] = [100] * E  # flat
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="qwen3_moe")
    full = idx.total_bytes()
    per = idx.expert_bytes()[spec.moe_layers[0]][0]
    budget = full - 6 * per  # room for 16 - 6 = 10 experts
    p = plan(t, memory=budget, model=src)
    n = [len(e["resident"]) for e in p.layers]
    assert sum(n) == 10 and n[1] > n[0]
    assert p.predictions["bytes"] == idx.predicted_bytes(p.resident) <= budget
    bigger = plan(t, memory=budget + 2 * per, model=src)
    assert bigger.predictions["coverage"] >= p.predictions["coverage"]
    u = plan(t, memory=budget, model=src, uniform=True)
    assert len({len(e["resident"]) for e in u.layers}) == 1 and u.predictions["bytes"] <= budget
    with pytest.raises(MoesiftError, match="cannot meet"):
        plan(t, memory=full - (E - 1) * L * per, model=src)  # below top-k per layer
    p_keep = plan(t, keep=0.5, model=src)
    assert p_keep.predictions["bytes"] == idx.predicted_bytes(p_keep.resident)
    assert p_keep.model["moe_layers"] == list(spec.moe_layers)
    wrong = make_trace(np.ones((L, E + 8), np.int64), moe_layers=spec.moe_layers, model_type="qwen3_moe")
    with pytest.raises(MoesiftError, match="use the model the traces were recorded on"):
        plan(wrong, keep=0.5, model=src)


def test_cli_plan_contract_and_diff(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    counts, folds = skewed(L=len(spec.moe_layers), E=spec.n_experts)
    tp = make_trace(counts, moe_layers=spec.moe_layers, model_type="qwen3_moe", folds=folds).save(tmp_path / "t.trace")
    code, out, err = run_cli(["plan", str(tp), "--keep", "0.5", "--out", str(tmp_path / "a.json")], monkeypatch, capsys)
    assert code == 0, err
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["schema"] == "moesift-plan/1"
    assert [e["layer"] for e in d["layers"]] == list(spec.moe_layers)
    assert all(e["resident"] == sorted(e["resident"]) for e in d["layers"])
    assert d["provenance"]["strategy"] == "auto" and d["provenance"]["chosen"] == "frequency"  # no saliency, no weights
    assert d["provenance"]["budget"] == {"keep": 0.5}
    assert d["predictions"]["heldout_coverage"] is not None
    code, _, err = run_cli(["plan", str(tp), "--keep", "0.5", "--out", str(tmp_path / "a.json")], monkeypatch, capsys)
    assert code == 2 and "--force" in err
    code, _, err = run_cli(["plan", str(tp), "--keep", "0.1", "--out", str(tmp_path / "x.json")], monkeypatch, capsys)
    assert code == 2 and err.startswith("moesift: error:") and "top-k" in err
    code, out, _ = run_cli(["plan", str(tp), "--keep-experts", "6", "--strategy", "random", "--model", str(src),
                            "--out", str(tmp_path / "b.json"), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["predictions"]["bytes"] > 0
    code, out, _ = run_cli(["plan", "diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--model", str(src),
                            "--json"], monkeypatch, capsys)
    assert code == 0
    diff = json.loads(out)
    a, b = Plan.load(tmp_path / "a.json").resident, Plan.load(tmp_path / "b.json").resident
    per = CheckpointIndex.build(src).expert_bytes()
    for e in diff["layers"]:
        sa, sb = set(a[e["layer"]]), set(b[e["layer"]])
        assert e["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb))
        assert e["bytes_to_load"] == sum(per[e["layer"]][x] for x in sb - sa)
    assert diff["bytes_to_load"] == sum(e["bytes_to_load"] for e in diff["layers"]) > 0
    code, _, err = run_cli(["plan", "diff", str(tmp_path / "a.json")], monkeypatch, capsys)
    assert code == 2 and "usage" in err


def test_wcer_resident_manifest(tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    per = [[0, 1, 2, 3], [2, 3, 4, 5]][: len(spec.moe_layers)]
    m = {"schema_version": "resident-manifest/1", "model_id": "x", "n_experts": spec.n_experts,
         "n_layers": len(per), "top_k": spec.top_k, "bank_name": "code-50pct", "built_from_trace": "t.json",
         "budget_frac": 0.5, "n_resident_per_layer": 4, "hash_layers": [], "per_layer_resident": per}
    (tmp_path / "m.json").write_text(json.dumps(m))
    p = Plan.load(tmp_path / "m.json")
    assert [e["moe_index"] for e in p.layers] == list(range(len(per)))
    with pytest.raises(MoesiftError, match="resolve"):
        _ = p.resident
    assert p.resolve(spec) == dict(zip(spec.moe_layers, per, strict=True))
    (tmp_path / "m2.json").write_text(json.dumps({**m, "per_layer_resident": [[0, 1, 4, 5]] * len(per)}))
    d = plan_diff(tmp_path / "m.json", tmp_path / "m2.json", model=src)
    assert d["layers"][0]["jaccard"] == pytest.approx(2 / 6)
    m_bad = {**m, "n_experts": spec.n_experts * 2}
    (tmp_path / "bad.json").write_text(json.dumps(m_bad))
    with pytest.raises(MoesiftError, match="experts per layer"):
        Plan.load(tmp_path / "bad.json").resolve(spec)


def test_plan_from_real_wcer_trace(tmp_path):
    from conftest import WCER_DIR

    f = WCER_DIR / "OLMoE-1B-7B-0125-Instruct-4bit-trace-code.json"
    if not f.is_file():
        pytest.skip("WCER traces not present")
    raw = json.loads(f.read_text())
    p = plan(str(f), keep=0.5)
    hist = np.asarray(raw["per_layer_histogram"])
    assert len(p.layers) == raw["n_layers"]
    for e in p.layers:
        row = hist[e["moe_index"]]
        assert len(e["resident"]) == raw["n_experts"] // 2
        # the kept set holds the largest counts (ties may resolve either way)
        assert row[e["resident"]].sum() == np.sort(row)[::-1][: len(e["resident"])].sum()


def test_weighted_plan_does_not_quote_another_sets_heldout_coverage():
    counts, folds = skewed(L=2, E=8, routes=400, folds=4, seed=5)
    wm = counts * np.random.default_rng(0).uniform(0.2, 1.0, counts.shape)  # mass ranks differ from counts
    t = make_trace(counts, folds=folds, weight_mass=wm)
    p = plan(t, keep_experts=3, strategy="weighted")
    assert p.predictions["heldout_coverage"] is None
    assert all("heldout_coverage" not in e for e in p.layers)
    gap = p.predictions["frequency_insample_minus_heldout"]
    f = plan(t, keep_experts=3, strategy="frequency")  # the count-chosen set of the same size: its own optimism
    assert gap == pytest.approx(f.predictions["coverage"] - f.predictions["heldout_coverage"])
    assert "cannot be measured" in p.predictions["heldout_note"]


def test_group_limited_heldout_replays_whole_group_selection_and_raised_budget_is_said():
    # 16 experts in 4 groups of 4, the router picks 2 groups: --keep 0.25 (4 experts) must keep 2 whole groups
    counts, folds = skewed(L=2, E=16, routes=4000, folds=4, seed=11)
    t = make_trace(counts, folds=folds, n_group=4, topk_group=2)
    p = plan(t, keep=0.25)
    assert "budget_note" in p.predictions and "groups" in p.predictions["budget_note"]
    for e in p.layers:
        layer = e["moe_index"]
        assert len(e["resident"]) == 8
        vals = []
        for f in range(4):  # whole groups chosen on the other folds, measured on this one
            rest = folds.sum(0)[layer] - folds[f, layer]
            gscore = rest.reshape(4, 4).sum(1)
            best = sorted(np.lexsort((np.arange(4), -gscore))[:2].tolist())
            ids = [g * 4 + i for g in best for i in range(4)]
            vals.append(folds[f, layer, ids].sum() / folds[f, layer].sum())
        assert e["heldout_coverage"] == pytest.approx(np.mean(vals))
        # a per-expert top-8 set would cover more than whole groups can: the prediction must not quote it
        per_expert = np.mean([folds[f, layer, _top(folds.sum(0)[layer] - folds[f, layer], 8)].sum()
                              / folds[f, layer].sum() for f in range(4)])
        assert e["heldout_coverage"] <= per_expert + 1e-12
    assert "budget_note" not in plan(make_trace(counts, folds=folds), keep=0.25).predictions
