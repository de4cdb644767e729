"""Family-specific checks for DeepSeek-V2/V3 (Kimi-K2 configs), GLM-4-MoE, dots1, ERNIE-4.5-MoE, gpt-oss,
Llama-4 text and DBRX, beyond the generic contract in test_arch_contract.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from naive_trim import naive_trim
from test_arch_contract import _inputs, _load, resident_for
from transformers import AutoModelForCausalLM

from moesift.arch import adapter_for
from moesift.arch.spec import MoESpec
from moesift.formats.checkpoint import CheckpointIndex

MINE = ["deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "dots1", "ernie4_5_moe", "gpt_oss", "llama4_text", "dbrx"]

# the published Kimi-K2 config.json (routing and layout fields)
KIMI_K2 = {
    "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61,
    "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "num_nextn_predict_layers": 0,
}


def _v3_spec(n_experts=16, n_group=4, topk_group=2, top_k=2):
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 3, "n_routed_experts": n_experts, "n_group": n_group,
           "topk_group": topk_group, "num_experts_per_tok": top_k, "first_k_dense_replace": 1}
    return cfg, adapter_for(cfg).spec(cfg)


def test_kimi_k2_config_goes_through_the_deepseek_v3_adapter():
    ad = adapter_for(KIMI_K2)
    spec = ad.spec(KIMI_K2)
    assert type(ad).__name__ == "DeepseekV3"
    assert spec == MoESpec("kimi_k2", tuple(range(1, 61)), 384, 8, n_shared=1, scoring="sigmoid", n_group=1,
                           topk_group=1)
    assert ad.plan_problems(spec, {layer: list(range(0, 384, 3)) for layer in spec.moe_layers}, standard=True) == []
    role = ad.classify("model.layers.7.mlp.experts.383.down_proj.weight_scale_inv", KIMI_K2)  # FP8 companion
    assert (role.kind, role.layer, role.expert) == ("expert", 7, 383)
    assert ad.classify("model.layers.7.mlp.gate.e_score_correction_bias", KIMI_K2).kind == "router_bias"
    assert ad.classify("model.layers.7.mlp.shared_experts.up_proj.weight", KIMI_K2).kind == "shared"
    assert ad.classify("model.layers.0.mlp.up_proj.weight", KIMI_K2).kind == "other"
    out = ad.rewrite_config(KIMI_K2, {1: list(range(96)), 2: list(range(100, 196))})
    assert (out["n_routed_experts"], out["n_group"], out["topk_group"]) == (96, 1, 1)
    assert out["model_type"] == "kimi_k2" and KIMI_K2["n_routed_experts"] == 384


def test_kimi_k2_checkpoint_indexes_and_trims(tiny_dir, tmp_path):
    """A tiny Kimi-K2 style checkpoint that says `model_type: kimi_k2`, as the published ones do."""
    src = tmp_path / "kimi"
    shutil.copytree(tiny_dir("kimi_k2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (src / "config.json").write_text(json.dumps(cfg))
    idx = CheckpointIndex.build(src)
    assert idx.spec.model_type == "kimi_k2" and idx.spec.moe_layers == (1, 2) and idx.spec.n_group == 1
    resident = {1: [0, 2, 5, 7], 2: [1, 2, 3, 6]}
    out = naive_trim(src, tmp_path / "t", resident)
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 4
    assert CheckpointIndex.build(out).total_bytes() == idx.predicted_bytes(resident)


def test_mtp_layers_are_not_experts_of_a_decoder_layer():
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "n_routed_experts": 256,
           "num_experts_per_tok": 8, "first_k_dense_replace": 3, "num_nextn_predict_layers": 1}
    ad = adapter_for(cfg)
    assert ad.classify("model.layers.60.mlp.experts.3.up_proj.weight", cfg).kind == "expert"
    for name in ("model.layers.61.mlp.experts.3.up_proj.weight", "model.layers.61.mlp.gate.weight",
                 "model.layers.61.eh_proj.weight"):
        role = ad.classify(name, cfg)
        assert (role.kind, role.layer) == ("mtp", 61)  # a layer of its own, never an expert of layer 60


def test_group_rules_sigmoid_routers():
    cfg, spec = _v3_spec()  # 16 experts, 4 groups of 4, topk_group 2, top-2
    ad = adapter_for(cfg)
    ok = ad.plan_problems
    assert ok(spec, {1: list(range(8)), 2: list(range(4, 12))}, standard=True) == []  # whole groups
    assert ok(spec, {1: [0, 1, 4, 5, 8, 9, 12, 13], 2: [2, 3, 6, 7, 10, 11, 14, 15]}, standard=True) == []  # 2 each
    single = ok(spec, {1: [0, 1, 2, 4], 2: list(range(4))}, standard=False)
    assert any("layer 1" in p and "fewer than 2" in p for p in single) and not any("layer 2" in p for p in single)
    uneven = ok(spec, {1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 4, 5, 8, 9]}, standard=True)
    assert any("layer 1" in p and "whole groups" in p for p in uneven)
    mixed = ok(spec, {1: list(range(8)), 2: [0, 1, 4, 5, 8, 9, 12, 13]}, standard=True)
    assert any("n_group" in p for p in mixed)  # 2 groups kept in one layer, 4 in the other
    assert ok(spec, {1: [0, 1, 4, 5], 2: [0, 1, 4, 5]}, standard=False) == []
    # topk_group = 1: a token may only reach one group, which must hold top-k resident experts
    cfg1, spec1 = _v3_spec(topk_group=1, top_k=3)
    short = adapter_for(cfg1).plan_problems(spec1, {1: [0, 1, 4, 5, 6], 2: list(range(8))}, standard=False)
    assert any("layer 1" in p and "top-k" in p for p in short) and not any("layer 2" in p for p in short)


def test_group_rules_deepseek_v2_max_score():
    """DeepSeek-V2 scores a group by its best expert, so one resident expert per group is reachable."""
    cfg = {"model_type": "deepseek_v2", "num_hidden_layers": 3, "n_routed_experts": 16, "n_group": 4,
           "topk_group": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "topk_method": "group_limited_greedy"}
    ad = adapter_for(cfg)
    spec = ad.spec(cfg)
    assert (spec.n_group, spec.topk_group, spec.scoring) == (4, 2, "softmax")
    assert ad.plan_problems(spec, {1: [0, 4, 8, 12], 2: [1, 5, 9, 13]}, standard=True) == []
    assert ad.rewrite_config(cfg, {1: [0, 4, 8, 12], 2: [1, 5, 9, 13]})["n_group"] == 4
    greedy = dict(cfg, topk_method="greedy")
    assert ad.spec(greedy).n_group is None
    assert ad.plan_problems(ad.spec(greedy), {1: [0, 1, 2], 2: [5, 9, 10]}, standard=True) == []


def test_rewrite_config_groups():
    cfg, _ = _v3_spec()
    ad = adapter_for(cfg)
    two = ad.rewrite_config(cfg, {1: list(range(4, 12)), 2: list(range(8))})
    # two whole groups kept, both selectable (topk_group 2): written as one group, the same routing
    assert (two["n_routed_experts"], two["n_group"], two["topk_group"]) == (8, 1, 1)
    three = ad.rewrite_config(cfg, {1: list(range(12)), 2: list(range(4, 16))})
    assert (three["n_routed_experts"], three["n_group"], three["topk_group"]) == (12, 3, 2)
    one = ad.rewrite_config(cfg, {1: list(range(4)), 2: list(range(8, 12))})
    assert (one["n_group"], one["topk_group"]) == (1, 1)
    equal = ad.rewrite_config(cfg, {1: [0, 1, 4, 5, 8, 9, 12, 13], 2: [2, 3, 6, 7, 10, 11, 14, 15]})
    assert (equal["n_routed_experts"], equal["n_group"], equal["topk_group"]) == (8, 4, 2)
    assert cfg["n_group"] == 4  # the source dict is not modified


def test_equal_count_per_group_restricts_like_trimmed(tmp_path):
    """Keeping 2 of 4 experts in every group (n_group unchanged) equals the trimmed checkpoint."""
    from tiny import AFTER_BUILD, TINY

    cfg = TINY["deepseek_v3"]()
    cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.topk_group = 16, 3, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        AFTER_BUILD["deepseek_v3"](model)
    model.save_pretrained(tmp_path / "full")
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    resident = {layer: [0, 3, 5, 6, 9, 10, 12, 15] for layer in spec.moe_layers}
    assert ad.plan_problems(spec, resident, standard=True) == []
    trimmed = _load(naive_trim(tmp_path / "full", tmp_path / "t", resident))
    assert (trimmed.config.n_group, trimmed.config.topk_group, trimmed.config.n_routed_experts) == (4, 2, 8)
    x = _inputs(cfg.vocab_size)
    with torch.no_grad():
        with ad.restrict(model, resident):
            restricted = model(x).logits
        small = trimmed(x).logits
        full = model(x).logits
    assert (restricted - small).abs().max().item() <= 1e-5 * max(1.0, restricted.abs().max().item())
    assert (full - restricted).abs().max().item() > 1e-4


@pytest.mark.parametrize("model_type", MINE)
def test_restricted_bfloat16_model_routes_only_resident_experts(model_type, tiny_dir):
    """Routers that cast their weight to float32 in a bfloat16 model are still masked (and biases too)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(model_type), dtype=torch.bfloat16).eval()
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    resident = resident_for(spec, seed=3)
    seen = {}
    hs = ad.attach_recorder(model, lambda m, r: seen.setdefault(m, []).append(r.ids))
    try:
        with torch.no_grad(), ad.restrict(model, resident):
            model(_inputs(model.config.vocab_size))
    finally:
        for h in hs:
            h.remove()
    for m, layer in enumerate(spec.moe_layers):
        ids = torch.cat(seen[m]).unique().tolist()
        assert set(ids) <= set(resident[layer]), f"layer {layer}: non-resident experts {set(ids) - set(resident[layer])}"


