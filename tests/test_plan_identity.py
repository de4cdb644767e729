"""A plan meets a model only if it was made for that model's config: a plan (or trace) of a same-family
model with another config is refused, naming the differing fields, unless --force-plan / force_plan=True."""

from __future__ import annotations

import json
import shutil

import pytest
from validcases import assert_clean_error, cli

import moesift
from moesift.core.errors import MoesiftError


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    src = tiny_dir("qwen3_moe")
    d = tmp_path_factory.mktemp("identity")
    data = d / "w.jsonl"  # the tiny model has no tokenizer: token ids
    data.write_text("\n".join(json.dumps({"input_ids": [(7 * i + j) % 50 for j in range(24)]}) for i in range(12)))
    tr = d / "w.trace"
    moesift.trace(src, data, out=tr, max_length=32, progress=False)
    plan = d / "plan.json"
    moesift.plan([tr], out=plan, keep=0.5)
    other = d / "other"  # same family and expert layout, another config
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["max_position_embeddings"] * 2
    cfg["rms_norm_eps"] = 0.125
    (other / "config.json").write_text(json.dumps(cfg))
    resaved = d / "resaved"  # the same model written by another transformers version, in another dtype
    shutil.copytree(src, resaved)
    cfg = json.loads((resaved / "config.json").read_text())
    cfg["transformers_version"] = "0.0.1"
    cfg["dtype"] = "bfloat16"
    (resaved / "config.json").write_text(json.dumps(cfg))
    return src, other, resaved, tr, plan, data, d


def test_trim_refuses_a_plan_of_another_config(setup):
    src, other, resaved, tr, plan, data, d = setup
    rec = json.loads(plan.read_text())["model"]
    assert rec["config_hash"] and isinstance(rec["config"], dict)
    with pytest.raises(MoesiftError, match=r"max_position_embeddings: \d+ vs \d+.*rms_norm_eps.*--force-plan"):
        moesift.trim(other, plan, d / "t1", progress=False)
    code, out, err = cli(["trim", other, "--plan", plan, "--out", d / "t2"])
    assert_clean_error(code, out, err)
    assert "max_position_embeddings" in err and not (d / "t2").exists()
    code, out, err = cli(["trim", other, "--plan", plan, "--out", d / "t3", "--force-plan", "--json"])
    assert code == 0, err
    moesift.trim(src, plan, d / "t4", progress=False)  # its own model
    moesift.trim(resaved, plan, d / "t5", progress=False)  # differs only in how it was saved


def test_every_door_checks_the_plan(setup):
    src, other, resaved, tr, plan, data, d = setup
    with pytest.raises(MoesiftError, match="max_position_embeddings"):
        moesift.load_resident(other, plan)
    moesift.load_resident(other, plan, force_plan=True)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(other)
    with pytest.raises(MoesiftError, match="rms_norm_eps"), moesift.restrict(m, plan):
        pass
    with moesift.restrict(m, plan, force_plan=True):
        pass
    assert_clean_error(*cli(["eval", other, "--data", data, "--plan", plan, "--max-length", "16"]))
    assert_clean_error(*cli(["plan", tr, "--keep", "0.5", "--model", other]))
    code, out, err = cli(["plan", tr, "--keep", "0.5", "--model", other, "--force-plan", "--json"])
    assert code == 0, err
    assert_clean_error(*cli(["plan", "diff", plan, plan, "--model", other]))
    code, out, err = cli(["plan", "diff", plan, plan, "--model", src, "--json"])
    assert code == 0, err


def test_plan_without_recorded_config_is_refused_by_hash(setup):
    src, other, resaved, tr, plan, data, d = setup
    p = json.loads(plan.read_text())
    del p["model"]["config"]
    old = d / "old.json"
    old.write_text(json.dumps(p))
    with pytest.raises(MoesiftError, match="does not record which fields differ"):
        moesift.trim(other, old, d / "t6", progress=False)
    p["model"]["config_hash"] = None  # a hand-written plan: checked by shape only
    old.write_text(json.dumps(p))
    moesift.trim(other, old, d / "t7", progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["layers"][0].update(resident=[0, 0, 1, 2]), "repeats an expert id"),
    (lambda p: p["layers"][0].update(resident=[0, 1, 2, 999]), "outside 0..7"),
    (lambda p: p["layers"][0].update(resident=[0, 1.5, 2, 3]), "integer expert ids"),
    (lambda p: p["layers"][0].update(resident=[0, True, 2, 3]), "integer expert ids"),
    (lambda p: p["layers"][0].update(layer=77), "not one of the plan's MoE layers"),
    (lambda p: p["layers"][1].update(layer=p["layers"][0]["layer"]), "repeats a layer"),
    (lambda p: p["model"].update(n_experts="8"), "n_experts"),
    (lambda p: p.update(model=[1]), "'model' must be a JSON object"),
    (lambda p: p["model"].update(config=[1]), "'config' must be a JSON object"),
])
def test_damaged_plans_are_refused_on_load(setup, edit, match):
    src, other, resaved, tr, plan, data, d = setup
    p = json.loads(plan.read_text())
    assert p["model"]["n_experts"] == 8
    edit(p)
    bad = d / "bad.json"
    bad.write_text(json.dumps(p))
    with pytest.raises(MoesiftError, match=match):
        moesift.Plan.load(bad)
    code, out, err = cli(["trim", src, "--plan", bad, "--out", d / "never"])
    assert_clean_error(code, out, err)
    assert not (d / "never").exists()


def test_plan_from_an_in_memory_model_fits_its_saved_copy(setup):
    """A trace of a model object (config from `to_dict`, library defaults spelled out) gives plans that the
    same model's directory (config.json without the defaults) accepts: absent fields are not differences."""
    import torch
    from transformers import AutoModelForCausalLM

    src, other, resaved, tr, plan, data, d = setup
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    m.name_or_path = ""  # as if built in memory
    t = moesift.trace(m, data, max_length=16, progress=False)
    assert t.model["config_hash"] != json.loads(plan.read_text())["model"]["config_hash"]
    p = moesift.plan([t], keep=0.5)
    moesift.trim(src, p, d / "from-memory", progress=False)
    with pytest.raises(MoesiftError, match="max_position_embeddings"):
        moesift.trim(other, p, d / "from-memory-other", progress=False)


def test_cache_with_model_checks_the_resident_plan(setup):
    src, other, resaved, tr, plan, data, d = setup
    logged = d / "logged.trace"
    if not logged.exists():
        moesift.trace(src, data, out=logged, max_length=16, log_routing=True, progress=False)
    k = json.loads(plan.read_text())["model"]["top_k"]
    args = ["cache", logged, "--capacity", str(k), "--resident", plan, "--json"]
    assert cli([*args, "--model", src])[0] == 0
    code, out, err = cli([*args, "--model", other])
    assert_clean_error(code, out, err)
    assert "max_position_embeddings" in err
    assert cli([*args, "--model", other, "--force-plan"])[0] == 0
