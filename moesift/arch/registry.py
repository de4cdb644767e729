"""The family registry: adapters by `model_type`.

Family modules register their adapter class with `@register`; the package `moesift.arch` imports every
family module, so the registry is complete whenever anything in the package is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import MoesiftError
from .base import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available for each of its `model_types`."""
    for mt in cls.model_types:
        if mt in _REGISTRY:
            raise RuntimeError(f"model_type {mt!r} registered twice ({_REGISTRY[mt].__name__}, {cls.__name__})")
        _REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(config: Any) -> Adapter:
    """The adapter for a transformers config (or a config dict with `model_type`)."""
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    cls = _REGISTRY.get(mt or "")
    if cls is None:
        raise MoesiftError(
            f"model_type {mt!r} is not a supported MoE family; supported: {', '.join(supported_model_types())}"
        )
    return cls()
