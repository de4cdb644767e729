"""Tiny random models of every supported family, built with the real transformers classes.

`TINY[model_type]()` returns a config small enough to build, save and run in well under a second.
Families register here; tests/conftest.py saves each once per session (fixture `tiny_dir`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TINY: dict[str, Callable[[], Any]] = {}
# model_type -> fn(model): randomise state that build() leaves alone (selection-bias buffers), under no_grad
AFTER_BUILD: dict[str, Callable[[Any], None]] = {}

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny(model_type: str):
    def deco(fn):
        TINY[model_type] = fn
        return fn

    return deco


@tiny("qwen3_moe")
def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True,
    )


def build(model_type: str, seed: int = 0, **overrides: Any):
    """A float32 model of `model_type` with random weights (router weights scaled up so that routing is
    decisive and ties are impossible). `overrides`: config attributes to change (variants)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = TINY[model_type]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        if model_type in AFTER_BUILD:
            AFTER_BUILD[model_type](model)
    return model.eval()


def hub_style(directory) -> None:
    """Rewrite a saved model's config.json with the key names hub checkpoints of its family use (what
    serving engines read; transformers 5 `save_pretrained` spells some of them its own way)."""
    import json
    from pathlib import Path

    from moesift.arch import adapter_for

    p = Path(directory) / "config.json"
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps(adapter_for(cfg).hub_config(cfg), indent=2, sort_keys=True) + "\n")


def save(model_type: str, directory, seed: int = 0, **overrides: Any) -> None:
    """Build a tiny `model_type` model and save it with a hub-style config.json."""
    build(model_type, seed=seed, **overrides).save_pretrained(directory)
    hub_style(directory)


def _load_families() -> None:
    """Family configs live in tiny_families_1.py / tiny_families_2.py and register with @tiny."""
    import importlib

    for mod in ("tiny_families_1", "tiny_families_2"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_load_families()
