"""Qwen3-MoE (and Qwen2-MoE-style per-expert checkpoints): softmax top-k router `mlp.gate`."""

from __future__ import annotations

from typing import ClassVar

from .registry import register
from .spec import MlxRouter, Patterns, cfg_get, mlx_switch_patterns
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.mlp"


@register
class Qwen3Moe(StandardAdapter):
    model_types = ("qwen3_moe",)
    hub_renames = {"num_local_experts": "num_experts"}  # transformers 5 saves num_local_experts
    # engines whose implementation of the family builds every decoder layer as MoE (mlx-lm's qwen3_moe reads
    # mlp_only_layers; llama.cpp's converter cannot map a dense layer's MLP of a qwen3moe model)
    dense_layers_unsupported: ClassVar[tuple[str, ...]] = ("llama.cpp",)
    patterns = Patterns(
        router=(rf"{L}\.gate\.weight",),
        expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.[\w.]+",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    )
    mlx_patterns = mlx_switch_patterns(L)  # shared with Qwen2-MoE and OLMoE (mlx-lm names them alike)
    mlx_router = MlxRouter("mlp", renorm="config")  # OLMoE's mlx-lm block selects alike

    def is_moe_layer(self, config, i):
        only = cfg_get(config, "mlp_only_layers", default=[]) or []
        step = int(cfg_get(config, "decoder_sparse_step", default=1) or 1)
        n = int(cfg_get(config, "num_experts", "num_local_experts", default=0) or 0)
        return i not in only and n > 0 and (i + 1) % step == 0

    def engine_problems(self, engine, config):
        dense = cfg_get(config, "mlp_only_layers", default=[]) or []
        step = int(cfg_get(config, "decoder_sparse_step", default=1) or 1)
        if engine in self.dense_layers_unsupported and (dense or step != 1):
            return [f"{engine} builds every {config.get('model_type')} decoder layer as a MoE layer, and this "
                    f"model has dense layers (mlp_only_layers {list(dense)}, decoder_sparse_step {step})"]
        return []
