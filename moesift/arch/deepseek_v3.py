"""DeepSeek-V3 and Kimi-K2 style configs: sigmoid router `mlp.gate` with a selection bias
`e_score_correction_bias` (masked with -inf by restrict, sliced with the experts by trim), group-limited top-k
(group score = sum of its best two biased scores), weights renormalised (`norm_topk_prob`) and scaled by
`routed_scaling_factor`, shared experts, dense first layers (`first_k_dense_replace`).

Kimi-K2 checkpoints say `model_type: kimi_k2` but use this architecture with one group (n_group = topk_group
= 1); transformers builds such configs as `deepseek_v3`. Multi-token-prediction layers stored after the last
decoder layer (`num_nextn_predict_layers`) are not run by transformers: their tensors are classified "other"
and copied unchanged by trim.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from ..core.values import int_or_none
from .deepseek_v2 import DeepseekV2
from .registry import register
from .spec import MlxRouter, TensorRole, cfg_get


def mlx_select(gate: Any, logits: Any, mask: Any) -> tuple[Any, Any]:
    """The selection of mlx-lm's sigmoid gates (DeepSeek-V3, GLM-4.5, dots1: the `group_expert_select` of the
    gate's own mlx-lm module, called as the gate calls it) on the router logits plus `mask`, with the selection
    bias plus `mask`: the masking of the transformers restriction (a group's score, the sum of its best two
    biased scores, is then taken over resident experts only)."""
    select = sys.modules[type(gate).__module__].group_expert_select
    m = mask.astype(logits.dtype)
    return select(logits + m, gate.e_score_correction_bias + m, gate.top_k, gate.n_group, gate.topk_group,
                  gate.routed_scaling_factor, gate.norm_topk_prob)


@register
class DeepseekV3(DeepseekV2):
    model_types = ("deepseek_v3", "kimi_k2")
    scoring = "sigmoid"
    bias_attrs = ("e_score_correction_bias",)
    normalise_selection = True
    group_score_top = 2
    mlx_router = MlxRouter("mlp", select=mlx_select, top_k_at="gate")
    # what hub DeepSeek-V3 / Kimi-K2 configs say about this router; vLLM creates the selection bias only for
    # noaux_tc and SGLang reads topk_method directly, so a checkpoint without them misloads there
    hub_defaults = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}

    def groups(self, config):
        return int_or_none(cfg_get(config, "n_group", default=1)), int_or_none(cfg_get(config, "topk_group", default=1))

    mtp_keys = ("num_nextn_predict_layers", "num_mtp_layers")

    def classify(self, name, config):
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.n_layers(config):
            return TensorRole("mtp", layer=int(m.group(1)))  # multi-token-prediction layer
        return super().classify(name, config)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")

