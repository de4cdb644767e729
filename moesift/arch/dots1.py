"""dots.llm1 (`dots1`): the DeepSeek-V3 router (sigmoid + `e_score_correction_bias`, group-limited top-k,
`norm_topk_prob`, `routed_scaling_factor`), per-expert tensors, shared experts, dense first layers. In mlx-lm its stacked experts are `mlp.experts`."""

from __future__ import annotations

from .deepseek_v2 import L
from .deepseek_v3 import DeepseekV3, mlx_select
from .registry import register
from .spec import MLX_QUANT_PARTS, MlxRouter, Patterns


@register
class Dots1(DeepseekV3):
    model_types = ("dots1",)
    tied_output_unsupported = ()  # mlx-lm's dots1 ties the output when the config says so
    # mlx-lm names dots1's stacked experts `mlp.experts` (not `switch_mlp`)
    mlx_patterns = Patterns(router=(rf"{L}\.gate\.{MLX_QUANT_PARTS}",),
                            fused=((rf"{L}\.experts\.(gate|up|down)_proj\.{MLX_QUANT_PARTS}", 0),))
    mlx_router = MlxRouter("mlp", select=mlx_select, top_k_at="gate")
