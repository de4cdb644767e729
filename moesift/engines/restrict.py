"""Restrict routing of a loaded model to a plan's resident experts (the restriction semantics: a non-resident expert can never be selected)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import loaded_config_dict
from ..formats.plan import resident_for
from .mlx_native import is_loaded_mlx_model, loaded_mlx_config, masked_routers


@contextlib.contextmanager
def restrict(model: Any, plan: Any, force_plan: bool = False) -> Iterator[Any]:
    """Within the block, every MoE layer named by `plan` routes as if experts outside its resident set did
    not exist (non-resident router logits -inf before the softmax; selection biases masked with them).
    `model`: a transformers model, or a model built by mlx-lm (`mlx_lm.load`, `mlx_lm.utils.load_model`).
    `plan`: a Plan, a plan file (moesift-plan/1 or resident-manifest/1), or {decoder layer: ids}.
    A plan made for another config of the family is refused unless `force_plan`.
    Leaving the block restores the model exactly."""
    if is_loaded_mlx_model(model):
        with _restrict_mlx(model, plan, force_plan):
            yield model
        return
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    name = str(getattr(model, "name_or_path", "") or "") or None
    resident = resident_for(plan, spec, config=loaded_config_dict(model), model_name=name, force_plan=force_plan)
    problems = ad.plan_problems(spec, resident, standard=False)
    if problems:
        raise MoesiftError("cannot restrict to this plan: " + "; ".join(problems[:4]))
    with ad.restrict(model, resident):
        yield model


@contextlib.contextmanager
def _restrict_mlx(model: Any, plan: Any, force_plan: bool) -> Iterator[None]:
    """`restrict` for an mlx-lm model: the config comes from the model's ModelArgs, the masking is that of
    `moesift verify --engine mlx` (`moesift.engines.mlx_native.masked_routers`)."""
    cfg = loaded_mlx_config(model)
    ad = adapter_for(cfg)
    spec = ad.spec(cfg)
    resident = resident_for(plan, spec, config=cfg, force_plan=force_plan)
    problems = ad.plan_problems(spec, resident, standard=False)
    if problems:
        raise MoesiftError("cannot restrict to this plan: " + "; ".join(problems[:4]))
    with masked_routers(model, ad, spec, resident, f"the mlx-lm {spec.model_type} model"):
        yield


def resident_of(plan: Any, config: Any) -> dict[int, list[int]]:
    """{decoder layer: ids} of `plan` for a model with this config."""
    return resident_for(plan, adapter_for(config).spec(config))
