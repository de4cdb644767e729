"""Trace, WCER and plan files are checked on load: a damaged file is one `moesift: error:` line (exit 2)
in every command that reads it, never a traceback and never a result built from damage."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from validcases import E, assert_clean_error, cli, plan_dict, trace_parts, wcer_dict, write_trace


def _commands(path, tmp_path):
    """Every command that reads a trace, with arguments that succeed on a valid one."""
    return [
        ["show", path],
        ["show", path, "--json"],
        ["plan", path, "--keep", "0.5", "--json"],
        ["plan", path, "--keep", "0.5", "--strategy", "weighted"],
        ["report", path, "--json"],
        ["cache", path, "--capacity", "4", "--json"],
        ["place", path, "--gpus", "2", "--json"],
        ["merge", path, path, "--out", tmp_path / "merged.trace", "--force"],
        ["export", path, "--out", tmp_path / "exported.json", "--force"],
    ]


def test_valid_trace_passes_every_command(tmp_path):
    meta, arrays = trace_parts()
    p = write_trace(tmp_path / "ok.trace", meta, arrays)
    for args in _commands(p, tmp_path):
        code, out, err = cli(args)
        assert code == 0, (args, err[-2000:])


def _bad_traces():
    """(what, metadata, arrays) of damaged traces each command must refuse."""
    meta, arrays = trace_parts()

    def with_meta(fn):
        m = copy.deepcopy(meta)
        fn(m)
        return m

    def with_array(name, value):
        a = dict(arrays)
        a[name] = value
        return a

    wm_nan = arrays["weight_mass"].copy()
    wm_nan[0, 3] = np.nan
    neg = arrays["prefill_counts"].copy()
    neg[1, 2] = -5
    huge = arrays["prefill_counts"].copy()
    huge[0, 0] = 2**62
    log999 = arrays["routing_log"].copy()
    log999[3, 1, 0] = 999
    return [
        ("n_experts a string", with_meta(lambda m: m["model"].update(n_experts="8")), arrays),
        ("n_experts a float", with_meta(lambda m: m["model"].update(n_experts=8.5)), arrays),
        ("top_k above experts", with_meta(lambda m: m["model"].update(top_k=99)), arrays),
        ("model a list", with_meta(lambda m: m.update(model=[1, 2])), arrays),
        ("workload a string", with_meta(lambda m: m.update(workload="w")), arrays),
        ("moe_layers too short", with_meta(lambda m: m["model"].update(moe_layers=[0, 1])), arrays),
        ("documents negative", with_meta(lambda m: m["workload"].update(documents=-1)), arrays),
        ("label a dict", with_meta(lambda m: m["workload"].update(label={"a": 1})), arrays),
        ("n_experts says 16", with_meta(lambda m: m["model"].update(n_experts=16)), arrays),
        ("prefill_counts one expert short", meta, with_array("prefill_counts", arrays["prefill_counts"][:, :-1].copy())),
        ("fold_counts wrong layers", meta, with_array("fold_counts", arrays["fold_counts"][:, :2].copy())),
        ("coactivation wrong shape", meta, with_array("coactivation", arrays["coactivation"][:, :, :4].copy())),
        ("transitions wrong shape", meta, with_array("transitions", arrays["coactivation"])),
        ("routing_log wrong layers", meta, with_array("routing_log", arrays["routing_log"][:, :2].copy())),
        ("doc_offsets past the log", meta, with_array("doc_offsets", np.array([0, 12, 999], np.int64))),
        ("negative count", meta, with_array("prefill_counts", neg)),
        ("huge count", meta, with_array("prefill_counts", huge)),
        ("NaN in weight_mass", meta, with_array("weight_mass", wm_nan)),
        ("negative prob_mass", meta, with_array("prob_mass", -arrays["prob_mass"])),
        ("float counts", meta, with_array("prefill_counts", arrays["prefill_counts"].astype(np.float32))),
        ("all-zero counts", meta, with_array("prefill_counts", np.zeros((3, E), np.int64))),
        ("routing-log id 999", meta, with_array("routing_log", log999)),
        ("selected_prob_mass wrong shape", meta, with_array("selected_prob_mass", np.ones((3, 3)))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_traces())), ids=[c[0] for c in _bad_traces()])
def test_damaged_trace_is_one_error_line_everywhere(case, tmp_path):
    what, meta, arrays = _bad_traces()[case]
    p = write_trace(tmp_path / "bad.trace", meta, arrays)
    for args in _commands(p, tmp_path):
        code, out, err = cli(args)
        assert_clean_error(code, out, err, f"{what}: {args[0]}")
        assert "bad.trace" in err
    assert not (tmp_path / "merged.trace").exists() and not (tmp_path / "exported.json").exists()


def test_metadata_not_json_and_no_prefill_counts(tmp_path):
    meta, arrays = trace_parts()
    p = write_trace(tmp_path / "a.trace", meta, arrays, raw_meta='{"schema": "moesift-trace/1", ')
    assert_clean_error(*cli(["show", p]))
    p = write_trace(tmp_path / "b.trace", meta, arrays, raw_meta='[1, 2]')
    assert_clean_error(*cli(["plan", p, "--keep", "0.5"]))
    a = {k: v for k, v in arrays.items() if k != "prefill_counts"}
    p = write_trace(tmp_path / "c.trace", meta, a)
    assert_clean_error(*cli(["show", p]))


def test_optional_and_unknown_fields_are_accepted(tmp_path):
    """Metadata a newer moesift adds (hidden size, decoder indices, unknown keys) and a per-expert
    selected_prob_mass [L, E] array are read; unknown arrays are kept."""
    meta, arrays = trace_parts()
    meta["model"].update(hidden_size=64, num_hidden_layers=4, decoder_layers=[1, 2, 3], something_new={"x": 1})
    meta["workload"]["also_new"] = [1, 2]
    meta["future"] = "ok"
    arrays = dict(arrays, selected_prob_mass=arrays["prob_mass"] * 0.5, future_array=np.ones(3, np.float32))
    p = write_trace(tmp_path / "new.trace", meta, arrays)
    code, out, err = cli(["show", p, "--json"])
    assert code == 0, err
    from moesift.formats.trace import Trace

    t = Trace.load(p)
    assert t.model["hidden_size"] == 64 and "future_array" in t.arrays
    bad = copy.deepcopy(meta)
    bad["model"]["hidden_size"] = -3
    assert_clean_error(*cli(["show", write_trace(tmp_path / "bad.trace", bad, arrays)]))


# ---- WCER expert-trace/1 -----------------------------------------------------------------------------


def _wcer_bad():
    d = wcer_dict()

    def hist(fn):
        x = copy.deepcopy(d)
        fn(x["per_layer_histogram"])
        return x

    zero = copy.deepcopy(d)
    zero["per_layer_histogram"] = [[0] * E for _ in range(3)]
    wm = copy.deepcopy(d)
    wm["per_layer_weight_mass"][0][0] = float("nan")
    return [
        ("count 1e30", hist(lambda h: h[0].__setitem__(0, 1e30))),
        ("count NaN", hist(lambda h: h[0].__setitem__(0, float("nan")))),
        ("count negative", hist(lambda h: h[1].__setitem__(2, -4))),
        ("count fractional", hist(lambda h: h[1].__setitem__(2, 2.5))),
        ("count a string", hist(lambda h: h[1].__setitem__(2, "7"))),
        ("count true", hist(lambda h: h[1].__setitem__(2, True))),
        ("all-zero histogram", zero),
        ("NaN weight mass", wm),
        ("n_experts a float", dict(d, n_experts=8.0)),
        ("prefill_tokens a string", dict(d, prefill_tokens="12")),
        ("model_id a list", dict(d, model_id=[1])),
    ]


@pytest.mark.parametrize("case", range(len(_wcer_bad())), ids=[c[0] for c in _wcer_bad()])
def test_damaged_wcer_json_is_one_error_line(case, tmp_path):
    what, d = _wcer_bad()[case]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    for args in (["show", p], ["plan", p, "--keep", "0.5", "--out", tmp_path / "plan.json"], ["report", p, "--json"],
                 ["export", p, "--out", tmp_path / "x.trace", "--format", "moesift-trace/1"]):
        assert_clean_error(*cli(args), f"{what}: {args[0]}")
    assert not (tmp_path / "plan.json").exists()


def test_valid_wcer_json_plans(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps(wcer_dict()))
    code, out, err = cli(["plan", p, "--keep", "0.5", "--out", tmp_path / "plan.json"])
    assert code == 0, err
    assert json.loads((tmp_path / "plan.json").read_text())["schema"] == "moesift-plan/1"


# ---- ids in cache / place ----------------------------------------------------------------------------


def test_cache_resident_plan_with_expert_999(tmp_path):
    meta, arrays = trace_parts()
    t = write_trace(tmp_path / "ok.trace", meta, arrays)
    pl = plan_dict()
    pl["layers"][1]["resident"] = [0, 999]
    pf = tmp_path / "plan.json"
    pf.write_text(json.dumps(pl))
    assert_clean_error(*cli(["cache", t, "--capacity", "4", "--resident", pf]))
    pf.write_text(json.dumps(plan_dict()))
    code, out, err = cli(["cache", t, "--capacity", "4", "--resident", pf, "--json"])
    assert code == 0, err


def test_unknown_workload_counts_and_bad_sources(tmp_path):
    """Found by fuzzing: `documents: null` (engine statistics do not know it) crashed show / merge / export;
    `sources: null` crashed merge."""
    meta, arrays = trace_parts()
    meta["workload"].update(documents=None, prefill_tokens=None)
    p = write_trace(tmp_path / "unknown.trace", meta, arrays)
    for args in (["show", p], ["show", p, "--json"], ["merge", p, p, "--out", tmp_path / "m.trace"],
                 ["export", p, "--out", tmp_path / "e.json"], ["report", p, "--json"]):
        code, out, err = cli(args)
        assert code == 0, (args, err[-2000:])
    from moesift.formats.trace import Trace

    assert Trace.load(tmp_path / "m.trace").workload["documents"] is None
    meta["workload"]["sources"] = None
    q = write_trace(tmp_path / "bad.trace", meta, arrays)
    assert_clean_error(*cli(["merge", q, q, "--out", tmp_path / "m2.trace"]))
