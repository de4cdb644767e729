"""dots.llm1 (`dots1`): the DeepSeek-V3 router (sigmoid + `e_score_correction_bias`, group-limited top-k,
`norm_topk_prob`, `routed_scaling_factor`), per-expert tensors, shared experts, dense first layers."""

from __future__ import annotations

from .deepseek_v3 import DeepseekV3
from .registry import register


@register
class Dots1(DeepseekV3):
    model_types = ("dots1",)
    tied_output_unsupported = ()  # mlx-lm's dots1 ties the output when the config says so
