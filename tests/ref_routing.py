"""Independent re-implementations of each family's routing, for checking moesift's recorder and tracer.

REFERENCE[model_type](block, hidden) -> (ids [T, K] LongTensor, weights [T, K]) computes the routing of
MoE block `block` on its flat input `hidden` [T, H] from the router's parameters and the config, written
from the family's published routing rule, without calling the model's router module. Families register
in tests/ref_routing_1.py and tests/ref_routing_2.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REFERENCE: dict[str, Callable[[Any, Any], tuple[Any, Any]]] = {}


def reference(*model_types: str):
    def deco(fn):
        for mt in model_types:
            REFERENCE[mt] = fn
        return fn

    return deco


@reference("qwen3_moe")
def _softmax_topk(block, hidden):
    import torch

    w = block.gate.weight
    probs = torch.softmax(hidden.float() @ w.float().T, dim=-1)
    vals, ids = probs.topk(block.gate.top_k, dim=-1)
    if block.gate.norm_topk_prob:
        vals = vals / vals.sum(-1, keepdim=True)
    return ids, vals


def _load_families() -> None:
    import importlib

    for mod in ("ref_routing_1", "ref_routing_2"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_load_families()
