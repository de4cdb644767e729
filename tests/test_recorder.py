"""The batched recorder against the per-layer one it replaced (tests/ref_recorder.py): on the same model and
workload, traces agree on every array (counts, co-activation, transitions, routing log: bit for bit;
masses: to float rounding) for every adapter, prefill and decode, with and without the routing log and
saliency, and whatever the recorder's flush and chunk sizes."""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest
import ref_recorder
import torch
from tiny import TINY
from transformers import AutoModelForCausalLM

import moesift
import moesift.record.tracer
from moesift.arch import supported_model_types
from moesift.record.recorder import Recorder as NewRecorder

LENGTHS = [5, 9, 3, 7, 4]  # 2 per batch: padding in every batch but the last
BATCH = 2
FLOATS = ("weight_mass", "prob_mass", "selected_prob_mass", "saliency_sum")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    rng = random.Random(11)
    p = tmp_path_factory.mktemp("wl") / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 96) for _ in range(n)]}) + "\n" for n in LENGTHS))
    return p


def _trace(monkeypatch, cls, model, workload, **kw):
    monkeypatch.setattr(moesift.record.tracer, "Recorder", cls)
    return moesift.trace(model, workload, batch_size=BATCH, folds=3, progress=False, **kw)


def _same(new, ref):
    assert new.workload == ref.workload
    assert sorted(new.arrays) == sorted(ref.arrays)
    for k, r in ref.arrays.items():
        n = new.arrays[k]
        assert n.dtype == r.dtype and n.shape == r.shape, k
        if k in FLOATS:
            np.testing.assert_allclose(n, r, rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(n, r, err_msg=k)


# the per-layer pass (the CPU default) on a few families of each kind of hook; the batched pass (the
# accelerator default) on every family
PER_LAYER_FAMILIES = ("qwen3_moe", "llama4_text", "deepseek_v3", "gpt_oss")
CASES = [(mt, True) for mt in sorted(TINY)] + [(mt, False) for mt in PER_LAYER_FAMILIES]


@pytest.mark.parametrize(("model_type", "batched"), CASES)
def test_recorder_equals_reference(model_type, batched, tiny_dir, workload, monkeypatch):
    if model_type not in supported_model_types():
        pytest.skip(f"{model_type}: no adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(model_type), dtype=torch.float32).eval()
    cls = functools.partial(NewRecorder, batched=batched)
    for generate in (0, 3):
        for flags in (False, True):
            kw = dict(generate=generate, log_routing=flags, saliency=flags)
            torch.manual_seed(0)
            ref = _trace(monkeypatch, ref_recorder.Recorder, model, workload, **kw)
            new = _trace(monkeypatch, cls, model, workload, **kw)
            _same(new, ref)
            assert ref.arrays["prefill_counts"].sum() > 0
            if generate:
                assert ref.arrays["decode_counts"].sum() > 0
            if flags:
                assert "routing_log" in new.arrays and "saliency_sum" in new.arrays


@pytest.mark.parametrize("sizes", [dict(flush_tokens=10**9), dict(flush_tokens=1, chunk_elements=1),
                                   dict(chunk_elements=200), dict(flush_tokens=10**9, batched=False),
                                   dict(flush_tokens=1, batched=False)])
def test_flush_and_chunk_sizes_do_not_change_the_trace(sizes, tiny_dir, workload, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3_moe"), dtype=torch.float32).eval()
    kw = dict(generate=4, log_routing=True, saliency=True)
    ref = _trace(monkeypatch, ref_recorder.Recorder, model, workload, **kw)
    new = _trace(monkeypatch, functools.partial(NewRecorder, **sizes), model, workload, **kw)
    _same(new, ref)
