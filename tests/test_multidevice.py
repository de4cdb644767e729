"""Tracing a model split over devices (what `device_map="auto"` does for a model larger than one GPU): on the
CPU, some decoder layers run from a disk offload through accelerate's hooks, the rest from memory; the trace
must equal the single-device trace (counts, routing log, transitions)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moesift

MODEL_TYPE = "qwen3_moe"


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    rng = random.Random(11)
    p = tmp_path_factory.mktemp("wl_md") / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 96) for _ in range(n)]}) + "\n"
                         for n in (6, 12, 4, 9, 7)))
    return p


def _split_map(model_dir, n_layers):
    """Embeddings, the first half of the decoder layers and the head in memory; the rest offloaded to disk."""
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    for i in range(n_layers):
        dm[f"model.layers.{i}"] = "cpu" if i < n_layers // 2 else "disk"
    return dm


def test_split_model_traces_like_single_device(tiny_dir, workload, tmp_path):
    pytest.importorskip("accelerate", reason="device maps need accelerate (pip install accelerate)")
    d = tiny_dir(MODEL_TYPE)
    one = moesift.trace(str(d), workload, batch_size=2, log_routing=True, progress=False, device="cpu")

    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    n_layers = ref.config.num_hidden_layers
    del ref
    assert n_layers >= 2
    split = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map=_split_map(d, n_layers),
                                                 offload_folder=str(tmp_path / "offload"))
    split.eval()
    devices = getattr(split, "hf_device_map", {})
    assert "disk" in devices.values() and "cpu" in devices.values()
    many = moesift.trace(split, workload, batch_size=2, log_routing=True, progress=False)

    for name in ("prefill_counts", "routing_log", "doc_offsets", "transitions", "coactivation", "fold_counts"):
        a, b = one.get(name), many.get(name)
        if a is None and b is None:
            continue
        assert a is not None and b is not None, name
        assert np.array_equal(a, b), name
    assert np.allclose(one.get("weight_mass"), many.get("weight_mass"), atol=1e-4)


def test_device_spread_without_accelerate_names_the_extra(tiny_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(moesift.MoesiftError, match=r"moesift\[multigpu\]"):
        moesift.load_model(str(tiny_dir(MODEL_TYPE)), device="spread")