@pytest.mark.parametrize("model_type", ["llama4_text", "dbrx", "gpt_oss", "deepseek_v3"])
def test_expert_output_is_one_expert_unweighted(model_type, tiny_dir):
    """expert_output(hidden, ids) equals the experts module run with weight 1 on ids (and, for Llama-4, the
    dense experts on a token routed to one expert with score 1)."""
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    layer = ad.spec(model.config).moe_layers[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, model.config.hidden_size, generator=g)
    ids = torch.tensor([0, 3, 3, 7, 1])
    with torch.no_grad():
        got = ad.expert_output(model, layer, hidden, ids)
        experts = ad.experts(model, layer)
        if model_type == "llama4_text":
            n = experts.num_experts
            routed = torch.zeros(n, 5, hidden.shape[1])
            routed[ids, torch.arange(5)] = hidden
            want = experts(routed.reshape(-1, hidden.shape[1])).reshape(n, 5, -1).sum(0)
        else:
            want = experts(hidden, ids[:, None], torch.ones(5, 1)).reshape(5, -1)
    assert got.shape == hidden.shape
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[1], got[0])


def test_dbrx_fused_rows_per_expert(tiny_dir):
    idx = CheckpointIndex.build(tiny_dir("dbrx"))
    cfg = json.loads((tiny_dir("dbrx") / "config.json").read_text())
    roles = {e.name: e.role for e in idx.tensors}
    r = roles["transformer.blocks.1.ffn.experts.mlp.w1"]
    assert (r.kind, r.layer, r.expert_dim, r.expert_block) == ("expert", 1, 0, cfg["ffn_config"]["ffn_hidden_size"])
    out = adapter_for(cfg).rewrite_config(cfg, {i: [1, 2, 5, 6] for i in range(3)})
    assert out["ffn_config"]["moe_num_experts"] == 4 and cfg["ffn_config"]["moe_num_experts"] == 8


