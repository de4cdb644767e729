"""Qwen2-MoE: softmax top-k router `mlp.gate` (renormalised when `norm_topk_prob`), per-expert checkpoint
tensors, one shared expert with a sigmoid gate (`shared_expert`, `shared_expert_gate`), dense layers from
`mlp_only_layers` / `decoder_sparse_step`."""

from __future__ import annotations

from .qwen3_moe import L, Qwen3Moe
from .registry import register
from .spec import MlxRouter, Patterns, cfg_get

QWEN2_PATTERNS = Patterns(
    router=(rf"{L}\.gate\.weight",),
    expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.[\w.]+",),
    fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    shared=(rf"{L}\.shared_expert(_gate)?\.[\w.]+",),
)


@register
class Qwen2Moe(Qwen3Moe):
    model_types = ("qwen2_moe",)
    patterns = QWEN2_PATTERNS
    dense_layers_unsupported = ("mlx",)  # mlx-lm's qwen2_moe builds a MoE block in every layer
    tied_output_unsupported = ("mlx", "llama.cpp")  # llama.cpp: untested (no llama.cpp build in CI)
    mlx_router = MlxRouter("mlp", renorm="never")  # mlx-lm 0.32's qwen2_moe block ignores norm_topk_prob

    def n_shared(self, config):
        return 1 if int(cfg_get(config, "shared_expert_intermediate_size", default=0) or 0) > 0 else 0

