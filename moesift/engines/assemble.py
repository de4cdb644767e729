"""Checkpoint tensors in the layout of the model that will hold them, as byte ranges to read.

transformers loads a checkpoint through its conversion rules: on-disk names are renamed, and per-expert
tensors are stacked (and gate / up concatenated) into the fused parameters of the experts module. Done on
tensors, that stacking copies every expert byte once more after reading it. `model_sources` performs the
same rules on the byte ranges instead, before anything is read: every model parameter becomes one tensor
spec whose pieces are the source pieces in the order the stacking would put them, so the reader lands each
byte at its final place and transformers' loader receives tensors under their final names, which it only
assigns (and casts, when the dtype differs, exactly as it casts them otherwise).

Only the operations transformers uses for MoE experts are performed here (renaming; stacking the list of a
pattern along a new first dimension; concatenating the stacked patterns along dimension 0 or 1). When a
checkpoint needs any other rule, or any result disagrees with the model's own parameter shapes,
`model_sources` returns None and the caller hands the checkpoint's own tensors to transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

Ready = Mapping[str, Any]  # tensors already in memory (sliced by an adapter), by source name
# (name, safetensors dtype, shape, [(file, absolute offset, bytes)]): `moesift.engines.tensors.TensorSpec`
TensorSpec = tuple[str, str, list[int], list[tuple[str, int, int]]]


def meta_model(cls: Any, config: Any) -> Any:
    """`cls(config)` with every parameter and buffer on the meta device: nothing allocated or initialised."""
    import torch

    with torch.device("meta"):
        return cls(copy.deepcopy(config))


def _rules(model: Any) -> tuple[list, list, dict, str, dict]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    rules = get_model_conversion_mapping(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return renamings, converters, by_pattern, model.base_model_prefix, shapes


def _target(name: str, renamings: list, converters: list, prefix: str, shapes: dict) -> tuple[str, str | None]:
    """(model name, converter source pattern or None) of checkpoint name `name`, as transformers decides it."""
    from transformers.core_model_loading import rename_source_key

    new, pattern = rename_source_key(name, renamings, converters, prefix, shapes)
    if new not in shapes and name in shapes:
        new, pattern = rename_source_key(name, [], [], prefix, shapes)
    return new, pattern


def _supported(converter: Any) -> str | None:
    """How a converter's operations arrange its sources: "stack" (stack each pattern's list), "stack+cat0" /
    "stack+cat1" (then concatenate the patterns along dim 0 / 1); None for anything else."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if getattr(converter, "quantization_operation", None) is not None or len(converter.target_patterns) != 1:
        return None
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return "stack" if len(converter.source_patterns) == 1 else None
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim in (0, 1):
        return f"stack+cat{ops[1].dim}"
    return None


def _stacked(how: str, patterns: Sequence[str], lists: Mapping[str, list[TensorSpec]]) -> tuple[str, list, list] | None:
    """(dtype, shape, pieces) of the fused tensor built from `lists` (pattern -> specs in stacking order)."""
    present = [p for p in patterns if lists.get(p)]
    if not present:
        return None
    dtypes = {s[1] for p in present for s in lists[p]}
    inner = {p: {tuple(s[2]) for s in lists[p]} for p in present}
    if len(dtypes) != 1 or any(len(v) != 1 for v in inner.values()):
        return None
    shape_of = {p: [len(lists[p]), *next(iter(inner[p]))] for p in present}
    if how == "stack":
        p = present[0]
        return dtypes.pop(), shape_of[p], [piece for s in lists[p] for piece in s[3]]
    first = shape_of[present[0]]
    cat = 0 if how == "stack+cat0" else 1
    if any(len(shape_of[p]) != len(first) or len(first) <= cat for p in present):
        return None
    if any(shape_of[p][:cat] + shape_of[p][cat + 1:] != first[:cat] + first[cat + 1:] for p in present):
        return None
    shape = list(first)
    shape[cat] = sum(shape_of[p][cat] for p in present)
    if cat == 0:
        pieces = [piece for p in present for s in lists[p] for piece in s[3]]
    else:  # expert-major: expert i's tensor of every pattern, in pattern order
        pieces = [piece for i in range(first[0]) for p in present for piece in lists[p][i][3]]
    return dtypes.pop(), shape, pieces


def model_sources(
    model: Any, specs: Sequence[TensorSpec], ready: Ready | None = None, before: Ready | None = None
) -> tuple[list[TensorSpec], dict[str, Any], dict[str, Any]] | None:
    """(`specs` rearranged and renamed into the parameters of `model` (a meta model of the class that will
    load them), `ready` renamed, `before` renamed), or None when transformers would apply a rule not
    performed here. `before` and `ready` are tensors in memory that come before / after `specs` in the
    state dict; each output keeps the place of its first source in that order.

    A spec or tensor that maps to no parameter is passed on under its own name (transformers reports it
    as unexpected, as it would have). Every name produced maps to itself under transformers' rules, so its
    loader assigns the tensors as they are."""
    from transformers.core_model_loading import dot_natural_key

    before, ready = dict(before or {}), dict(ready or {})
    renamings, converters, by_pattern, prefix, shapes = _rules(model)
    order: dict[str, int] = {}  # output name -> position of its first source (the caller's order)
    plain: dict[str, TensorSpec | Any] = {}
    groups: dict[str, dict[str, list[TensorSpec]]] = {}
    conv_of: dict[str, Any] = {}
    items = [*before.items(), *((s[0], s) for s in specs), *ready.items()]
    position = {name: i for i, (name, _) in enumerate(items)}
    for name, item in sorted(items, key=lambda kv: dot_natural_key(kv[0])):
        new, pattern = _target(name, renamings, converters, prefix, shapes)
        if new not in shapes:
            new, pattern = name, None
        if pattern is None:
            if new in plain or new in groups:
                return None
            plain[new] = (new, *item[1:]) if isinstance(item, tuple) else item
        else:
            if not isinstance(item, tuple) or new in plain:
                return None
            conv_of[new] = by_pattern[pattern]
            groups.setdefault(new, {}).setdefault(pattern, []).append(item)
        order[new] = min(order.get(new, len(items)), position[name])
    out_specs: dict[str, TensorSpec] = {}
    out_ready: dict[str, Any] = {}
    for new, item in plain.items():
        if isinstance(item, tuple):
            out_specs[new] = item
        else:
            out_ready[new] = item
    for new, lists in groups.items():
        how = _supported(conv_of[new])
        built = _stacked(how, conv_of[new].source_patterns, lists) if how else None
        if built is None or tuple(built[1]) != shapes[new]:
            return None
        out_specs[new] = (new, built[0], built[1], built[2])
    for new in [*out_specs, *out_ready]:  # transformers must take every produced name as it is
        if new in shapes and _target(new, renamings, converters, prefix, shapes) != (new, None):
            return None
    n_before = len(before)
    ranked = sorted(out_ready, key=lambda n: order[n])
    return ([out_specs[n] for n in sorted(out_specs, key=lambda n: order[n])],
            {n: out_ready[n] for n in ranked if order[n] >= n_before},
            {n: out_ready[n] for n in ranked if order[n] < n_before})