def test_layer_layouts():
    ernie = {"model_type": "ernie4_5_moe", "num_hidden_layers": 28, "moe_num_experts": 64, "moe_k": 6,
             "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1}
    spec = adapter_for(ernie).spec(ernie)
    assert spec.moe_layers == tuple(range(1, 28)) and (spec.n_experts, spec.top_k, spec.n_shared) == (64, 6, 2)
    ernie2 = dict(ernie, moe_layer_interval=2, moe_layer_end_index=20)
    assert adapter_for(ernie2).spec(ernie2).moe_layers == tuple(range(1, 21, 2))
    llama = {"model_type": "llama4_text", "num_hidden_layers": 48, "num_local_experts": 128,
             "num_experts_per_tok": 1, "interleave_moe_layer_step": 2}
    spec = adapter_for(llama).spec(llama)
    assert spec.moe_layers == tuple(range(1, 48, 2)) and (spec.n_shared, spec.scoring) == (1, "sigmoid")
    glm = {"model_type": "glm4_moe", "num_hidden_layers": 46, "n_routed_experts": 128, "num_experts_per_tok": 8,
           "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
    assert adapter_for(glm).spec(glm).moe_layers == tuple(range(1, 46))
    oss = {"model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4}
    assert adapter_for(oss).classify("model.layers.3.mlp.experts.gate_up_proj_blocks", oss).expert_dim == 0
    assert adapter_for(oss).classify("model.layers.3.mlp.router.bias", oss).kind == "router_bias"


@pytest.mark.parametrize("model_type", MINE)
def test_reroute_with_the_models_own_choice_is_the_full_model(model_type, tiny_dir):
    """Rerouting to the experts the model itself picked (biases and groups included) weights them as the family
    does, so the logits are unchanged; rerouting to other experts changes them."""
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    x = _inputs(model.config.vocab_size)
    own = {}
    hs = ad.attach_recorder(model, lambda m, r: own.__setitem__(m, r.ids.clone()))
    with torch.no_grad():
        full = model(x).logits
    for h in hs:
        h.remove()

    def same(m, probs):
        return own[m], torch.ones_like(own[m], dtype=torch.bool)

    def worst(m, probs):
        ids = probs.topk(own[m].shape[1], dim=-1, largest=False).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)

    with torch.no_grad():
        with ad.reroute(model, same):
            got = model(x).logits
        with ad.reroute(model, worst):
            other = model(x).logits
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert (other - full).abs().max().item() > 1e-4


def test_different_group_counts_per_layer_load_and_trim(tiny_dir, tmp_path):
    """Whole groups, a different number per layer (3, 2, 2 of 4): each layer gets its own n_group, and both the
    trimmed checkpoint and the resident-only load compute what the restricted full model computes."""
    from moesift.apply.resident import load_resident, load_trimmed
    from moesift.apply.trim import trim

    d = tiny_dir("deepseek_v3")
    model = _load(d)
    ad = adapter_for(model.config)
    resident = {1: [0, 1, 2, 3, 6, 7], 2: [0, 1, 4, 5], 3: [2, 3, 6, 7]}
    assert ad.plan_problems(ad.spec(model.config), resident, standard=False) == []
    x = _inputs(model.config.vocab_size)
    with torch.no_grad():
        with ad.restrict(model, resident):
            want = model(x).logits
        got_resident = load_resident(d, resident)(x).logits
        got_trimmed = load_trimmed(trim(d, resident, tmp_path / "t", progress=False))[0](x).logits
    torch.testing.assert_close(got_resident, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_trimmed, want, rtol=0, atol=1e-5)
