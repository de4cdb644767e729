"""Restrict routing of a loaded model to a plan's resident experts (the restriction semantics: a non-resident expert can never be selected)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import loaded_config_dict
from ..formats.plan import resident_for


@contextlib.contextmanager
def restrict(model: Any, plan: Any, force_plan: bool = False) -> Iterator[Any]:
    """Within the block, every MoE layer named by `plan` routes as if experts outside its resident set did
    not exist (non-resident router logits -inf before the softmax; selection biases masked with them).
    `plan`: a Plan, a plan file (moesift-plan/1 or resident-manifest/1), or {decoder layer: ids}.
    A plan made for another config of the family is refused unless `force_plan`.
    Leaving the block restores the model exactly."""
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    name = str(getattr(model, "name_or_path", "") or "") or None
    resident = resident_for(plan, spec, config=loaded_config_dict(model), model_name=name, force_plan=force_plan)
    problems = ad.plan_problems(spec, resident, standard=False)
    if problems:
        raise MoesiftError("cannot restrict to this plan: " + "; ".join(problems[:4]))
    with ad.restrict(model, resident):
        yield model


def resident_of(plan: Any, config: Any) -> dict[int, list[int]]:
    """{decoder layer: ids} of `plan` for a model with this config."""
    return resident_for(plan, adapter_for(config).spec(config))

