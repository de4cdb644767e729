"""Granite-MoE (3.0 / 3.1), Granite-MoE-Shared, Granite-4 hybrid (mamba + attention) and
Granite-MoE-SWA (sliding-window attention): router
`block_sparse_moe.router` (top-k of the logits, softmax over the k, which equals renormalised softmax top-k),
every decoder layer is a MoE layer. On disk: router `block_sparse_moe.router.layer.weight`, fused experts
`block_sparse_moe.input_linear.weight [E, 2I, H]` / `output_linear.weight [E, H, I]`; shared variants add a
dense `shared_mlp` per layer."""

from __future__ import annotations

from .registry import register
from .spec import MLX_QUANT_PARTS, MlxRouter, Patterns, cfg_get
from .standard import StandardAdapter

P = r"model\.layers\.(?P<layer>\d+)"
L = rf"{P}\.block_sparse_moe"


@register
class GraniteMoe(StandardAdapter):
    model_types = ("granitemoe",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    n_experts_keys = ("num_local_experts", "num_experts")
    patterns = Patterns(
        router=(rf"{L}\.router\.(layer\.)?weight",),
        fused=(
            (rf"{L}\.(input_linear|output_linear)\.[\w.]+", 0),
            (rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),
        ),
        shared=(rf"{P}\.shared_mlp\.[\w.]+",),
    )

    # mlx-lm: the router module `block_sparse_moe.router` selects (top-k of the logits of its Linear `layer`,
    # softmax over the k: renormalised softmax top-k); the experts are stacked as `switch_mlp`
    mlx_patterns = Patterns(router=(rf"{L}\.router\.layer\.{MLX_QUANT_PARTS}",),
                            fused=((rf"{L}\.switch_mlp\.(gate|up|down)_proj\.{MLX_QUANT_PARTS}", 0),))
    mlx_router = MlxRouter("block_sparse_moe", renorm="always", gate="router.layer", top_k_at="router")

    def is_moe_layer(self, config, i):
        return int(cfg_get(config, *self.n_experts_keys, default=0) or 0) > 0

    def n_shared(self, config):
        return 1 if int(cfg_get(config, "shared_intermediate_size", default=0) or 0) > 0 else 0


@register
class GraniteMoeVariants(GraniteMoe):
    """The shared-MLP, hybrid and sliding-window variants: the same MoE block; not run natively in mlx-lm
    (mlx-lm 0.32 has no granitemoeshared / granitemoe_swa, and moesift does not test its granitemoehybrid)."""

    model_types = ("granitemoeshared", "granitemoehybrid", "granitemoe_swa")
    mlx_router = None
