"""Tiny random configs: Qwen2-MoE, Qwen3-Next, OLMoE, Mixtral, MiniMax, Phi-MoE, Jamba, Hunyuan-MoE-V1,
Granite-MoE (plain, shared, hybrid, sliding-window). Same scale as the Qwen3-MoE one in tiny.py: hidden 32, 8 experts, top-2,
a dense layer where the family has them."""

from __future__ import annotations

from tiny import COMMON, tiny

MOE = dict(num_experts=8, num_experts_per_tok=2)
LOCAL = dict(num_local_experts=8, num_experts_per_tok=2)


@tiny("qwen2_moe")
def _qwen2_moe():
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **COMMON, **MOE, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False,
    )


@tiny("qwen3_next")
def _qwen3_next():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **COMMON, **MOE, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=4, mlp_only_layers=[2], norm_topk_prob=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4,
    )


@tiny("olmoe")
def _olmoe():
    from transformers import OlmoeConfig

    return OlmoeConfig(**COMMON, **MOE, intermediate_size=16, num_hidden_layers=3, norm_topk_prob=False)


@tiny("mixtral")
def _mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(**COMMON, **LOCAL, head_dim=8, intermediate_size=16, num_hidden_layers=3)


@tiny("minimax")
def _minimax():
    from transformers import MiniMaxConfig

    return MiniMaxConfig(
        **COMMON, **LOCAL, head_dim=8, intermediate_size=16, num_hidden_layers=3, block_size=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    )


@tiny("phimoe")
def _phimoe():
    from transformers import PhimoeConfig

    return PhimoeConfig(**COMMON, **LOCAL, intermediate_size=16, num_hidden_layers=3)


@tiny("jamba")
def _jamba():
    """Attention at layer 2, mamba elsewhere; experts on odd layers (1, 3), dense MLP on 0 and 2."""
    from transformers import JambaConfig

    return JambaConfig(
        **COMMON, **MOE, intermediate_size=16, num_hidden_layers=4, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=4, attn_layer_offset=2, use_mamba_kernels=False, mamba_d_state=4, mamba_d_conv=2,
        mamba_expand=2, mamba_dt_rank=4,
    )


@tiny("hunyuan_v1_moe")
def _hunyuan_v1_moe():
    from transformers import HunYuanMoEV1Config

    return HunYuanMoEV1Config(
        **COMMON, head_dim=8, intermediate_size=16, num_hidden_layers=3, num_experts=8, moe_topk=2,
    )


GRANITE = dict(**COMMON, **LOCAL, intermediate_size=16, num_hidden_layers=3, embedding_multiplier=2.0,
               residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0)


@tiny("granitemoe")
def _granitemoe():
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(**GRANITE)


@tiny("granitemoeshared")
def _granitemoeshared():
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(**GRANITE, shared_intermediate_size=24)


@tiny("granitemoehybrid")
def _granitemoehybrid():
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        **GRANITE, shared_intermediate_size=24, layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_d_head=16, mamba_d_conv=2, mamba_chunk_size=8,
    )


@tiny("granitemoe_swa")
def _granitemoe_swa():
    from transformers import GraniteMoeSWAConfig

    return GraniteMoeSWAConfig(
        **GRANITE, shared_intermediate_size=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
