"""gpt-oss: router `mlp.router` (linear with bias), top-k of the logits, softmax over the k chosen; fused
experts `mlp.experts.gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` with per-expert biases (MXFP4
checkpoints: `*_blocks`, `*_scales`, sliced the same way). Every layer is MoE; no shared experts. In an mlx-lm
folder the experts are stacked as `mlp.experts.{gate,up,down}_proj` (weight, scales, biases and the experts'
own `bias`), the router `mlp.router` may be quantized."""

from __future__ import annotations

from .registry import register
from .spec import MLX_QUANT_PARTS, MlxRouter, Patterns, cfg_get
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.mlp"


@register
class GptOss(StandardAdapter):
    model_types = ("gpt_oss",)
    router_attr = "router"
    n_experts_keys = ("num_local_experts", "num_experts")
    top_k_keys = ("num_experts_per_tok", "experts_per_token")  # the released config.json carries both
    patterns = Patterns(
        router=(rf"{L}\.router\.weight",),
        router_bias=(rf"{L}\.router\.bias",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    )

    mlx_patterns = Patterns(router=(rf"{L}\.router\.{MLX_QUANT_PARTS}",),
                            fused=((rf"{L}\.experts\.(gate|up|down)_proj\.(weight|scales|biases|bias)", 0),))
    # mlx-lm: top-k of the router logits, softmax over the k (the selection and weights of renormalised softmax)
    mlx_router = MlxRouter("mlp", renorm="always", gate="router")

    def mlx_folder_problems(self, config):
        return []  # mlx-lm wrote the experts in its own layout

    def engine_problems(self, engine, config):
        q = cfg_get(config, "quantization_config", default={}) or {}
        if engine == "mlx" and not (isinstance(q, dict) and q.get("quant_method") == "mxfp4"):
            return ["mlx-lm reads gpt-oss experts only in the MXFP4 layout of the released checkpoints "
                    "(quantization_config mxfp4, *_blocks / *_scales tensors); these experts are unquantized"]
        return []
