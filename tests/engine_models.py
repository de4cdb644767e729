"""Tiny models for the serving-engine checks (tests/test_engines_*.py, bench/engines.py): per engine, the
families it runs and the config changes its implementation needs (what hub checkpoints of the family have
anyway), and a small byte-pair tokenizer, since llama.cpp's converter writes the vocabulary into the GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# llama.cpp's tests need llama-cpp-python (it builds llama.cpp from source) and llama.cpp's converter, whose
# tree MOESIFT_LLAMA_CPP names; CI has neither, bench/engines.py sets both up
needs_llama = pytest.mark.skipif(
    not os.environ.get("MOESIFT_LLAMA_CPP"), reason="needs moesift[gguf] and MOESIFT_LLAMA_CPP (bench/engines.py)")

# mlx_lm.convert settings of the tests' mlx-lm folders, by folder name
MLX_CONVERSIONS: dict[str, dict] = {"q4": dict(quantize=True, q_bits=4, q_group_size=64),
                                    "q8": dict(quantize=True, q_bits=8, q_group_size=32), "f32": {}}


def mlx_convert(src: Path, root: Path, *names: str) -> dict[str, Path]:
    """{name: root/name}: the transformers checkpoint `src` converted by mlx_lm.convert as MLX_CONVERSIONS
    names."""
    from mlx_lm import convert

    for name in names:
        convert(str(src), str(root / name), **MLX_CONVERSIONS[name])
    return {name: root / name for name in names}


def per_family(tmp_path_factory, build):
    """family(model_type) -> build(model_type, a fresh folder), built once per model type (a module fixture's
    value)."""
    cache: dict = {}

    def get(mt: str):
        if mt not in cache:
            cache[mt] = build(mt, tmp_path_factory.mktemp(mt))
        return cache[mt]

    return get


# engine -> {family: config overrides of the tiny model}
ENGINE_FAMILIES: dict[str, dict[str, dict]] = {
    "mlx": {
        "qwen3_moe": {}, "qwen2_moe": {"mlp_only_layers": []}, "olmoe": {}, "mixtral": {}, "deepseek_v2": {},
        "deepseek_v3": {}, "glm4_moe": {}, "granitemoe": {}, "dots1": {}, "dbrx": {},
    },
    "llama.cpp": {
        # llama.cpp: qwen3moe has no dense layers; OLMoE's q/k norms span all heads (hub OLMoE has no GQA);
        # deepseek2 reads q_lora_rank (every hub DeepSeek-V2/V3 but the Lite ones has it)
        "qwen3_moe": {"mlp_only_layers": []}, "qwen2_moe": {"mlp_only_layers": []},
        "olmoe": {"num_key_value_heads": 4}, "mixtral": {}, "granitemoe": {}, "dbrx": {},
        "deepseek_v2": {"q_lora_rank": 16}, "deepseek_v3": {"q_lora_rank": 16},
    },
}


def add_bpe_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-pair tokenizer of at most `vocab_size` tokens trained on a few lines, saved into `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                  show_progress=False)
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)


def engine_model(engine: str, model_type: str, directory: Path, tokenizer: bool = False) -> Path:
    """Save the tiny `model_type` model as `engine` needs it (hub-style config) into `directory`."""
    import json

    from tiny import save

    save(model_type, directory, **ENGINE_FAMILIES[engine][model_type])
    if tokenizer:
        add_bpe_tokenizer(directory, json.loads((directory / "config.json").read_text())["vocab_size"])
    return directory


# mlx-lm model folders (tests/test_mlx_*.py): sizes the quantizer accepts (input widths divisible by the group
# size) and what mlx-lm's build of the family needs (qwen2_moe: no dense layers; mixtral: head_dim = hidden /
# heads)
MLX_SIZES: dict[str, dict] = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64, mlp_only_layers=[]),
    "olmoe": dict(hidden_size=64, intermediate_size=64),
    "mixtral": dict(hidden_size=64, intermediate_size=64, head_dim=16),
}

# more families in mlx-lm (tests/test_mlx_families.py): DeepSeek-style gates, Granite's top-k gating, Qwen3-Next
# (mlx-lm places full attention every full_attention_interval-th layer) and Phi-MoE (mlx-lm's build has attention
# and output biases, as the hub checkpoint does)
MLX_FAMILY_SIZES: dict[str, dict] = {
    **{mt: dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
       for mt in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1")},
    "granitemoe": dict(hidden_size=64, intermediate_size=64),
    "qwen3_next": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64, full_attention_interval=2),
    "phimoe": dict(hidden_size=64, intermediate_size=64, attention_bias=True, lm_head_bias=True),
}


def mlx_source(model_type: str, directory: Path, **overrides) -> Path:
    """The tiny transformers model of `model_type` at MLX-friendly sizes, with a byte-pair tokenizer, saved into
    `directory` (what `mlx_lm.convert` then converts)."""
    from tiny import save

    sizes = MLX_SIZES.get(model_type) or MLX_FAMILY_SIZES.get(model_type, {})
    save(model_type, directory, **{**sizes, **overrides})
    add_bpe_tokenizer(directory, 96)
    return directory


def mlx_gpt_oss_source(hf: Path, directory: Path) -> Path:
    """The tiny transformers gpt-oss model saved into `hf`, and the same weights with its experts in mlx-lm's
    layout in `directory` (what mlx-lm's gpt_oss reads as it is; its converter reads transformers' experts only
    in the MXFP4 layout of the released checkpoints): gate_up_proj [E, H, 2I] split into its interleaved gate
    (even) and up (odd) columns, each transposed to [E, I, H], down_proj transposed to [E, H, I]."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    mlx_source("gpt_oss", hf, hidden_size=64, intermediate_size=64)
    shutil.copytree(hf, directory)
    w = load_file(str(hf / "model.safetensors"))
    out = {}
    for name, x in w.items():
        base = name.rsplit(".", 1)[0] + "."
        if name.endswith("experts.gate_up_proj"):
            out[base + "gate_proj.weight"] = np.ascontiguousarray(x[:, :, ::2].transpose(0, 2, 1))
            out[base + "up_proj.weight"] = np.ascontiguousarray(x[:, :, 1::2].transpose(0, 2, 1))
        elif name.endswith("experts.gate_up_proj_bias"):
            out[base + "gate_proj.bias"] = np.ascontiguousarray(x[:, ::2])
            out[base + "up_proj.bias"] = np.ascontiguousarray(x[:, 1::2])
        elif name.endswith("experts.down_proj"):
            out[base + "down_proj.weight"] = np.ascontiguousarray(x.transpose(0, 2, 1))
        elif name.endswith("experts.down_proj_bias"):
            out[base + "down_proj.bias"] = x
        else:
            out[name] = x
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "mlx"})
    return directory


def keep_router_outputs(model, layers: list[int], block: str = "mlp", attr: str = "gate", record=None) -> list[list]:
    """Replace the router module (`attr` of `block`) of each decoder layer in `layers` of an mlx-lm model by a
    test-local module that returns what the router returns and appends it (or `record(router, x, out)`) to
    that layer's list; returns the lists, one per layer in `layers`."""
    import mlx.nn as nn

    class Keep(nn.Module):
        def __init__(self, inner, sink):
            super().__init__()
            self.inner, self.sink = inner, sink

        def __call__(self, x):
            out = self.inner(x)
            self.sink.append(out if record is None else record(self.inner, x, out))
            return out

    seen: list[list] = [[] for _ in layers]
    for sink, layer in zip(seen, layers, strict=True):
        blk = getattr(model.model.layers[layer], block)
        setattr(blk, attr, Keep(getattr(blk, attr), sink))
    return seen
