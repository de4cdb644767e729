"""mlx-lm: load a trimmed checkpoint with `mlx_lm.utils.load_model` (the loader `mlx_lm.load` uses), in
float32 on mlx's default device, and run it with mlx-lm's own KV cache."""

from __future__ import annotations

import importlib.util
import pkgutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from .runner import standard_config


def implemented_model_types() -> list[str]:
    """model_types mlx-lm builds: the modules of its `mlx_lm.models` package, plus its remapped names."""
    import mlx_lm.models as models
    from mlx_lm import utils

    names = {m.name for m in pkgutil.iter_modules(models.__path__)}
    names |= {k for k, v in getattr(utils, "MODEL_REMAPPING", {}).items() if v in names}
    return sorted(names)


def module_for(model_type: str) -> str | None:
    """The `mlx_lm.models` module that builds `model_type` (after mlx-lm's remapping), or None."""
    from mlx_lm import utils

    mt = getattr(utils, "MODEL_REMAPPING", {}).get(model_type, model_type)
    return mt if importlib.util.find_spec(f"mlx_lm.models.{mt}") is not None else None


def mlx_version() -> str:
    """The installed mlx-lm version ("?" when unknown)."""
    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "?"


class MlxRunner:
    def __init__(self, trimmed: Path, cfg: dict[str, Any]):
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.mx = mx
        self.name = f"mlx-lm {mlx_version()}"
        self.notes: list[str] = []
        try:
            model, _ = load_model(trimmed, lazy=False, strict=True)
        except Exception as e:  # mlx-lm raises TypeError / ValueError / KeyError for configs and weights it cannot read
            first = " ".join(str(e).split())[:300] or type(e).__name__
            hint = ""
            if isinstance(e, TypeError) and "required positional argument" in str(e):
                hint = (" (config.json lacks key names mlx-lm reads; hub checkpoints of this family carry them, "
                        "a config re-saved by transformers 5 may spell them differently)")
            raise MoesiftError(f"{self.name} cannot load {str(trimmed)!r}: {type(e).__name__}: {first}{hint}") from None
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        self.model = model

    def run(self, ids: list[int], n: int) -> tuple[Any, list[int]]:
        return self.logits(ids), self.greedy(ids, n)

    def logits(self, ids: list[int]) -> Any:
        out = self.model(self.mx.array([ids], dtype=self.mx.int32))
        return np.array(out[0].astype(self.mx.float32))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        from mlx_lm.models.cache import make_prompt_cache

        mx = self.mx
        cache = make_prompt_cache(self.model)
        out: list[int] = []
        x = mx.array([ids], dtype=mx.int32)
        for _ in range(n):
            logits = self.model(x, cache=cache)
            tok = int(mx.argmax(logits[0, -1]).item())
            out.append(tok)
            x = mx.array([[tok]], dtype=mx.int32)
        return out

    def close(self) -> None:
        self.model = None


def check(trimmed: Path, record: dict[str, Any] | None) -> dict[str, Any]:
    """config.json of `trimmed` when mlx-lm implements its family and the trim is uniform; else one error line."""
    cfg = standard_config(trimmed, record, "mlx")
    mt = str(cfg.get("model_type"))
    if module_for(mt) is None:
        raise MoesiftError(
            f"mlx-lm {mlx_version()} has no implementation of model_type {mt!r} (mlx_lm.models has none); "
            "verify this checkpoint with --engine transformers"
        )
    return cfg


def open(trimmed: Path, record: dict[str, Any] | None, work_dir: Path, max_tokens: int) -> MlxRunner:  # noqa: A001 - engine protocol
    return MlxRunner(trimmed, check(trimmed, record))
