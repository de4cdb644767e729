"""Phi-3.5-MoE: router `mlp.router` (an nn.Linear) followed by SparseMixer, which at inference picks the best
expert, then the best of the rest, each weighted by a softmax over the logits within a relative threshold of
it. The selection is hard-wired to two experts. On disk: `block_sparse_moe.gate.weight` and per-expert
`block_sparse_moe.experts.{j}.w1/w2/w3`."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from ..core.errors import MoesiftError
from .mixtral import Mixtral
from .registry import register
from .spec import MlxRouter


def mlx_pick(block: Any, logits: Any) -> tuple[Any, Any]:
    """The selection of mlx-lm's Phi-MoE block from its router logits: the `sparsemixer` of the block's own
    mlx-lm module, called as the block calls it."""
    sparsemixer = sys.modules[type(block).__module__].sparsemixer
    return sparsemixer(logits, top_k=block.top_k, jitter_eps=block.jitter_eps)



@register
class Phimoe(Mixtral):
    model_types = ("phimoe",)
    router_attr = "router"
    # mlx-lm: `block_sparse_moe.gate` returns the logits, the block selects with SparseMixer (restricted, as in
    # transformers, by -inf logits: a masked expert is never the best and never inside the band)
    mlx_router = MlxRouter("block_sparse_moe", gate="gate", pick=mlx_pick)

    def set_top_k(self, model, k):
        if k == self.spec(model.config).top_k:
            return contextlib.nullcontext()
        raise MoesiftError("Phi-MoE's SparseMixer router always selects 2 experts; its top-k cannot be changed")

    def reroute(self, model, choose):
        raise MoesiftError("Phi-MoE's SparseMixer weights depend on its own two-step selection; rerouting "
                           "with other selections is not supported")
