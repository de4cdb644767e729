"""Selection strategies contribution and calibrated, per-layer budgets under one total (--allocate)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import moesift
from moesift import assets
from moesift.core.errors import MoesiftError
from moesift.formats.checkpoint import CheckpointIndex
from moesift.selection.allocate import layer_error_scales
from moesift.selection.planner import plan

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_plan import make_trace, run_cli, skewed  # noqa: E402


def _order(row: np.ndarray) -> list[int]:
    """Experts by score, best first, ties to the lower id (as the planner breaks them)."""
    return sorted(range(len(row)), key=lambda e: (-float(row[e]), e))


@pytest.fixture(scope="module")
def ref_trace():
    mdir = assets.reference_model("qwen3moe-ref")
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    tr = moesift.trace(m, assets.workload("code", "trace"), max_samples=6, max_length=48, saliency=True,
                       progress=False, tokenizer=tok)
    return mdir, m, tok, tr


def test_contribution_ranks_by_summed_gate_times_output_norm(ref_trace):
    mdir, _, _, tr = ref_trace
    s = np.asarray(tr.get("saliency_sum"), dtype=np.float64)
    c = np.asarray(tr.get("saliency_count"), dtype=np.float64)
    E = tr.n_experts
    for n in (4, 8, 16):
        p = plan(tr, keep_experts=n, strategy="contribution")
        assert [e["resident"] for e in p.layers] == [sorted(_order(s[i])[:n]) for i in range(tr.n_layers)]
        # the summed score is the mean (REAP's saliency) times the routed count
        mean = np.divide(s, c, out=np.zeros_like(s), where=c > 0)
        q = plan(tr, keep_experts=n, strategy="saliency")
        assert [e["resident"] for e in q.layers] == [sorted(_order(mean[i])[:n]) for i in range(tr.n_layers)]
    assert np.allclose(moesift.strategy_scores(tr, "contribution"), mean * c)
    assert E == 32
    no_sal = make_trace(np.ones((2, 8), np.int64))
    with pytest.raises(MoesiftError, match="--saliency"):
        plan(no_sal, keep=0.5, strategy="contribution")


def _calib_file(tmp_path, vocab: int, n_docs: int = 12, length: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(json.dumps({"input_ids": rng.integers(2, vocab, length).tolist()}) + "\n"
                         for _ in range(n_docs)))
    return f


def _block_inputs(model, ad, spec, ids):
    """Inputs of every MoE block of the loaded full model (captured here, independently of moesift)."""
    got = {}
    hs = []
    for layer in spec.moe_layers:
        def pre(mod, args, kwargs, _l=layer):
            h = args[0] if args else kwargs["hidden_states"]
            got.setdefault(_l, []).append(h.reshape(-1, h.shape[-1]).detach().clone())
        hs.append(ad.moe_block(model, layer).register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        for row in ids:
            model(input_ids=torch.tensor([row]), use_cache=False)
    for h in hs:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def _out(block, x):
    y = block(x.unsqueeze(0))
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(-1, y.shape[-1]).double()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_calibrated_first_removal_equals_brute_force(tiny_dir, tmp_path, model_type):
    src = tiny_dir(model_type)
    idx = CheckpointIndex.build(src)
    spec, ad = idx.spec, idx.adapter
    data = _calib_file(tmp_path, int(idx.config["vocab_size"]))
    cal = moesift.calibrate(src, data, max_samples=12, max_length=24, dtype="float32", progress=False)
    model, _ = moesift.load_model(src, device="cpu", dtype="float32")
    ids = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]
    inputs = _block_inputs(model, ad, spec, ids)
    grouped = bool(spec.n_group and spec.n_group > 1)
    per = spec.n_experts // spec.n_group if grouped else 1
    units = [list(range(g * per, (g + 1) * per)) for g in range(spec.n_experts // per)]
    for p, layer in enumerate(spec.moe_layers):
        block = ad.moe_block(model, layer)
        x = inputs[layer]
        with torch.no_grad():
            full = _out(block, x)
            errs = []
            for u in units:
                keep = sorted(set(range(spec.n_experts)) - set(u))
                with moesift.restrict(model, {layer: keep}):
                    errs.append(float(((full - _out(block, x)) ** 2).sum()))
        first = cal.layers[p]["order"][0]
        best = min(errs)
        winners = [u for u, e in zip(units, errs, strict=True) if e <= best * (1 + 1e-4) + 1e-9]
        assert first in winners, (layer, first, errs)
        assert cal.layers[p]["error"][1] * cal.layers[p]["output_norm2"] == pytest.approx(best, rel=1e-3, abs=1e-7)
        # the removal order and the floor together name every unit once
        seen = [tuple(u) for u in cal.layers[p]["order"] + cal.layers[p]["floor"]]
        assert sorted(seen) == sorted(tuple(u) for u in units)
        assert len(cal.layers[p]["floor"]) == max(-(-spec.top_k // per), spec.topk_group or 0 if grouped else 0)
    if model_type == "olmoe":  # softmax without renormalisation: every token moves, so measured on all
        assert not any(e["local"] for e in cal.layers)
    if model_type == "qwen3_moe":  # renormalised top-k: only an expert's own tokens move
        assert all(e["local"] for e in cal.layers)


def test_calibrated_plan_allocate_and_cli(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    data = _calib_file(tmp_path, int(idx.config["vocab_size"]), seed=1)
    counts, folds = skewed(L=len(spec.moe_layers), E=spec.n_experts)
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="qwen3_moe", folds=folds)
    tp = t.save(tmp_path / "t.trace")
    calf = tmp_path / "cal.json"
    code, out, err = run_cli(["calibrate", str(src), "--data", str(data), "--out", str(calf), "--max-length", "24"],
                             monkeypatch, capsys)
    assert code == 0, err
    cal = moesift.Calibration.load(calf)
    p = plan(t, keep=0.5, strategy="calibrated", calibration=cal)
    for e, c in zip(p.layers, cal.layers, strict=True):  # keeps the units removed last
        assert e["resident"] == sorted(x for u in (c["order"][len(c["order"]) - 2:] + c["floor"]) for x in u)
        assert e["calibrated_error"] == pytest.approx(c["error"][len(c["order"]) - 2])
    a = plan(t, keep=0.5, strategy="calibrated", calibration=cal, allocate=True)
    assert sum(a.counts()) == sum(p.counts())
    # --allocate spends on one scale across layers: the squared error each layer adds to the residual stream
    scale = layer_error_scales(cal)
    assert scale == [c["output_norm2"] / c["tokens"] for c in cal.layers]

    def spent(pl):
        return np.mean([s * e["calibrated_error"] for s, e in zip(scale, pl.layers, strict=True)])

    assert spent(a) <= spent(p) + 1e-12
    # greedy spending is optimal here (errors in the removal order): check against every split of the total
    errs = [np.asarray(c["error"]) * s for c, s in zip(cal.layers, scale, strict=True)]
    n_min = [len(c["floor"]) for c in cal.layers]
    total = sum(p.counts())
    E = spec.n_experts
    splits = [(k0, total - k0) for k0 in range(n_min[0], E + 1) if n_min[1] <= total - k0 <= E]
    best = min(np.mean([errs[i][E - k[i]] for i in range(2)]) for k in splits)
    if all(np.all(np.diff(np.diff(e)) >= -1e-12) for e in errs):  # convex curves: greedy is exact
        assert spent(a) == pytest.approx(best)
    # the same plan from the CLI, with --calib (calibrates inline)
    code, out, err = run_cli(["plan", str(tp), "--keep", "0.5", "--strategy", "calibrated", "--calib", str(data),
                              "--calib-length", "24", "--model", str(src), "--allocate", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert [e["resident"] for e in json.loads(out)["layers"]] == [e["resident"] for e in a.layers]
    code, out, err = run_cli(["plan", str(tp), "--keep", "0.5", "--strategy", "calibrated"], monkeypatch, capsys)
    assert code == 2 and err.startswith("moesift: error: ") and "--calibration" in err and len(err.splitlines()) == 1
    code, out, err = run_cli(["plan", str(tp), "--coverage", "0.9", "--allocate"], monkeypatch, capsys)
    assert code == 2 and "--allocate" in err
    # loading only the resident experts of a non-uniform allocated plan computes what restriction computes
    m = moesift.load_resident(src, a, dtype="float32")
    full, _ = moesift.load_model(src, device="cpu", dtype="float32")
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad(), moesift.restrict(full, a):
        want = full(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, want, atol=1e-5)


def test_allocate_respects_groups_and_hash_layers():
    counts, _ = skewed(L=4, E=8)
    t = make_trace(counts, n_group=4, topk_group=2, hash_layers=[1])
    uni = plan(t, keep=0.5)
    for keep in (0.5, 0.75):
        base = plan(t, keep=keep)
        a = plan(t, keep=keep, allocate=True)
        assert a.layers[1]["resident"] == list(range(8))  # hash-routed: whole
        free = [0, 2, 3]
        assert sum(a.counts()[i] for i in free) == sum(base.counts()[i] for i in free)
        for i in free:
            r = a.layers[i]["resident"]
            groups = {x // 2 for x in r}
            assert len(r) == 2 * len(groups) and len(groups) >= 2  # whole groups, at least topk_group
        assert a.predictions["coverage"] >= base.predictions["coverage"] - 1e-12
    assert uni.counts()[1] == 8
    a = plan(t, keep=0.75, allocate=True)
    assert len({a.counts()[i] for i in (0, 2, 3)}) > 1  # skewed layers get different counts
    with pytest.raises(MoesiftError, match="--uniform"):
        plan(t, keep=0.5, allocate=True, uniform=True)


def test_allocate_group_limited_reference_model_loads_resident(tmp_path):
    mdir = assets.reference_model("deepseekv3-ref")
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    tr = moesift.trace(m, assets.workload("prose", "trace"), max_samples=6, max_length=48, progress=False,
                       tokenizer=tok)
    a = plan(tr, keep=0.75, allocate=True, model=mdir)
    spec = CheckpointIndex.build(mdir).spec
    per = spec.n_experts // spec.n_group
    for e in a.layers:
        groups = {x // per for x in e["resident"]}
        assert len(e["resident"]) == per * len(groups) and len(groups) >= spec.topk_group
    assert sum(a.counts()) == sum(plan(tr, keep=0.75, model=mdir).counts())
    r = moesift.load_resident(mdir, a, dtype="float32")
    ids = torch.tensor([[5, 17, 99, 300, 41, 8, 77]])
    with torch.no_grad(), moesift.restrict(m, a):
        want = m(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(r(input_ids=ids).logits, want, atol=1e-4)
    assert len(set(a.counts())) > 1  # a non-uniform plan: it trims to a checkpoint moesift loads
    out = moesift.trim(mdir, a, tmp_path / "trimmed", progress=False)
    t, _ = moesift.load_trimmed(out, dtype="float32")
    with torch.no_grad():
        assert torch.allclose(t(input_ids=ids).logits, want, atol=1e-4)


def test_sweep_winners():
    from moesift.evaluation.sweep import winners

    pts = [{"strategy": "full", "keep": 1.0, "ppl": 10.0, "ppl_ratio": 1.0}]
    for s, k, r in [("frequency", 0.25, 2.0), ("calibrated", 0.25, 1.5), ("frequency", 0.5, 1.1),
                    ("calibrated", 0.5, 1.2)]:
        pts.append({"strategy": s, "keep": k, "ppl": 10 * r, "ppl_ratio": r})
    w = winners(pts)
    assert [(x["keep"], x["strategy"], x["runner_up"]) for x in w] == [(0.25, "calibrated", "frequency"),
                                                                       (0.5, "frequency", "calibrated")]


def test_report_compares_trace_scored_strategies(ref_trace):
    from moesift.surfaces.report import strategy_coverage

    _, _, _, tr = ref_trace
    rows = {r["strategy"]: r for r in strategy_coverage(tr)}
    assert set(rows) == {"frequency", "weighted", "contribution", "saliency"}
    assert rows["frequency"]["spearman_with_counts"] == pytest.approx(1.0)
    for r in rows.values():  # frequency keeps the most-routed experts: nothing covers more in-sample
        assert r["coverage_0.25"] <= rows["frequency"]["coverage_0.25"] + 1e-12
        assert r["coverage_0.25"] == pytest.approx(plan(tr, keep=0.25, strategy=r["strategy"]).predictions["coverage"])


def test_sweep_refuses_calibrating_on_the_evaluation_data(tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    counts, _ = skewed(L=len(spec.moe_layers), E=spec.n_experts)
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="qwen3_moe")
    data = _calib_file(tmp_path, 96)
    with pytest.raises(MoesiftError, match="evaluation data"):
        moesift.sweep(src, t, data, keep=[0.5], strategy="calibrated", calib=data, timing=False, progress=False)
    with pytest.raises(MoesiftError, match="unknown strategy"):
        moesift.sweep(src, t, data, keep=[0.5], strategy="calibrated+everything", timing=False, progress=False)


def _kl_full(model, ids, resident):
    """Mean per-token KL(full || restricted) of the next-token distributions, the whole vocabulary."""
    import torch.nn.functional as F

    tot, n = 0.0, 0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            lp = F.log_softmax(model(input_ids=x, use_cache=False).logits.double()[0], -1)
            with moesift.restrict(model, resident):
                lq = F.log_softmax(model(input_ids=x, use_cache=False).logits.double()[0], -1)
            tot += float((lp.exp() * (lp - lq)).sum())
            n += lp.shape[0]
    return tot / n


def test_end_to_end_choice_equals_brute_force_on_group_limited_model(tiny_dir, tmp_path):
    from itertools import combinations

    src = tiny_dir("deepseek_v3")
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    assert spec.n_group and spec.n_group > 2
    vocab = int(idx.config["vocab_size"])
    data = _calib_file(tmp_path, vocab, n_docs=6, length=16, seed=3)
    # kl_top >= the vocabulary: the stored distributions are exact, so the KL here is the full one
    cal = moesift.calibrate(src, data, max_samples=6, max_length=16, dtype="float32", progress=False,
                            kl_top=vocab, end_to_end_samples=None)
    assert cal.settings["end_to_end"]["converged"]
    model, _ = moesift.load_model(src, device="cpu", dtype="float32")
    ids = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]
    per = spec.n_experts // spec.n_group
    groups = [list(range(g * per, (g + 1) * per)) for g in range(spec.n_group)]
    live = [e for e in cal.layers if e.get("order") is not None]
    levels = sorted(int(k) for k in live[0]["e2e"]["sets"])
    assert levels == list(range(len(live[0]["floor"]), spec.n_group))
    for k in levels:
        chosen = {e["layer"]: e["e2e"]["sets"][str(k)] for e in live}
        # converged coordinate descent: each layer's set is the best k groups with the others' sets fixed
        for e in live:
            kls = {}
            for c in combinations(range(spec.n_group), k):
                s = sorted(x for g in c for x in groups[g])
                kls[tuple(s)] = _kl_full(model, ids, {**chosen, e["layer"]: s})
            best = min(kls.values())
            assert kls[tuple(chosen[e["layer"]])] <= best * (1 + 1e-4) + 1e-9, (k, e["layer"], kls)
            assert e["e2e"]["kl"][str(k)] == pytest.approx(kls[tuple(chosen[e["layer"]])], rel=2e-2, abs=1e-7)  # float32 vs float64
            alone = _kl_full(model, ids, {e["layer"]: chosen[e["layer"]]})
            assert e["e2e"]["alone"][str(k)] == pytest.approx(alone, rel=2e-2, abs=1e-7)
    # a plan keeping k groups per layer takes the end-to-end sets, and --allocate spends by their KL drops
    counts, _ = skewed(L=len(spec.moe_layers), E=spec.n_experts)
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="deepseek_v3", n_group=spec.n_group,
                   topk_group=spec.topk_group)
    k = levels[-1]
    p = plan(t, keep_experts=k * per, strategy="calibrated", calibration=cal)
    assert [e["resident"] for e in p.layers] == [e["e2e"]["sets"][str(k)] for e in live]
    a = plan(t, keep_experts=k * per, strategy="calibrated", calibration=cal, allocate=True)
    assert sum(a.counts()) == sum(p.counts())
    for e, c in zip(a.layers, live, strict=True):
        n = len(e["resident"]) // per
        assert n == spec.n_group or e["resident"] == c["e2e"]["sets"][str(n)]
    # without end-to-end scoring the layer error alone decides (no sets recorded)
    off = moesift.calibrate(src, data, max_samples=6, max_length=16, dtype="float32", progress=False,
                            end_to_end=False)
    assert off.settings["end_to_end"] is None and not any("e2e" in e for e in off.layers)


def test_calibrate_refuses_bad_end_to_end_settings(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("deepseek_v3")
    data = _calib_file(tmp_path, 96)
    code, out, err = run_cli(["calibrate", str(src), "--data", str(data), "--out", str(tmp_path / "c.json"),
                              "--kl-top", "0"], monkeypatch, capsys)
    assert code == 2 and err.startswith("moesift: error: ") and "--kl-top" in err and len(err.splitlines()) == 1
    with pytest.raises(MoesiftError, match="end-to-end loss"):
        moesift.calibrate(src, data, end_to_end_loss="mse", progress=False)


@pytest.fixture(scope="module")
def ds_equal(tmp_path_factory):
    """A tiny DeepSeek-V3 with 32 routed experts in 4 groups (top-2 groups, top-4): room to keep the same
    number in every group below the whole-group floor (2 groups = 16 experts)."""
    from tiny import save

    d = tmp_path_factory.mktemp("ds_equal") / "m"
    save("deepseek_v3", d, seed=4, n_routed_experts=32, num_experts_per_tok=4)
    return d


def test_equal_group_mode_calibrates_plans_and_serves(ds_equal, tmp_path, monkeypatch, capsys):
    src = ds_equal
    idx = CheckpointIndex.build(src)
    spec, ad = idx.spec, idx.adapter
    assert (spec.n_experts, spec.n_group, spec.topk_group, spec.top_k) == (32, 4, 2, 4)
    per, G = 8, 4
    data = _calib_file(tmp_path, int(idx.config["vocab_size"]), seed=5)
    cal = moesift.calibrate(src, data, max_samples=12, max_length=24, dtype="float32", progress=False,
                            end_to_end=False)
    model, _ = moesift.load_model(src, device="cpu", dtype="float32")
    ids = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]
    inputs = _block_inputs(model, ad, spec, ids)
    for p, layer in enumerate(spec.moe_layers):
        q = cal.layers[p]["equal"]
        order = [u[0] for u in q["order"]]
        # rounds of one expert from every group; the floor keeps 2 per group (a group's score sums its top 2)
        assert len(order) == 32 - 8 and sorted(order + [u[0] for u in q["floor"]]) == list(range(32))
        for r in range(0, len(order), G):
            assert sorted(x // per for x in order[r: r + G]) == list(range(G))
        # the first removal is the single expert whose removal moves the layer output least (brute force)
        block, x = ad.moe_block(model, layer), inputs[layer]
        with torch.no_grad():
            full = _out(block, x)
            errs = []
            for e in range(32):
                with moesift.restrict(model, {layer: [i for i in range(32) if i != e]}):
                    errs.append(float(((full - _out(block, x)) ** 2).sum()))
        assert errs[order[0]] <= min(errs) * (1 + 1e-4) + 1e-9, (layer, order[0], errs)
        assert q["error"][1] * cal.layers[p]["output_norm2"] == pytest.approx(min(errs), rel=1e-3, abs=1e-7)
    counts, folds = skewed(L=len(spec.moe_layers), E=32)
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="deepseek_v3", n_group=4, topk_group=2,
                   folds=folds, top_k=4)

    def sizes(r):
        return [sum(1 for i in r if i // per == g) for g in range(G)]

    # auto: 25% (8 experts) is below the whole-group floor (2 groups = 16): the same count in every group
    p25 = plan(t, keep=0.25, model=src)
    assert p25.provenance["groups"] == "equal" and "budget_note" not in p25.predictions
    for e, row in zip(p25.layers, counts, strict=True):
        assert sizes(e["resident"]) == [2, 2, 2, 2]
        assert e["resident"] == sorted(g * per + i for g in range(G) for i in _order(row[g * per: (g + 1) * per])[:2])
    assert plan(t, keep=0.5, model=src).provenance["groups"] == "whole"
    assert all(sizes(e["resident"]) == [4] * 4 for e in plan(t, keep=0.5, model=src, groups="equal").layers)
    # whole groups at 25% are raised to the whole-group floor, and the note says what else there is
    w = plan(t, keep=0.25, model=src, groups="whole")
    assert w.counts() == [16] * len(spec.moe_layers) and "--groups equal" in w.predictions["budget_note"]
    # calibrated, equal counts: the floor, then the rounds removed last
    c25 = plan(t, keep=0.25, strategy="calibrated", calibration=cal, model=src)
    c50 = plan(t, keep=0.5, strategy="calibrated", calibration=cal, model=src, groups="equal")
    for e25, e50, c in zip(c25.layers, c50.layers, cal.layers, strict=True):
        q = c["equal"]
        assert e25["resident"] == sorted(u[0] for u in q["floor"])
        assert e50["resident"] == sorted(u[0] for u in q["floor"] + q["order"][-8:])
        assert e50["calibrated_error"] == pytest.approx(q["error"][len(q["order"]) - 8])
    a = plan(t, keep=0.5, strategy="calibrated", calibration=cal, model=src, groups="equal", allocate=True)
    assert sum(a.counts()) == sum(c50.counts())
    assert all(len(set(sizes(e["resident"]))) == 1 for e in a.layers)
    assert a.predictions["calibrated_error"] <= c50.predictions["calibrated_error"] + 1e-12
    # served: trimmed (a standard checkpoint keeping n_group) and resident loads compute what restriction does
    x = torch.tensor([[3, 5, 7, 9, 11, 13, 17]])
    for pl in (c25, a):
        with torch.no_grad(), moesift.restrict(model, pl):
            want = model(input_ids=x).logits
        r = moesift.load_resident(src, pl, dtype="float32")
        with torch.no_grad():
            assert torch.allclose(r(input_ids=x).logits, want, atol=1e-5)
        out = moesift.trim(src, pl, tmp_path / f"trim{len(set(pl.counts()))}", progress=False)
        tm, _ = moesift.load_trimmed(out, dtype="float32")
        with torch.no_grad():
            assert torch.allclose(tm(input_ids=x).logits, want, atol=1e-5)
    cfg = json.loads((tmp_path / "trim1" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]) == (8, 4, 2)
    # errors: one line
    tp = t.save(tmp_path / "t.trace")
    code, out, err = run_cli(["plan", str(tp), "--keep", "0.25", "--model", str(src)], monkeypatch, capsys)
    assert code == 0 and "groups: the same number of experts kept in every group" in out, err
    code, _, err = run_cli(["plan", str(tp), "--keep", "0.25", "--groups", "halves"], monkeypatch, capsys)
    assert code == 2 and err.startswith("moesift: error: ") and "--groups" in err and len(err.splitlines()) == 1
    q3 = make_trace(counts, moe_layers=spec.moe_layers, model_type="qwen3_moe").save(tmp_path / "q.trace")
    code, _, err = run_cli(["plan", str(q3), "--keep", "0.25", "--groups", "equal"], monkeypatch, capsys)
    assert code == 2 and "no groups" in err and len(err.splitlines()) == 1
    # sweep marks the layout of each point, in its table too
    sw = moesift.sweep(src, t, data, keep=[0.25, 0.5], strategy="frequency", timing=False, progress=False,
                       max_length=24)
    assert [(x["keep"], x.get("groups")) for x in sw["points"][1:]] == [(0.25, "equal"), (0.5, "whole")]
    out = capsys.readouterr().out
    assert "(equal groups): the plan keeps" in out and "(equal" in out.split("(equal groups): the plan")[0]
    old = moesift.Calibration.from_dict({**cal.to_dict(), "layers": [{k: v for k, v in e.items() if k != "equal"}
                                                                     for e in cal.layers]})
    with pytest.raises(MoesiftError, match="calibrate again"):
        plan(t, keep=0.25, strategy="calibrated", calibration=old, model=src)


def test_equal_group_end_to_end_kl_chooses_mode_and_spends(ds_equal, tmp_path):
    src = ds_equal
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    vocab = int(idx.config["vocab_size"])
    data = _calib_file(tmp_path, vocab, n_docs=6, length=16, seed=6)
    cal = moesift.calibrate(src, data, max_samples=6, max_length=16, dtype="float32", progress=False, kl_top=vocab)
    model, _ = moesift.load_model(src, device="cpu", dtype="float32")
    ids = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]
    live = [e for e in cal.layers if e.get("order") is not None]
    G = 4

    def rounds(q, r):  # the floor and the last rounds removed
        order = [u[0] for u in q["order"]]
        return sorted([u[0] for u in q["floor"]] + (order[len(order) - G * (r - 2):] if r > 2 else []))

    def most_routed(e, r):  # each group's r most routed experts on the calibration tokens
        return sorted(x for g in range(G) for x in sorted(range(g * 8, g * 8 + 8), key=lambda i: (-e["routed"][i], i))[:r])

    # the stored KLs are the model's (checked independently, whole vocabulary; float32 batched vs float64
    # one row at a time differ by ~1e-6 absolute, small against the KLs compared)
    assert live[0]["equal"]["kl"]["2"] > 5e-5
    for r in (2, 5, 7):
        sets = {e["layer"]: e["equal"]["sets"][str(r)] for e in live}
        assert live[0]["equal"]["kl"][str(r)] == pytest.approx(_kl_full(model, ids, sets), rel=2e-2, abs=3e-6)
        for e in live:
            cands = [rounds(e["equal"], r), most_routed(e, r)]
            assert sets[e["layer"]] in cands
            # converged: the other candidate would not lower the KL with the other layers fixed
            other = [c for c in cands if c != sets[e["layer"]]]
            if other:
                assert _kl_full(model, ids, {**sets, e["layer"]: other[0]}) >= \
                    _kl_full(model, ids, sets) * (1 - 2e-2) - 3e-6
        e = live[1]
        alone = _kl_full(model, ids, {e["layer"]: sets[e["layer"]]})
        assert e["equal"]["alone"][str(r)] == pytest.approx(alone, rel=2e-2, abs=3e-6)
    counts, _ = skewed(L=len(spec.moe_layers), E=32)
    t = make_trace(counts, moe_layers=spec.moe_layers, model_type="deepseek_v3", n_group=4, topk_group=2, top_k=4)
    # auto, calibrated, where both modes keep 16 experts: the mode with the lower calibration KL
    kl = {m: cal.uniform_kl(m, 16, 32) for m in ("whole", "equal")}
    assert None not in kl.values()
    p = plan(t, keep=0.5, strategy="calibrated", calibration=cal, model=src)
    assert p.provenance["groups"] == min(kl, key=lambda m: (kl[m], m != "whole"))
    # a plan keeping r rounds takes the chosen sets
    q = plan(t, keep_experts=20, strategy="calibrated", calibration=cal, model=src, groups="equal")
    assert [e["resident"] for e in q.layers] == [e["equal"]["sets"]["5"] for e in live]
    # --allocate spends the rounds by the layers' KL alone: the greedy over those drops, checked by brute force
    a = plan(t, keep=0.5, strategy="calibrated", calibration=cal, model=src, groups="equal", allocate=True)
    got = [n // G for n in a.counts()]
    alone = [{int(k): v for k, v in e["equal"]["alone"].items()} for e in live]
    from itertools import product

    best = min(sum(alone[i][c[i]] for i in range(3)) for c in product(range(2, 9), repeat=3) if sum(c) == 12)
    if all(np.all(np.diff([a_[r] for r in range(2, 9)], 2) >= -1e-12) for a_ in alone):  # convex: greedy is exact
        assert sum(alone[i][got[i]] for i in range(3)) == pytest.approx(best)
    assert sum(got) == 12


def test_hostile_calibration_files_give_one_line_errors(ds_equal, tmp_path, monkeypatch, capsys):
    src = ds_equal
    spec = CheckpointIndex.build(src).spec
    data = _calib_file(tmp_path, 96, n_docs=4, length=12, seed=7)
    good = moesift.calibrate(src, data, max_samples=4, max_length=12, dtype="float32", progress=False,
                             end_to_end=False).to_dict()
    counts, _ = skewed(L=len(spec.moe_layers), E=32)
    tp = make_trace(counts, moe_layers=spec.moe_layers, model_type="deepseek_v3", n_group=4, topk_group=2,
                    top_k=4).save(tmp_path / "t.trace")

    def layer0(**kw):
        d = json.loads(json.dumps(good))
        d["layers"][0].update(kw)
        return d

    def equal0(**kw):
        d = json.loads(json.dumps(good))
        d["layers"][0]["equal"].update(kw)
        return d

    bad = {
        "not an object": [1, 2],
        "layers not a list": {**good, "layers": {"0": 1}},
        "layer entry a string": {**good, "layers": ["x"]},
        "model a list": {**good, "model": [1]},
        "n_experts zero": {**good, "model": {**good["model"], "n_experts": 0}},
        "order not a list": layer0(order=5),
        "id out of range": layer0(floor=[[99]] + good["layers"][0]["floor"][1:]),
        "id negative": layer0(order=[[-1]] + good["layers"][0]["order"][1:]),
        "id a bool": layer0(order=[[True]] + good["layers"][0]["order"][1:]),
        "duplicate expert": layer0(floor=good["layers"][0]["floor"] + [good["layers"][0]["order"][0]]),
        "error too short": layer0(error=[0.0]),
        "error NaN": layer0(error=[float("nan")] * len(good["layers"][0]["error"])),
        "error negative": layer0(error=[-1.0] * len(good["layers"][0]["error"])),
        "equal a list": layer0(equal=[1]),
        "equal groups zero": equal0(groups=0),
        "equal groups not dividing": equal0(groups=3),
        "equal kl key not a count": equal0(kl={"two": 0.1}),
        "equal alone infinite": equal0(alone={"2": float("inf")}),
        "e2e without sets": layer0(e2e={"kl": {}}),
        "e2e set with a string": layer0(e2e={"sets": {"2": ["a"]}}),
    }
    for name, d in bad.items():
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(d))
        code, out, err = run_cli(["plan", str(tp), "--keep", "0.25", "--strategy", "calibrated", "--calibration",
                                  str(f), "--model", str(src)], monkeypatch, capsys)
        assert code == 2 and err.startswith("moesift: error: ") and len(err.splitlines()) == 1, (name, err)
    f = tmp_path / "good.json"
    f.write_text(json.dumps(good))
    code, out, err = run_cli(["plan", str(tp), "--keep", "0.25", "--strategy", "calibrated", "--calibration",
                              str(f), "--model", str(src)], monkeypatch, capsys)
    assert code == 0, err
