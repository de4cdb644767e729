"""Family checks beyond the generic adapter contract: Qwen2-MoE, Qwen3-Next, OLMoE, Mixtral, MiniMax, Phi-MoE,
Jamba, Hunyuan-MoE-V1, Granite-MoE (plain, shared, hybrid, sliding-window)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesift.arch import adapter_for
from moesift.core.errors import MoesiftError

# model_type -> (MoE decoder layers, shared experts per MoE layer) of the tiny configs in tiny_families_1.py
LAYOUT = {
    "qwen2_moe": ((0, 2), 1),  # mlp_only_layers=[1]
    "qwen3_next": ((0, 1, 3), 1),  # mlp_only_layers=[2]
    "olmoe": ((0, 1, 2), 0),
    "mixtral": ((0, 1, 2), 0),
    "minimax": ((0, 1, 2), 0),
    "phimoe": ((0, 1, 2), 0),
    "jamba": ((1, 3), 0),  # expert_layer_period=2, offset=1
    "hunyuan_v1_moe": ((0, 1, 2), 1),
    "granitemoe": ((0, 1, 2), 0),
    "granitemoeshared": ((0, 1, 2), 1),
    "granitemoehybrid": ((0, 1, 2), 1),
    "granitemoe_swa": ((0, 1, 2), 1),
}
FAMILIES = sorted(LAYOUT)


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _x():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_spec_from_disk_and_memory_agree(model_type, tiny_dir):
    d = tiny_dir(model_type)
    cfg = json.loads((d / "config.json").read_text())
    model = _load(d)
    disk, mem = adapter_for(cfg).spec(cfg), adapter_for(model.config).spec(model.config)
    assert disk == mem
    assert (disk.moe_layers, disk.n_shared) == LAYOUT[model_type]
    assert (disk.n_experts, disk.top_k) == (8, 2)
    ad = adapter_for(cfg)
    for layer in range(cfg["num_hidden_layers"]):  # the block of every MoE layer holds routed experts
        has_experts = hasattr(getattr(model.model.layers[layer], ad.block_attr, None), ad.experts_attr)
        assert has_experts == (layer in disk.moe_layers)


@pytest.mark.parametrize("model_type", [f for f in FAMILIES if f != "phimoe"])
def test_reroute_with_own_top_k_is_the_full_model(model_type, tiny_dir):
    """The generic rerouting path weights a selection as the family does (renormalised or not)."""
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    k = ad.spec(model.config).top_k

    def choose(_m, probs):
        ids = torch.topk(probs, k, dim=-1).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)

    with torch.no_grad():
        ref = model(input_ids=_x()).logits
        with ad.reroute(model, choose):
            got = model(input_ids=_x()).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_jamba_keeps_selected_probabilities_unnormalised(tiny_dir):
    model = _load(tiny_dir("jamba"))
    ad = adapter_for(model.config)
    sums = []
    hs = ad.attach_recorder(model, lambda m, r: sums.append(r.weights.sum(-1)))
    with torch.no_grad():
        model(_x())
    for h in hs:
        h.remove()
    s = torch.cat(sums)
    assert (s < 1 - 1e-4).any() and (s <= 1 + 1e-6).all()


def test_phimoe_top_k_is_fixed(tiny_dir):
    model = _load(tiny_dir("phimoe"))
    ad = adapter_for(model.config)
    with torch.no_grad():
        full = model(_x()).logits
        with ad.set_top_k(model, 2):
            same = model(_x()).logits
    assert torch.equal(full, same)
    with pytest.raises(MoesiftError, match="2 experts"):
        with ad.set_top_k(model, 1):
            pass
    with pytest.raises(MoesiftError):
        with ad.reroute(model, lambda m, p: None):
            pass


def test_hunyuan_per_layer_lists():
    ad = adapter_for({"model_type": "hunyuan_v1_moe"})
    cfg = {"model_type": "hunyuan_v1_moe", "num_hidden_layers": 3, "num_experts": [8, 8, 8], "moe_topk": [2, 2, 2]}
    spec = ad.spec(cfg)
    assert (spec.moe_layers, spec.n_experts, spec.top_k, spec.n_shared) == ((0, 1, 2), 8, 2, 1)
    out = ad.rewrite_config(cfg, {0: [1, 2, 5, 7], 1: [0, 1, 2, 3], 2: [4, 5, 6, 7]})
    assert out["num_experts"] == [4, 4, 4] and cfg["num_experts"] == [8, 8, 8]
    with pytest.raises(MoesiftError, match="differs between layers"):
        ad.spec({**cfg, "num_experts": [8, 16, 8]})


@pytest.mark.parametrize(
    ("model_type", "name", "kind", "layer", "expert"),
    [
        # quantized companions of per-expert tensors follow their expert
        ("mixtral", "model.layers.3.block_sparse_moe.experts.5.w2.weight_scale_inv", "expert", 3, 5),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.5.w1.qweight", "expert", 3, 5),
        # checkpoints written in the transformers 5 in-memory layout
        ("mixtral", "model.layers.0.mlp.experts.gate_up_proj", "expert", 0, None),
        ("mixtral", "model.layers.0.mlp.gate.weight", "router", 0, None),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight", "shared", 2, None),
        ("qwen3_next", "model.layers.1.mlp.shared_expert.up_proj.weight", "shared", 1, None),
        ("qwen3_next", "model.layers.1.linear_attn.in_proj_qkvz.weight", "other", None, None),
        ("hunyuan_v1_moe", "model.layers.1.mlp.experts.7.gate_and_up_proj.weight", "expert", 1, 7),
        ("hunyuan_v1_moe", "model.layers.1.mlp.shared_mlp.down_proj.weight", "shared", 1, None),
        ("jamba", "model.layers.0.feed_forward.gate_proj.weight", "other", None, None),
        ("granitemoehybrid", "model.layers.2.shared_mlp.input_linear.weight", "shared", 2, None),
        ("granitemoe", "model.layers.2.block_sparse_moe.router.layer.weight", "router", 2, None),
    ],
)
def test_classify_names(model_type, name, kind, layer, expert):
    role = adapter_for({"model_type": model_type}).classify(name, {"model_type": model_type})
    assert (role.kind, role.layer, role.expert) == (kind, layer, expert)
