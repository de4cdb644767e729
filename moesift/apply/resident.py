"""Models with only resident experts in memory: from a trimmed checkpoint (`load_trimmed`, any plan,
uniform or not) or straight from the full checkpoint (`load_resident`, nothing written).

MoE layers may hold different numbers of experts. The model class of the family is built for the largest
count, and the MoE block of every layer with another count is replaced, while the model is still on the
meta device, by the block of a model built for that layer's count (adapter `replace_moe_block`). The reader
lands every byte where the model holds it (per-expert tensors straight into their slots of the fused expert
parameters, `moesift.engines.assemble`), so transformers' own loader (model built on the meta device, buffers
computed, weights tied, dtype cast) only assigns the tensors under their final names.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..engines.assemble import meta_model
from ..engines.hf import (
    check_device,
    config_like,
    config_obj,
    from_pretrained_checked,
    load_tokenizer,
    model_class,
    parse_dtype,
    require_accelerate,
    resolve_device,
)
from ..engines.tensors import read_layout, read_sources
from ..formats.checkpoint import (
    CheckpointIndex,
    checked_headers,
    load_config_dict,
    resolve_model_dir,
)
from ..formats.plan import as_plan
from ..formats.trimmed import NONSTANDARD_MODEL_TYPE, plan_layout, read_trimmed_record


def variable_expert_class(source_cfg: Mapping[str, Any], resident: Mapping[int, Sequence[int]]) -> tuple[Any, Any]:
    """(model class, config) for a model whose MoE layer `l` holds the experts `resident[l]` (renumbered
    0..n-1). When every layer has the same count the family's own class is returned."""
    ad = adapter_for(source_cfg)
    spec = ad.spec(source_cfg)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    base_d = ad.rewrite_config(dict(source_cfg), full)
    base_cfg = config_obj(base_d)
    cls = model_class(base_cfg)
    key = json.dumps(base_d, sort_keys=True, default=str)
    per_layer: dict[int, dict[str, Any]] = {}
    for layer, ids in full.items():
        d = ad.rewrite_config(dict(source_cfg), {m: ids for m in spec.moe_layers})
        if json.dumps(d, sort_keys=True, default=str) != key:
            per_layer[layer] = d
    if not per_layer:
        return cls, base_cfg

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        built: dict[str, Any] = {}
        for layer, d in per_layer.items():
            k = json.dumps(d, sort_keys=True, default=str)
            if k not in built:
                built[k] = cls(config_like(d, config))
            ad.replace_moe_block(self, layer, ad.moe_block(built[k], layer))
        built.clear()

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    return sub, base_cfg


def _load_kwargs(device: str | None, dtype: str | None, read_device: str = "cpu") -> dict[str, Any]:
    check_device(device)
    kw: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device == "spread":
        require_accelerate()
        kw["device_map"] = "auto"
    elif read_device != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kw["device_map"] = {"": read_device}  # the tensors are already there: no trip through the host
    return kw


def _to(model: Any, device: str | None) -> Any:
    if device not in (None, "spread", "cpu"):
        model = model.to(device)
    return model


def _finish(model: Any, resident: Mapping[int, Sequence[int]]) -> Any:
    model.eval()
    model.moesift_resident = {int(k): list(v) for k, v in resident.items()}
    return model


def load_trimmed(
    path: str | os.PathLike, device: str = "auto", dtype: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer or None) of a checkpoint written by `moesift.trim`, uniform or not (also any
    standard checkpoint). The model carries `moesift_resident` {layer: original ids} when known. Tensors
    are read in large sequential reads straight into tensors on `device` (see `read_sources`)."""
    device = resolve_device(device)
    from transformers import GenerationConfig

    d = resolve_model_dir(path)
    cfg = load_config_dict(d)
    record = read_trimmed_record(d)
    tensors = []
    for f, (header, hsize) in checked_headers(d).items():  # every header checked once
        for name, info in header.items():
            if name != "__metadata__":
                s0, e0 = info["data_offsets"]
                tensors.append((name, info["dtype"], list(info["shape"]), [(f, hsize + s0, e0 - s0)]))
    if cfg.get("model_type") == NONSTANDARD_MODEL_TYPE:
        inner = cfg.get("moesift") or {}
        try:
            src_cfg = inner["source_config"]
            resident = {int(k): v for k, v in inner["resident"].items()}
        except (KeyError, AttributeError):
            raise MoesiftError(f"{str(d / 'config.json')!r} is a damaged moesift-trimmed config (no resident map)") from None
        cls, base_cfg = variable_expert_class(src_cfg, resident)
    else:
        CheckpointIndex.build(d).check_consistent()
        base_cfg = config_obj(cfg)
        cls = model_class(base_cfg)
        resident = {int(k): v for k, v in (record or {}).get("id_map", {}).items()}
    dev = _read_device(device)
    state = read_sources(d, tensors, {}, dev, meta_model(cls, base_cfg))
    try:
        model = from_pretrained_checked(cls, None, d, config=base_cfg, state_dict=state,
                                        **_load_kwargs(device, dtype, dev))
    except ValueError as e:
        raise MoesiftError(f"cannot load {str(d)!r}: {str(e).splitlines()[0]}") from None
    del state
    if cfg.get("model_type") != NONSTANDARD_MODEL_TYPE:  # the directory's config.json is this model's config
        model.name_or_path = str(d)
    with contextlib.suppress(Exception):  # generation defaults (end-of-sequence ids) of the checkpoint
        model.generation_config = GenerationConfig.from_pretrained(d)
    tok = load_tokenizer(d)
    return _finish(_to(model, device), resident), tok


def load_resident(
    model: str | os.PathLike, plan: Any, device: str = "auto", dtype: str | None = None, force_plan: bool = False
) -> Any:
    """Load `model` with only `plan`'s resident experts in memory (router rows and selection biases sliced
    with them), read from the full checkpoint's byte ranges of those experts alone, in large sequential
    reads straight into tensors on `device` (see `read_sources`); nothing is written. Routing is thereby
    restricted to the resident experts; the result computes what `restrict(full_model, plan)` computes.
    A plan made for another config of the family is refused unless `force_plan`."""
    device = resolve_device(device)
    idx = CheckpointIndex.build(model)
    idx.check_consistent()
    spec, ad = idx.spec, idx.adapter
    resident = as_plan(plan).resolve(spec, idx.config, str(model), force_plan)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    problems = []
    for layer, ids in full.items():
        problems += ad.plan_problems(spec, {layer: ids}, standard=True)
    if problems:
        raise MoesiftError("cannot load this plan: " + "; ".join(problems[:4]))
    dev = _read_device(device)
    cls, base_cfg = variable_expert_class(idx.config, full)
    state = read_layout(idx, plan_layout(idx, resident), dev, model=meta_model(cls, base_cfg))
    m = from_pretrained_checked(cls, None, idx.directory, config=base_cfg, state_dict=state,
                                **_load_kwargs(device, dtype, dev))
    del state
    return _finish(_to(m, device), full)


def _read_device(device: str | None) -> str:
    """Where the reader puts tensors: the target device, or the host for "spread" (accelerate places them).
    An unusable device is one error line before anything is read."""
    check_device(device)
    return "cpu" if device == "spread" else resolve_device(device)
