"""Family adapters, one module per MoE family, registered by `model_type` (see base.py)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    Adapter,
    MoESpec,
    Route,
    StandardAdapter,
    TensorRole,
    adapter_for,
    register,
    supported_model_types,
)

_LOADED = False


def _load_all() -> None:
    """Import every family module in this package so each registers itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = [
    "Adapter",
    "MoESpec",
    "Route",
    "StandardAdapter",
    "TensorRole",
    "adapter_for",
    "register",
    "supported_model_types",
]
