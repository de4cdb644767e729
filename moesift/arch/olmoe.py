"""OLMoE: softmax top-k router `mlp.gate` (renormalised when `norm_topk_prob`, off in the released models),
per-expert checkpoint tensors, every decoder layer is a MoE layer, no shared expert."""

from __future__ import annotations

from .qwen3_moe import Qwen3Moe
from .registry import register
from .spec import cfg_get


@register
class Olmoe(Qwen3Moe):
    model_types = ("olmoe",)

    def is_moe_layer(self, config, i):
        return int(cfg_get(config, *self.n_experts_keys, default=0) or 0) > 0
