"""Jamba: mamba / attention hybrid; MoE feed-forward every `expert_layer_period` layers from
`expert_layer_offset` (the others are dense MLPs). Router `feed_forward.router`: softmax top-k, selected
probabilities used as they are (not renormalised). Per-expert checkpoint tensors."""

from __future__ import annotations

from .registry import register
from .spec import Patterns, cfg_get
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.feed_forward"


@register
class Jamba(StandardAdapter):
    model_types = ("jamba",)
    block_attr = "feed_forward"
    router_attr = "router"
    n_experts_keys = ("num_experts", "num_local_experts")
    normalise_selection = False
    patterns = Patterns(
        router=(rf"{L}\.router\.weight",),
        expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.[\w.]+",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    )

    def is_moe_layer(self, config, i):
        n = int(cfg_get(config, *self.n_experts_keys, default=0) or 0)
        period = int(cfg_get(config, "expert_layer_period", default=2))
        offset = int(cfg_get(config, "expert_layer_offset", default=1))
        return n > 1 and i % period == offset
