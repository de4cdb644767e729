"""Whether a plan or a trace was made for a GGUF model: its model section (as transformers, mlx-lm or
llama.cpp recorded it) against the shape the GGUF headers give."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from .gguf import GGUFIndex

# fields no --force-plan overrides: the expert ids would mean other experts
_FIXED = ("n_experts", "model_type", "moe_layers")


def plan_differences(idx: GGUFIndex, model: Mapping[str, Any]) -> list[str]:
    """`field: plan vs file` for every identity field a plan's model section names that the GGUF model does
    not match: architecture (the plan's model_type against the types llama.cpp converts to this
    architecture), decoder blocks, experts, top-k, embedding length, MoE layers."""
    shape = idx.model_shape()
    diffs = []
    mt = model.get("model_type")
    if mt and mt not in idx.family.model_types:
        diffs.append(f"model_type: {mt} vs {idx.arch} (llama.cpp's name for {'/'.join(idx.family.model_types)})")
    cfg = model.get("config")
    if isinstance(cfg, Mapping) and mt:
        try:
            ms = adapter_for({"model_type": mt}).model_shape(cfg)
        except MoesiftError:
            ms = {}
        for k in ("num_hidden_layers", "hidden_size"):
            if ms.get(k) is not None and shape[k] is not None and int(ms[k]) != int(shape[k]):
                diffs.append(f"{k}: {ms[k]} vs {shape[k]}")
    for k in ("n_experts", "top_k"):
        if model.get(k) is not None and int(model[k]) != shape[k]:
            diffs.append(f"{k}: {model[k]} vs {shape[k]}")
    ml = model.get("moe_layers")
    if ml is not None and model.get("layer_index") != "moe_position" and list(ml) != shape["moe_layers"]:
        diffs.append(f"moe_layers: {list(ml)[:8]} vs {shape['moe_layers'][:8]}")
    return diffs


def gguf_index_for(idx: GGUFIndex, model: Mapping[str, Any], where: str, force_plan: bool = False,
                   what: str = "plan", fix: str = "plan again for this model") -> GGUFIndex:
    """`idx` checked against the model section of a `what` ("plan", "trace"; `where` names it): one error
    line naming the fields that differ (`force_plan` lets the embedding length, block count and top-k
    differ); the index returned carries the model_type the plan names when llama.cpp stores several under
    one architecture."""
    diffs = plan_differences(idx, model)
    if diffs and not (force_plan and not any(d.split(":")[0] in _FIXED for d in diffs)):
        raise MoesiftError(f"{where} was made for another model than {str(idx.directory)!r}: {'; '.join(diffs)} "
                           f"({what} vs file); {fix}")
    mt = model.get("model_type")
    if not mt or mt == idx.spec.model_type:
        return idx
    return dataclasses.replace(idx, spec=dataclasses.replace(idx.spec, model_type=mt))
