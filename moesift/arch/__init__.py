"""Family knowledge, for every engine: one module per MoE family, registered by `model_type`.

`spec` holds the shapes (MoESpec, tensor roles, routes), `base` the adapter contract, `standard` the common
transformers 5 layout most families share, `registry` the lookup. Importing this package imports every
family module, so `adapter_for` knows them all.
"""

from __future__ import annotations

from . import (  # every family module: importing each registers its adapter
    dbrx,
    deepseek_v2,
    deepseek_v3,
    dots1,
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    granitemoe,
    hunyuan_v1_moe,
    jamba,
    llama4_text,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    qwen3_next,
)
from .base import Adapter
from .registry import adapter_for, register, supported_model_types
from .spec import MoESpec, Route, TensorRole
from .standard import StandardAdapter

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
