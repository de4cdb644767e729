"""What selection knows about a model and the units it keeps: the model's MoE shape (from the checkpoint
config when given, else the traces), and the selection units of a layer (experts; for group-limited
routers whole groups, or rounds of one expert from every group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch.registry import adapter_for
from ..arch.spec import MoESpec, equal_group_floor
from ..core.errors import MoesiftError

GROUP_MODES = ("auto", "whole", "equal")


@dataclass
class SelectionSpec:
    """What selection needs to know about the model (from the checkpoint config when given, else the trace)."""

    model_type: str | None
    moe_layers: list[int | None]  # decoder ids (None when unknown)
    n_experts: int
    top_k: int
    n_group: int | None
    topk_group: int | None
    hash_pos: set[int]  # MoE positions kept whole
    adapter_spec: Any = None  # MoESpec when known
    # group-limited routers: "whole" keeps whole groups, "equal" the same number of experts in every group
    group_mode: str = "whole"
    group_score_top: int = 2  # a kept group needs at least this many resident experts (its score's terms)

    @property
    def grouped(self) -> bool:
        return bool(self.n_group and self.n_group > 1)

    def equal_floor(self) -> int:
        """Fewest experts per group when every group keeps the same number."""
        return equal_group_floor(self.n_experts, int(self.n_group), self.topk_group, self.top_k,
                                 self.group_score_top)


def spec_from(bank: Any, index: Any) -> SelectionSpec:
    """The selection spec of a bank's model, checked against the checkpoint `index` when given."""
    m = bank.model
    L = bank.traces[0].n_layers
    E = int(m["n_experts"])
    if index is not None:
        spec = index.spec
        if spec.n_experts != E or int(m["top_k"]) != spec.top_k or len(spec.moe_layers) != L:
            raise MoesiftError(
                f"the traces are of a model with {L} MoE layers x {E} experts (top-k {m['top_k']}), but "
                f"{str(index.directory)!r} has {len(spec.moe_layers)} x {spec.n_experts} (top-k {spec.top_k}); "
                "use the model the traces were recorded on"
            )
        if m.get("moe_layers") is not None and list(m["moe_layers"]) != list(spec.moe_layers):
            raise MoesiftError(
                f"the traces cover MoE layers {list(m['moe_layers'])}; {str(index.directory)!r} has "
                f"{list(spec.moe_layers)}"
            )
        if m.get("model_type") and m["model_type"] != spec.model_type:
            raise MoesiftError(
                f"the traces are of a {m['model_type']} model; {str(index.directory)!r} is {spec.model_type}"
            )
        hash_pos = {spec.moe_layers.index(h) for h in spec.hash_layers if h in spec.moe_layers}
        return SelectionSpec(spec.model_type, list(spec.moe_layers), E, spec.top_k, spec.n_group,
                             spec.topk_group, hash_pos, spec, group_score_top=_group_score_top(spec.model_type))
    moe = m.get("moe_layers")
    layers = [int(x) for x in moe] if moe is not None and len(moe) == L else [None] * L
    hash_pos = {int(h) for h in (m.get("hash_layers") or [])}
    spec = None
    mt = m.get("model_type")
    if mt and layers[0] is not None:
        hash_dec = tuple(layers[h] for h in sorted(hash_pos) if h < L)
        spec = MoESpec(mt, tuple(layers), E, int(m["top_k"]), int(m.get("n_shared") or 0),
                       m.get("scoring", "softmax"), m.get("n_group"), m.get("topk_group"), hash_dec)
    return SelectionSpec(mt, layers, E, int(m["top_k"]), m.get("n_group"), m.get("topk_group"), hash_pos, spec,
                         group_score_top=_group_score_top(mt))


def _group_score_top(model_type: str | None) -> int:
    try:
        return int(adapter_for({"model_type": model_type}).group_score_top) if model_type else 2
    except MoesiftError:
        return 2


def selection_units(sp: SelectionSpec, pos: int, scores_row: np.ndarray) -> list[list[int]]:
    """Selection units of one MoE layer, best first: experts; for group-limited routers whole groups
    (``group_mode="whole"``), or rounds of one expert from every group (``"equal"``: the i-th unit holds
    each group's i-th best expert, so any number of units keeps the same count in every group). Either
    way the plan is a standard checkpoint, and no group is left with too few experts to be selected."""
    if sp.grouped:
        per = sp.n_experts // sp.n_group
        groups = [list(range(g * per, (g + 1) * per)) for g in range(sp.n_group)]
        if sp.group_mode == "equal":
            ranked = [sorted(g, key=lambda e: (-float(scores_row[e]), e)) for g in groups]
            return [[r[i] for r in ranked] for i in range(per)]
        gscore = [float(scores_row[g].sum()) for g in groups]
        order = sorted(range(sp.n_group), key=lambda g: (-gscore[g], g))
        return [groups[g] for g in order]
    order = sorted(range(sp.n_experts), key=lambda e: (-float(scores_row[e]), e))
    return [[e] for e in order]


def min_units(sp: SelectionSpec, pos: int, units: list[list[int]]) -> int:
    """Fewest units a layer may keep: all for hash-routed layers, else enough for top-k (and top-k groups)."""
    if pos in sp.hash_pos:
        return len(units)
    if sp.grouped and sp.group_mode == "equal":
        return min(sp.equal_floor(), len(units))
    n, got = 0, 0
    while got < sp.top_k and n < len(units):
        got += len(units[n])
        n += 1
    if sp.n_group and sp.n_group > 1 and sp.topk_group:
        n = max(n, min(int(sp.topk_group), len(units)))
    return n


def units_for_count(units: list[list[int]], n_experts: int) -> int:
    """How many leading units hold at least `n_experts` experts (all of them when they hold fewer)."""
    got, n = 0, 0
    while got < n_experts and n < len(units):
        got += len(units[n])
        n += 1
    return n


def flatten_units(units: list[list[int]], n: int) -> list[int]:
    """The sorted expert ids of the first `n` units."""
    return sorted(e for u in units[:n] for e in u)
