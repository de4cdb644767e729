"""GLM-4.5 / GLM-4.6 MoE (`glm4_moe`): the DeepSeek-V3 router (sigmoid + `e_score_correction_bias`,
group-limited top-k, `norm_topk_prob`, `routed_scaling_factor`), per-expert tensors, shared experts, dense
first layers; multi-token-prediction layers after the last decoder layer are classified "other"."""

from __future__ import annotations

from .deepseek_v3 import DeepseekV3
from .registry import register


@register
class Glm4Moe(DeepseekV3):
    model_types = ("glm4_moe",)
