"""DBRX: decoder blocks `transformer.blocks.{i}.ffn`; the router `ffn.router.layer` returns logits only, the
block takes softmax top-k (`ffn_config.moe_top_k`, held by the block) and divides by the p-norm
(`moe_normalize_expert_weights`). Experts are fused 2-D tensors `ffn.experts.mlp.{w1,v1,w2}` of shape
[E * ffn_hidden_size, H] (TensorRole.expert_block). Expert count and top-k sit in the nested `ffn_config`."""

from __future__ import annotations

import contextlib
import dataclasses

from ..core.errors import MoesiftError
from .registry import register
from .spec import MoESpec, Patterns, cfg_get
from .standard import StandardAdapter

L = r"transformer\.blocks\.(?P<layer>\d+)\.ffn"


@register
class Dbrx(StandardAdapter):
    model_types = ("dbrx",)
    layers_path = "transformer.blocks"
    embed_name = "transformer.wte.weight"
    block_attr = "ffn"
    router_attr = "router"
    patterns = Patterns(
        router=(rf"{L}\.router\.layer\.weight",),
        fused=((rf"{L}\.experts\.mlp\.(w1|v1|w2)[\w.]*", 0),),
    )

    @staticmethod
    def _ffn(config):
        return cfg_get(config, "ffn_config", default={})

    def spec(self, config):
        ffn = self._ffn(config)
        return MoESpec(
            model_type="dbrx",
            moe_layers=tuple(range(self.n_layers(config))),
            n_experts=int(cfg_get(ffn, "moe_num_experts")),
            top_k=int(cfg_get(ffn, "moe_top_k", default=1)),
        )

    def rewrite_config(self, config, resident):
        out = dict(config)
        out["ffn_config"] = dict(self._ffn(config), moe_num_experts=max(len(v) for v in resident.values()))
        return out

    def classify(self, name, config):
        role = super().classify(name, config)
        if role.kind == "expert":
            return dataclasses.replace(role, expert_block=int(cfg_get(self._ffn(config), "ffn_hidden_size")))
        return role

    def expert_output(self, model, layer, hidden, ids):
        return super().expert_output(model, layer, hidden, ids).reshape(hidden.shape)

    def expert_params(self, module):
        n, rows = int(module.num_experts), int(module.ffn_hidden_size)
        out = []
        for name, t in module.named_parameters():
            if t.dim() == 0 or t.shape[0] != n * rows:
                raise MoesiftError(f"{type(module).__name__}.{name}: expected {n} x {rows} rows")
            out.append((name, 0, rows))
        return out

    def experts_result(self, hidden, out):
        return out.view(hidden.shape[0], -1, hidden.shape[-1])  # what DbrxExperts returns

    @contextlib.contextmanager
    def set_top_k(self, model, k):
        blocks = [self.moe_block(model, layer) for layer in self.spec(model.config).moe_layers]
        saved = [b.top_k for b in blocks]
        try:
            for b in blocks:
                b.top_k = k
            yield
        finally:
            for b, old in zip(blocks, saved, strict=True):
                b.top_k = old
