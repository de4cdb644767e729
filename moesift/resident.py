"""Models with only resident experts in memory: from a trimmed checkpoint (`load_trimmed`, any plan,
uniform or not) or straight from the full checkpoint (`load_resident`, nothing written).

MoE layers may hold different numbers of experts. The model class of the family is built for the largest
count, and the MoE block of every layer with another count is replaced, while the model is still on the
meta device, by the block of a model built for that layer's count (adapter `replace_moe_block`); then
transformers' own loader fills the weights, with its per-family conversions of on-disk names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import MoesiftError

_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E8M0": "float8_e8m0fnu",
}


def _config_obj(d: Mapping[str, Any]) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise MoesiftError(f"transformers does not know model_type {mt!r}")
    cls = CONFIG_MAPPING[mt]
    decode = getattr(cls, "_decode_special_floats", None)  # config.json spells inf / nan as {"__float__": ...}
    return cls.from_dict(decode(dict(d)) if decode else dict(d))


def _model_class(config: Any) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise MoesiftError(f"no causal-LM class for {config.model_type!r} in transformers") from None


def variable_expert_class(source_cfg: Mapping[str, Any], resident: Mapping[int, Sequence[int]]) -> tuple[Any, Any]:
    """(model class, config) for a model whose MoE layer `l` holds the experts `resident[l]` (renumbered
    0..n-1). When every layer has the same count the family's own class is returned."""
    from .arch import adapter_for

    ad = adapter_for(source_cfg)
    spec = ad.spec(source_cfg)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    base_d = ad.rewrite_config(dict(source_cfg), full)
    base_cfg = _config_obj(base_d)
    cls = _model_class(base_cfg)
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
                c = _config_obj(d)
                for attr in ("_attn_implementation", "_experts_implementation"):
                    v = getattr(config, attr, None)
                    if v is not None:
                        try:
                            setattr(c, attr, v)
                        except Exception:  # noqa: BLE001 - older configs may not allow it
                            pass
                built[k] = cls(c)
            ad.replace_moe_block(self, layer, ad.moe_block(built[k], layer))
        built.clear()

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    return sub, base_cfg


def _load_kwargs(device: str | None, dtype: str | None) -> dict[str, Any]:
    from .loading import check_device, parse_dtype

    check_device(device)
    kw: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device == "auto":
        from .loading import require_accelerate

        require_accelerate()
        kw["device_map"] = "auto"
    return kw


def _to(model: Any, device: str | None) -> Any:
    if device not in (None, "auto", "cpu"):
        model = model.to(device)
    return model


def _finish(model: Any, resident: Mapping[int, Sequence[int]]) -> Any:
    model.eval()
    model.moesift_resident = {int(k): list(v) for k, v in resident.items()}
    return model


def load_trimmed(
    path: str | os.PathLike, device: str = "cpu", dtype: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer or None) of a checkpoint written by `moesift.trim`, uniform or not (also any
    standard checkpoint). The model carries `moesift_resident` {layer: original ids} when known."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_config_dict, shard_files
    from .loading import resolve_model_dir
    from .trim import NONSTANDARD_MODEL_TYPE, read_trimmed_record

    d = resolve_model_dir(path)
    cfg = load_config_dict(d)
    shard_files(d)
    record = read_trimmed_record(d)
    kw = _load_kwargs(device, dtype)
    if cfg.get("model_type") == NONSTANDARD_MODEL_TYPE:
        inner = cfg.get("moesift") or {}
        try:
            src_cfg = inner["source_config"]
            resident = {int(k): v for k, v in inner["resident"].items()}
        except (KeyError, AttributeError):
            raise MoesiftError(f"{str(d / 'config.json')!r} is a damaged moesift-trimmed config (no resident map)") from None
        cls, base_cfg = variable_expert_class(src_cfg, resident)
        model = cls.from_pretrained(d, config=base_cfg, **kw)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(d, **kw)
        except ValueError as e:
            raise MoesiftError(f"cannot load {str(d)!r}: {str(e).splitlines()[0]}") from None
        resident = {int(k): v for k, v in (record or {}).get("id_map", {}).items()}
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still usable from token ids
        tok = None
    return _finish(_to(model, device), resident), tok


def load_resident(
    model: str | os.PathLike, plan: Any, device: str = "cpu", dtype: str | None = None, force_plan: bool = False
) -> Any:
    """Load `model` with only `plan`'s resident experts in memory (router rows and selection biases sliced
    with them), read tensor by tensor from the full checkpoint; nothing is written. Routing is thereby
    restricted to the resident experts; the result computes what `restrict(full_model, plan)` computes.
    A plan made for another config of the family is refused unless `force_plan`."""
    import torch

    from .checkpoint import CheckpointIndex
    from .plan import as_plan
    from .trim import _sliced_bytes, plan_layout

    idx = CheckpointIndex.build(model)
    spec, ad = idx.spec, idx.adapter
    resident = as_plan(plan).resolve(spec, idx.config, str(model), force_plan)
    full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    problems = []
    for layer, ids in full.items():
        problems += ad.plan_problems(spec, {layer: ids}, standard=True)
    if problems:
        raise MoesiftError("cannot load this plan: " + "; ".join(problems[:4]))
    layout = plan_layout(idx, resident)
    state: dict[str, Any] = {}
    files: dict[str, Any] = {}
    try:
        for t in layout:
            if t.slice_keep is not None:
                raw = bytearray(_sliced_bytes(idx.directory, t, ad, idx.config))
            else:
                f = files.get(t.src_file)
                if f is None:
                    f = files[t.src_file] = open(Path(idx.directory) / t.src_file, "rb")
                raw = bytearray(t.nbytes)
                mv, pos = memoryview(raw), 0
                for off, n in t.ranges:
                    f.seek(off)
                    got = f.readinto(mv[pos: pos + n])
                    if got != n:
                        raise MoesiftError(f"{t.src_file!r} ended early; the checkpoint is damaged")
                    pos += n
            tdt = _TORCH_DTYPES.get(t.dtype)
            if tdt is None or not hasattr(torch, tdt):
                raise MoesiftError(f"tensor {t.src_name} has dtype {t.dtype}, which torch cannot hold")
            x = torch.frombuffer(raw, dtype=getattr(torch, tdt)) if raw else torch.empty(0, dtype=getattr(torch, tdt))
            state[t.name] = x.reshape(t.shape)
    finally:
        for f in files.values():
            f.close()
    cls, base_cfg = variable_expert_class(idx.config, full)
    m = cls.from_pretrained(None, config=base_cfg, state_dict=state, **_load_kwargs(device, dtype))
    del state
    return _finish(_to(m, device), full)
