"""Configs every engine reads: hub key names for the tiny and bundled models (transformers reads them the
same), and trimming keeps every key of the source config."""

from __future__ import annotations

import json

import pytest
from test_trim import plan_for
from tiny import TINY

from moesift.apply.trim import trim
from moesift.arch import adapter_for
from moesift.assets import MODELS, reference_model
from moesift.formats.checkpoint import CheckpointIndex


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_hub_config_reads_the_same_in_transformers(model_type, tmp_path):
    """The hub spelling of every tiny config gives transformers the same configuration (no weights needed)."""
    from transformers import AutoConfig

    TINY[model_type]().save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    hub = adapter_for(saved).hub_config(saved)
    assert set(saved) - set(hub) <= set(adapter_for(saved).hub_renames)  # nothing dropped but renames
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hub))
    a = AutoConfig.from_pretrained(tmp_path / "a").to_dict()
    b = AutoConfig.from_pretrained(tmp_path / "b").to_dict()
    for c in (a, b):
        c.pop("_name_or_path", None)
        rope = c.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("type") == rope.get("rope_type"):
            rope.pop("type")  # transformers keeps the legacy alias of rope_type it read from rope_scaling
    extra = set(b) - set(a)  # keys transformers keeps as plain attributes: the family's hub routing keys
    assert extra <= set(adapter_for(saved).hub_defaults) | {"rope_theta", "rope_scaling", "partial_rotary_factor"}
    assert a == {k: b[k] for k in a}
    rope = saved.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        assert hub["rope_theta"] == rope["rope_theta"]


def test_hub_renames_and_defaults():
    q = adapter_for({"model_type": "qwen3_moe"}).hub_config(
        {"model_type": "qwen3_moe", "num_local_experts": 8, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert q["num_experts"] == 8 and "num_local_experts" not in q
    assert q["rope_theta"] == 1e6 and q["rope_scaling"] is None
    y = adapter_for({"model_type": "deepseek_v2"}).hub_config(
        {"model_type": "deepseek_v2", "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 40.0}})
    assert y["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 40.0}
    d = adapter_for({"model_type": "deepseek_v3"}).hub_config({"model_type": "deepseek_v3", "topk_method": "x"})
    assert d["topk_method"] == "x" and d["scoring_func"] == "sigmoid"  # present keys are never changed


@pytest.mark.parametrize("name", MODELS)
def test_bundled_configs_use_hub_key_names(name):
    cfg = json.loads((reference_model(name) / "config.json").read_text())
    assert adapter_for(cfg).hub_config(cfg) == cfg  # nothing left to rename or add
    assert "rope_theta" in cfg and "rope_scaling" in cfg
    if cfg["model_type"] == "deepseek_v3":
        assert (cfg["topk_method"], cfg["scoring_func"], cfg["n_routed_experts"]) == ("noaux_tc", "sigmoid", 32)
    else:
        assert cfg["num_experts"] == {"qwen3_moe": 32, "qwen2_moe": 32, "olmoe": 64}[cfg["model_type"]]


def _check_keys_kept(src, out):
    a = json.loads((src / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    assert set(a) <= set(b), sorted(set(a) - set(b))
    changed = {k for k in a if a[k] != b[k]}
    assert changed <= {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_group",
                       "topk_group", "ffn_config"}, changed
    return changed


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_trim_keeps_every_source_key(model_type, tiny_dir, tmp_path):
    src = tiny_dir(model_type)
    out = trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=True), tmp_path / "t", progress=False,
               checksums=False)
    assert _check_keys_kept(src, out)  # the expert count changed, nothing else


@pytest.mark.parametrize("name", MODELS)
def test_trim_keeps_every_key_of_bundled_configs(name, tmp_path):
    src = reference_model(name)
    out = trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=True), tmp_path / "t", progress=False,
               checksums=False)
    _check_keys_kept(src, out)


@pytest.mark.parametrize("name", MODELS)
def test_bundled_models_compute_what_their_transformers5_form_computes(name, tmp_path):
    """The hub-style bundled configs (and DeepSeek-V3's stored lm_head) change nothing transformers computes:
    logits are bit-identical to those of the model as transformers 5 saved it (its key names, tied output)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    src = reference_model(name)
    old = tmp_path / "t5"
    shutil.copytree(src, old)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("rope_theta", "rope_scaling", *adapter_for(cfg).hub_defaults):
        cfg.pop(k, None)
    if "num_experts" in cfg and cfg["model_type"] == "qwen3_moe":  # transformers 5 names it so
        cfg["num_local_experts"] = cfg.pop("num_experts")
    tensors = load_file(old / "model.safetensors")
    if "lm_head.weight" in tensors:
        assert torch.equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"])
        save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
        cfg["tie_word_embeddings"] = True
    (old / "config.json").write_text(json.dumps(cfg))
    x = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(x).logits
        b = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)(x).logits
    assert torch.equal(a, b)
