"""WCER `expert-trace/1` JSON: the 15 real traces import, `show --json` reports them, export reproduces them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import WCER_DIR

import moesift
from moesift.core.errors import MoesiftError
from moesift.formats.trace import load_expert_trace
from moesift.formats.wcer import dump_expert_trace

FILES = sorted(WCER_DIR.glob("*.json"))


def test_fifteen_files_present():
    assert len(FILES) == 15


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_import_show_export(path, tmp_path, capsys, monkeypatch):
    src = json.loads(path.read_text())
    t = load_expert_trace(path)
    L, E, K = src["n_layers"], src["n_experts"], src["top_k"]
    assert t.counts.shape == (L, E) and t.top_k == K and t.n_experts == E
    tokens = src["prefill_tokens"] // L  # the format counts one pass per token and MoE layer
    assert (t.counts.sum(axis=1) == tokens * K).all()
    assert t.workload["prefill_tokens"] == tokens and t.workload["documents"] == src["n_prompts"]
    assert t.model["hash_layers"] == src["hash_layers"]

    # Trace.load dispatches JSON to the importer; `moesift show --json` reports the contract fields
    from moesift.cli import main

    monkeypatch.setattr(sys, "argv", ["moesift", "show", str(path), "--json"])
    main()
    info = json.loads(capsys.readouterr().out)
    assert info["schema"] == "expert-trace/1"
    assert info["model"]["n_layers"] == L and info["model"]["n_experts"] == E and info["model"]["top_k"] == K
    assert info["workload"]["label"] == src["workload_label"]
    assert info["workload"]["prefill_tokens"] == tokens and info["workload"]["decode_tokens"] == 0
    assert info["workload"]["documents"] == src["n_prompts"]
    assert info["counts"] == src["per_layer_histogram"]

    # export reproduces the file's figures exactly (hot-expert order among equal counts is not defined)
    out = dump_expert_trace(t)
    for key in ("schema_version", "n_layers", "n_experts", "top_k", "prefill_tokens", "decode_tokens",
                "total_routes", "per_layer_histogram", "experts_needed_for_pct_coverage_per_layer",
                "coverage_fraction_at_topM_per_layer", "imbalance_ratio_per_layer", "hash_layers",
                "coactivation_top_pairs_per_layer", "per_layer_weight_mass", "model_id", "workload_label",
                "n_prompts", "n_forward_calls"):
        assert out[key] == src.get(key), key
    for got, want in zip(out["hot_experts_per_layer"], src["hot_experts_per_layer"], strict=True):
        assert [c for _, c in got] == [c for _, c in want]
    for layer, hot in enumerate(out["hot_experts_per_layer"]):
        assert all(src["per_layer_histogram"][layer][e] == c for e, c in hot)

    # through the CLI: export to a file, read back
    dst = tmp_path / "x.json"
    moesift.export_trace(path, dst)
    again = json.loads(dst.read_text())
    assert again["per_layer_histogram"] == src["per_layer_histogram"]
    assert again["experts_needed_for_pct_coverage_per_layer"] == src["experts_needed_for_pct_coverage_per_layer"]


def test_export_of_a_native_trace_recomputes_figures():
    from moesift.formats.trace import Trace

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 16))
    co = rng.integers(0, 9, size=(3, 16, 16))
    co = co + co.transpose(0, 2, 1)
    co[:, np.arange(16), np.arange(16)] = 0
    t = Trace(model={"name": "m", "model_type": "x", "n_experts": 16, "top_k": 2, "moe_layers": [1, 2, 3]},
              workload={"label": "w", "documents": 4, "prefill_tokens": 10, "decode_tokens": 0},
              arrays={"prefill_counts": counts, "coactivation": co})
    out = dump_expert_trace(t)
    assert out["per_layer_histogram"] == counts.tolist()
    for layer in range(3):
        srt = np.sort(counts[layer])[::-1]
        cum = np.cumsum(srt) / srt.sum()
        for pct, n in out["experts_needed_for_pct_coverage_per_layer"][layer].items():
            assert cum[n - 1] >= int(pct) / 100 and (n == 1 or cum[n - 2] < int(pct) / 100)
        pairs = out["coactivation_top_pairs_per_layer"][layer]
        assert pairs[0][2] == np.triu(co[layer], 1).max() and all(i < j for i, j, _ in pairs)
    assert out["prefill_tokens"] == 30  # tokens x MoE layers, the format's definition
    back = load_expert_trace_from(out)
    np.testing.assert_array_equal(back.counts, counts)


def load_expert_trace_from(obj):
    from moesift.formats.trace import from_expert_trace

    return from_expert_trace(obj)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an expert-trace/1 object"),
        ('{"schema_version": "other/2"}', "schema_version"),
        ('{"schema_version": "expert-trace/1", "n_layers": 2, "n_experts": 4, "top_k": 2}', "per_layer_histogram"),
        ('{"schema_version": "expert-trace/1", "n_layers": 2, "n_experts": 4, "top_k": 2, '
         '"per_layer_histogram": [[1, 2, 3, 4]]}', "shape"),
    ],
)
def test_malformed_files(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(MoesiftError, match=match):
        moesift.Trace.load(p)


def test_wcer_weight_mass_imports_as_selected_prob_mass():
    """WCER's per_layer_weight_mass is the router probability before renormalisation: it goes into
    selected_prob_mass, and the 'weighted' strategy (applied weights) refuses it with the reason."""
    path = sorted(WCER_DIR.glob("Mixtral*code*.json"))[0]
    src = json.loads(path.read_text())
    t = load_expert_trace(path)
    np.testing.assert_array_equal(t.arrays["selected_prob_mass"], np.asarray(src["per_layer_weight_mass"]))
    assert t.get("weight_mass") is None
    with pytest.raises(MoesiftError, match="selected_prob_mass"):
        moesift.plan(t, keep=0.5, strategy="weighted")


def test_export_of_a_trace_without_selected_prob_mass_omits_the_field():
    from moesift.formats.trace import Trace

    rng = np.random.default_rng(1)
    t = Trace(model={"name": "m", "model_type": "x", "n_experts": 8, "top_k": 2, "moe_layers": [0, 1]},
              workload={"label": "w", "documents": 2, "prefill_tokens": 10, "decode_tokens": 0, "generate": 0},
              arrays={"prefill_counts": rng.integers(0, 9, size=(2, 8)), "weight_mass": rng.random((2, 8))})
    out = dump_expert_trace(t)
    assert out["per_layer_weight_mass"] is None  # the applied weights are never written under WCER's name
    assert "predates selected_prob_mass" in out["router_weights"]
    t.arrays["selected_prob_mass"] = rng.random((2, 8))
    out = dump_expert_trace(t)
    assert out["per_layer_weight_mass"] == t.arrays["selected_prob_mass"].tolist()
    assert out["router_weights"].startswith("captured")


def test_max_tokens_per_prompt_is_the_generation_budget(tiny_dir, tmp_path):
    wl = tmp_path / "ids.jsonl"
    wl.write_text("".join(json.dumps({"input_ids": list(range(3, 3 + n))}) + "\n" for n in (5, 9)))
    d = tiny_dir("qwen3_moe")
    gen = moesift.trace(str(d), wl, max_length=7, generate=3, progress=False)
    assert dump_expert_trace(gen)["max_tokens_per_prompt"] == 3
    pre = moesift.trace(str(d), wl, max_length=7, progress=False)
    assert dump_expert_trace(pre)["max_tokens_per_prompt"] == 0
    from moesift.formats.trace import merge

    assert dump_expert_trace(merge([pre, gen]))["max_tokens_per_prompt"] == 3


def test_weighted_plan_says_it_uses_the_applied_weights():
    from test_analysis import make_trace

    t = make_trace(L=2, E=8, K=2, n_tokens=200, doc_len=20)
    t.arrays["weight_mass"] = t.counts * 0.5
    p = moesift.plan(t, keep=0.5, strategy="weighted")
    assert "applied" in p.predictions["strategy_note"] and "selected_prob_mass" in p.predictions["strategy_note"]
    assert "strategy_note" not in moesift.plan(t, keep=0.5, strategy="frequency").predictions
