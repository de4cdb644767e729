"""Hunyuan-MoE-V1 (Hunyuan-A13B): router `mlp.gate.wg` (fp32 linear), softmax top-k renormalised; a shared
MLP `mlp.shared_mlp` in every MoE layer; every decoder layer is a MoE layer. `num_experts` / `moe_topk` may be
per-layer lists in the config."""

from __future__ import annotations

from ..core.errors import MoesiftError
from .registry import register
from .spec import MoESpec, Patterns, cfg_get
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.mlp"


def _one(value, key: str) -> int:
    """A per-layer list with one distinct value, or an int."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise MoesiftError(f"config {key} differs between layers ({sorted(set(value))}); not supported")
        return int(value[0])
    return int(value)


@register
class HunyuanV1Moe(StandardAdapter):
    model_types = ("hunyuan_v1_moe",)
    n_experts_keys = ("num_experts", "num_local_experts")
    top_k_keys = ("moe_topk", "num_experts_per_tok")
    patterns = Patterns(
        router=(rf"{L}\.gate\.wg\.weight",),
        expert=(rf"{L}\.experts\.(?P<expert>\d+)\.[\w.]+",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
        shared=(rf"{L}\.shared_mlp\.[\w.]+",),
    )

    def spec(self, config):
        return MoESpec(
            model_type="hunyuan_v1_moe",
            moe_layers=tuple(range(self.n_layers(config))),
            n_experts=_one(cfg_get(config, *self.n_experts_keys), "num_experts"),
            top_k=_one(cfg_get(config, *self.top_k_keys), "moe_topk"),
            n_shared=self.n_shared(config),
        )

    def n_shared(self, config):
        return 1

    def rewrite_config(self, config, resident):
        out = dict(config)
        n = max(len(v) for v in resident.values())
        cur = out.get("num_experts")
        out["num_experts"] = [n] * len(cur) if isinstance(cur, (list, tuple)) else n
        return out

