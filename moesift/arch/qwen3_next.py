"""Qwen3-Next: hybrid linear / full attention decoder whose MoE block is Qwen2-MoE's (softmax top-k router
`mlp.gate`, one sigmoid-gated shared expert, dense layers from `mlp_only_layers` / `decoder_sparse_step`)."""

from __future__ import annotations

from .qwen2_moe import Qwen2Moe
from .registry import register
from .spec import MlxRouter


@register
class Qwen3Next(Qwen2Moe):
    model_types = ("qwen3_next",)
    dense_layers_unsupported = ()
    mlx_router = MlxRouter("mlp", renorm="config")  # mlx-lm's qwen3_next block reads norm_topk_prob
