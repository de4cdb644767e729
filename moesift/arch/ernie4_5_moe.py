"""ERNIE-4.5-MoE: softmax router `mlp.gate`; a selection bias `moe_statics.e_score_correction_bias [1, E]` is
added to the probabilities for choosing only; the chosen probabilities are renormalised. Restricting masks
the router logits (so the softmax normaliser is that of the resident experts) and the bias. MoE layers are
every `moe_layer_interval`-th from `moe_layer_start_index` to `moe_layer_end_index`; shared experts."""

from __future__ import annotations

from .registry import register
from .spec import Patterns, cfg_get
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.mlp"


@register
class Ernie45Moe(StandardAdapter):
    model_types = ("ernie4_5_moe",)
    n_experts_keys = ("moe_num_experts", "num_experts")
    top_k_keys = ("moe_k", "num_experts_per_tok")
    n_shared_keys = ("moe_num_shared_experts",)
    bias_attrs = ("moe_statics.e_score_correction_bias",)
    patterns = Patterns(
        router=(rf"{L}\.gate\.weight",),
        router_bias=(rf"{L}\.(gate\.)?moe_statics\.e_score_correction_bias",),
        expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.[\w.]+",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
        shared=(rf"{L}\.shared_experts\.[\w.]+",),
    )

    def is_moe_layer(self, config, i):
        if int(cfg_get(config, *self.n_experts_keys, default=0) or 0) <= 0:
            return False
        start = int(cfg_get(config, "moe_layer_start_index", default=1))
        end = int(cfg_get(config, "moe_layer_end_index", default=-1))
        end = self.n_layers(config) - 1 if end == -1 else end
        step = int(cfg_get(config, "moe_layer_interval", default=1) or 1)
        return (i + 1) % step == 0 and start <= i <= end
