"""The plans of a sweep: one per strategy and budget, a strategy the inputs cannot support skipped with why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.errors import MoesiftError


def plan_grid(strategies: list[str], keeps: list[float], build: Callable[[str, float], Any],
              skippable: Callable[[str, MoesiftError], bool],
              refused: Callable[[str], str | None] = lambda s: None,
              ) -> tuple[list[tuple[str, float, Any]], list[dict[str, str]]]:
    """(strategy, keep, plan) of every point built by `build(strategy, keep)`, and the skipped strategies with
    their reason: `refused(strategy)` names a reason before any plan is built; an error of `build` for which
    `skippable(strategy, error)` holds skips the strategy (other errors stop the sweep). No plan at all is an
    error."""
    plans: list[tuple[str, float, Any]] = []
    skipped: list[dict[str, str]] = []
    for s in strategies:
        why = refused(s)
        if why is not None:
            skipped.append({"strategy": s, "reason": why})
            continue
        for k in keeps:
            try:
                plans.append((s, k, build(s, k)))
            except MoesiftError as e:
                if not skippable(s, e):
                    raise
                skipped.append({"strategy": s, "reason": str(e)})
                break
    if not plans:
        raise MoesiftError("no plan could be built: " + "; ".join(x["reason"] for x in skipped))
    return plans, skipped
