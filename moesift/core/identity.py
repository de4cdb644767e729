"""Model and workload identity: the config hash that names a model's shape, the config a loaded model came
from, the token-stream hash of a workload, and the differences between two configs in one line each."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoesiftError


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config dict in canonical JSON (sorted keys, no spaces): identifies a model's shape."""
    s = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(s.encode()).hexdigest()


def model_config_hash(model_dir: str | os.PathLike) -> str:
    """`config_hash` of the config.json in `model_dir`."""
    return config_hash(load_config_dict(model_dir))


def loaded_config_dict(model: Any) -> dict[str, Any]:
    """The config of a loaded model as a dict: its directory's config.json when it was loaded from one
    (so the hash equals `model_config_hash` of that directory), else `model.config.to_dict()`."""
    src = Path(str(getattr(model, "name_or_path", "") or ""))
    if str(src) and (src / "config.json").is_file():
        try:
            d = load_config_dict(src)
            if isinstance(d, dict):
                return d
        except (OSError, MoesiftError):
            pass
    return json.loads(json.dumps(model.config.to_dict(), default=str))  # plain JSON types, as a file holds


def token_stream_hash(docs_ids: list[list[int]]) -> str:
    """sha256 over the documents' token ids: per document its length then its ids, all int64 little-endian."""
    h = hashlib.sha256()
    for ids in docs_ids:
        h.update(np.int64(len(ids)).astype("<i8").tobytes())
        h.update(np.asarray(ids, dtype="<i8").tobytes())
    return h.hexdigest()


# Config keys that say how a file was written, not what the model computes: a plan made on a copy of the
# model saved by another transformers version, or in another dtype, or quantized (mlx-lm's "quantization",
# transformers' "quantization_config"), still fits.
CONFIG_KEYS_IGNORED = frozenset({
    "transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "auto_map", "pad_token_id", "bos_token_id", "eos_token_id",
    "quantization", "quantization_config",
})


def _flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k in CONFIG_KEYS_IGNORED:
            continue
        if isinstance(v, Mapping):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(recorded: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """`key: recorded vs actual` for every config field both configs name with different values. A field
    only one of them names is not compared: a config saved by `save_pretrained` leaves out library
    defaults that `config.to_dict()` spells out, so absence means "the default", not "different"."""
    a, b = _flat_config(recorded), _flat_config(actual)
    return [f"{k}: {short_value(a[k])} vs {short_value(b[k])}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def short_value(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def load_config_dict(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a model directory as a dict; a missing or damaged file is one error line."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise MoesiftError(f"{str(model_dir)!r} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoesiftError(f"{str(p)!r} is not valid JSON ({e})") from None
