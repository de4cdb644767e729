"""Tiny random configs: DeepSeek-V2/V3 (and Kimi-K2 style), GLM-4-MoE, dots1, ERNIE-4.5-MoE, gpt-oss,
Llama-4 text, DBRX. Same scale as the Qwen3-MoE one in tiny.py: hidden 32, 8 experts, top-2."""

from __future__ import annotations

from tiny import AFTER_BUILD, COMMON, tiny

MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
# DeepSeek-V2 hub checkpoints use YaRN rope (with the attention-scale correction mscale_all_dim)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
MOE = dict(intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2)


@tiny("deepseek_v2")
def _deepseek_v2():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **{**COMMON, **MLA}, **MOE, num_hidden_layers=4, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, rope_parameters=YARN,
    )


@tiny("deepseek_v3")
def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **{**COMMON, **MLA}, **MOE, num_hidden_layers=4, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        num_mtp_layers=0,
    )


@tiny("kimi_k2")
def _kimi_k2():
    """Kimi-K2 style routing (one group, sigmoid + bias, 2.827 scaling) on the DeepSeek-V3 architecture;
    transformers has no `kimi_k2` model class, so the model itself is a DeepSeek-V3 one."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **{**COMMON, **MLA}, **MOE, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.827,
        num_mtp_layers=0,
    )


@tiny("glm4_moe")
def _glm4_moe():
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **COMMON, **MOE, head_dim=8, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
    )


@tiny("dots1")
def _dots1():
    from transformers import Dots1Config

    return Dots1Config(
        **COMMON, **MOE, head_dim=8, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0,
    )


@tiny("ernie4_5_moe")
def _ernie4_5_moe():
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(
        **COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
    )


@tiny("gpt_oss")
def _gpt_oss():
    from transformers import GptOssConfig

    return GptOssConfig(
        **COMMON, head_dim=8, intermediate_size=16, num_hidden_layers=3, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    )


@tiny("llama4_text")
def _llama4_text():
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        **COMMON, head_dim=8, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
        num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2, attention_chunk_size=8,
    )


@tiny("dbrx")
def _dbrx():
    from transformers import DbrxConfig

    return DbrxConfig(
        vocab_size=COMMON["vocab_size"], d_model=32, n_heads=4, n_layers=3, max_seq_len=128,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2, "moe_normalize_expert_weights": 1.0},
    )


def _selection_bias(std: float):
    """Random selection biases (buffers or frozen parameters), so that tests see them change routing."""

    def fix(model):
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                t.normal_(0.0, std)

    return fix


for _mt in ("deepseek_v3", "kimi_k2", "glm4_moe", "dots1"):
    AFTER_BUILD[_mt] = _selection_bias(0.3)
AFTER_BUILD["ernie4_5_moe"] = _selection_bias(0.05)  # added to softmax probabilities of ~1/8
