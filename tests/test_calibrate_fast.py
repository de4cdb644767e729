"""The cached scorer of calibrated selection (every expert run on every calibration token once, restrictions
re-routed over the router's logits) against the block scorer (the block run under every restriction)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moesift
from moesift import assets
from moesift.arch import adapter_for
from moesift.selection import calibrate as calibrate_mod
from moesift.selection.calib_cache import BlockRunner, BlockScorer, cached_or_block, make_scorer
from moesift.selection.calib_greedy import greedy_layer
from moesift.selection.calibrate import equal_units, floor_units, units_of

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build  # noqa: E402

# routing kinds: softmax top-k renormalised (qwen3_moe) and not (olmoe), a gated shared expert without
# renormalisation (qwen2_moe), sigmoid with a selection bias, groups and a shared expert (deepseek_v3),
# softmax groups scored by their best expert with routed scaling (deepseek_v2)
KINDS = ["qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2"]


def _layer(model_type: str, tokens: int = 240, seed: int = 1):
    m = build(model_type)
    ad = adapter_for(m.config)
    spec = ad.spec(m.config)
    layer = [x for x in spec.moe_layers if x not in spec.hash_layers][0]
    torch.manual_seed(seed)
    x = torch.randn(tokens, m.config.hidden_size)
    return BlockRunner(m, ad, spec, layer), x, spec, ad


@pytest.mark.parametrize("model_type", KINDS)
def test_cached_greedy_equals_block_greedy(model_type):
    blk, x, spec, ad = _layer(model_type)
    units = units_of(spec)
    n_floor = floor_units(spec, units)
    sc = make_scorer(blk, x, "cache")
    assert sc.kind == "cache", sc.note  # the check against the block passed: no fallback
    got = greedy_layer(blk, x, units, n_floor, scorer=sc)
    ref = greedy_layer(blk, x, units, n_floor, scorer="block")
    assert got["order"] == ref["order"] and got["floor"] == ref["floor"]
    assert got["local"] == ref["local"]
    assert np.allclose(got["error"], ref["error"], rtol=1e-4, atol=1e-9)
    assert got["scorer"] == "cache" and ref["scorer"] == "block"
    assert got["forwards"] == 0 and ref["forwards"] > len(units)  # no block forward per candidate
    # no renormalisation: every token moves, measured on all; renormalised top-k: on each expert's tokens
    assert ref["local"] == (model_type == "qwen3_moe")
    # softmax over the resident experts without renormalisation (one expert per unit): the others' outputs
    # are rescaled in closed form, and the order is still the block's
    if model_type in ("olmoe", "qwen2_moe"):
        assert got["others"] == "rescaled" and ref["others"] == "measured"
    if spec.n_group and spec.n_group > 1:  # the equal-count order: single experts in rounds over groups
        eq_floor, eq_units, balance = equal_units(spec, ad)
        q = greedy_layer(blk, x, eq_units, eq_floor, balance=balance, scorer=sc)
        r = greedy_layer(blk, x, eq_units, eq_floor, balance=balance, scorer="block")
        assert q["order"] == r["order"]
        assert np.allclose(q["error"], r["error"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_cached_error_equals_block_on_random_restrictions(model_type):
    """Far from the greedy's path too: restrictions that drop many experts (whole groups emptied, groups
    left with one expert whose score is -inf) re-route and score as the block does."""
    blk, x, spec, _ = _layer(model_type, tokens=160)
    sc = make_scorer(blk, x, "cache")
    ref = BlockScorer(blk, x)
    rng = np.random.default_rng(0)
    n = 0
    while n < 6:
        keep = sorted(rng.choice(spec.n_experts, size=int(rng.integers(spec.top_k, spec.n_experts)),
                                 replace=False).tolist())
        if _problems(blk, keep):
            continue
        n += 1
        err, ids = sc.rows(None, keep)
        err_b, ids_b = ref.rows(None, keep)
        assert torch.equal(ids.sort(dim=1)[0], ids_b.long().sort(dim=1)[0]), keep
        assert torch.allclose(err, err_b, rtol=1e-4, atol=1e-9 * ref.norm2), keep


def _problems(blk: BlockRunner, keep: list[int]) -> list[str]:
    return blk.ad.plan_problems(blk.spec, {blk.layer: keep}, standard=False)


def test_router_it_cannot_restate_falls_back_to_the_block():
    """phimoe's sparsemixer weights are not the family's selection weights: the check sees it and the
    layer is scored by the block, saying why."""
    blk, x, spec, _ = _layer("phimoe", tokens=120)
    units = units_of(spec)
    got = greedy_layer(blk, x, units, floor_units(spec, units))
    ref = greedy_layer(blk, x, units, floor_units(spec, units), scorer="block")
    assert got["scorer"] == "block" and "block forward per candidate" in got["scorer_note"]
    assert got["order"] == ref["order"]


def test_cache_bound_falls_back_to_the_block():
    blk, x, _, _ = _layer("qwen3_moe", tokens=64)
    sc = cached_or_block(blk, x, cache_bytes=1024)
    assert sc.kind == "block" and "cache bound" in sc.note


def _calib(tmp_path: Path, vocab: int, n_docs: int = 6, length: int = 64) -> Path:
    rng = np.random.default_rng(0)
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(json.dumps({"input_ids": rng.integers(2, vocab, length).tolist()}) + "\n"
                         for _ in range(n_docs)))
    return f


@pytest.mark.parametrize("name", ["qwen3moe-ref", "deepseekv3-ref"])
def test_bundled_models_same_orders(name, tmp_path, monkeypatch):
    mdir = assets.reference_model(name)
    vocab = json.loads((Path(mdir) / "config.json").read_text())["vocab_size"]
    data = _calib(tmp_path, vocab)
    cals = {}
    for scorer in ("block", "cache"):
        monkeypatch.setattr(calibrate_mod, "SCORER", scorer)
        cals[scorer] = moesift.calibrate(mdir, data, max_samples=6, max_length=64, dtype="float32",
                                         progress=False, end_to_end=False)
    for a, b in zip(cals["block"].layers, cals["cache"].layers, strict=True):
        assert b["scorer"] == "cache" and a["scorer"] == "block"
        assert a["order"] == b["order"] and a["floor"] == b["floor"]
        assert np.allclose(a["error"], b["error"], rtol=1e-4, atol=1e-9)
        if a.get("equal"):
            assert a["equal"]["order"] == b["equal"]["order"]


@pytest.mark.parametrize("name", ["qwen3moe-ref", "deepseekv3-ref"])
def test_split_calibration_equals_calibrating_each_part(name, tmp_path):
    """`calibrate_split` (one capture and one scorer per layer, a greedy for the fit documents and one for
    all of them; auto's fit) gives what `moesift.calibrate` gives on the fit documents alone and on all of
    them: the same removal orders, floors, equal-group orders and end-to-end sets."""
    from moesift.formats.workload import read_documents

    mdir = assets.reference_model(name)
    vocab = json.loads((Path(mdir) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)  # documents of different lengths: the capture batches them longest first
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"input_ids": rng.integers(2, vocab, n).tolist()}) + "\n"
                            for n in (40, 64, 23, 64, 51, 9, 37, 60)))
    docs = read_documents([data], max_samples=8)
    fit = [0, 2, 3, 5, 6, 7]
    (tmp_path / "fit.jsonl").write_text("".join(json.dumps(docs[i]) + "\n" for i in fit))
    loaded = moesift.load_model(mdir, device="cpu", dtype="float32")
    (fit_cal,), final = calibrate_mod.calibrate_split(mdir, docs, [fit], max_length=64, device="cpu",
                                                     dtype="float32", loaded=loaded)
    all_cal = final(loaded[0])
    assert final(None) is all_cal  # computed once
    assert fit_cal.settings["documents"] == 6 and all_cal.settings["documents"] == 8
    assert fit_cal.settings["subset"]["documents"] == fit
    refs = {"fit": moesift.calibrate(mdir, tmp_path / "fit.jsonl", max_samples=None, max_length=64, dtype="float32",
                                     progress=False, loaded=loaded),
            "all": moesift.calibrate(mdir, data, max_samples=8, max_length=64, dtype="float32", progress=False,
                                     loaded=loaded)}
    for got, ref in ((fit_cal, refs["fit"]), (all_cal, refs["all"])):
        assert (got.settings["end_to_end"] is None) == (ref.settings["end_to_end"] is None)
        for a, b in zip(got.layers, ref.layers, strict=True):
            assert a["order"] == b["order"] and a["floor"] == b["floor"] and a["tokens"] == b["tokens"]
            assert np.allclose(a["error"], b["error"], rtol=1e-4, atol=1e-9)
            if b.get("equal"):
                assert a["equal"]["order"] == b["equal"]["order"]
            if b.get("e2e"):
                assert a["e2e"]["sets"] == b["e2e"]["sets"]
    if name == "deepseekv3-ref":  # group-limited: the end-to-end phase ran for both
        assert fit_cal.settings["end_to_end"] and all_cal.settings["end_to_end"]


def test_rescaled_greedy_refuses_a_router_it_does_not_reproduce(monkeypatch):
    """The closed form for the other tokens is used only where one removal measured on every token agrees
    with it: where it does not (here the measured change is made 0.1% larger), every token is measured for
    every candidate instead, with the same order."""
    from moesift.selection import calib_greedy

    blk, x, spec, _ = _layer("olmoe")
    units = units_of(spec)
    n_floor = floor_units(spec, units)
    sc = make_scorer(blk, x, "cache")
    fast = greedy_layer(blk, x, units, n_floor, scorer=sc)
    real = calib_greedy._Rescaled.check

    def off(sc_, probe, change):  # a probe that disagrees: the closed form must not be used
        return real(sc_, probe, change * 1.001)

    monkeypatch.setattr(calib_greedy._Rescaled, "check", staticmethod(off))
    slow = greedy_layer(blk, x, units, n_floor, scorer=sc)
    assert fast["others"] == "rescaled" and slow["others"] == "measured"
    assert fast["order"] == slow["order"] and np.allclose(fast["error"], slow["error"], rtol=1e-9)
    assert fast["evaluations"] <= slow["evaluations"]
