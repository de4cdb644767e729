"""Mixtral and MiniMax(-Text-01): softmax top-k router, selection always renormalised; every decoder layer is
a MoE layer. In memory the block is `mlp` (`gate` + fused `experts`); on disk the original layout
`block_sparse_moe.gate.weight` and per-expert `block_sparse_moe.experts.{j}.w1/w2/w3`."""

from __future__ import annotations

from .registry import register
from .spec import MlxRouter, Patterns, mlx_switch_patterns
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.(block_sparse_moe|mlp)"


@register
class Mixtral(StandardAdapter):
    model_types = ("mixtral",)
    n_experts_keys = ("num_local_experts", "num_experts")
    patterns = Patterns(
        router=(rf"{L}\.gate\.weight",),
        expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.[\w.]+",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    )
    mlx_patterns = mlx_switch_patterns(L)  # mlx-lm: block_sparse_moe.gate, block_sparse_moe.switch_mlp
    # mlx-lm: top-k of the logits, softmax over the k (the same selection and weights as renormalised softmax)
    mlx_router = MlxRouter("block_sparse_moe", renorm="always")


@register
class MiniMax(Mixtral):
    """Lightning (linear) and softmax attention layers alternate; the MoE block is Mixtral's."""

    model_types = ("minimax",)
    mlx_router = None  # not recorded in mlx-lm (untested there)
