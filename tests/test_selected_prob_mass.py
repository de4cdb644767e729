"""`selected_prob_mass`: the router's full probability (softmax over all experts; sigmoid routers: the
sigmoid score) of each selected expert, summed over real tokens, checked against a recomputation from the
MoE blocks' inputs and the router weights (ids from tests/ref_routing*.py, not from moesift's hooks)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from ref_routing import REFERENCE
from transformers import AutoModelForCausalLM

import moesift
from moesift.arch import adapter_for

LENGTHS = [5, 11, 3, 8, 6]  # 2 per batch: padding in every batch but the last
BATCH = 2
# family -> (router weight path inside the MoE block, scoring); llama4_text reports ids before probabilities
CASES = {"qwen3_moe": ("gate.weight", "softmax"), "deepseek_v3": ("gate.weight", "sigmoid"),
         "llama4_text": ("router.weight", "sigmoid")}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    rng = random.Random(3)
    p = tmp_path_factory.mktemp("wl") / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 96) for _ in range(n)]}) + "\n" for n in LENGTHS))
    return p


def _get(mod, path):
    for a in path.split("."):
        mod = getattr(mod, a)
    return mod


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_selected_prob_mass_matches_recomputation(model_type, tiny_dir, workload):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(model_type), dtype=torch.float32).eval()
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    blocks = [ad.moe_block(model, layer) for layer in spec.moe_layers]
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    hs = [b.register_forward_pre_hook(lambda mod, a, _m=m: seen[_m].append(a[0].detach().clone()))
          for m, b in enumerate(blocks)]
    try:
        t = moesift.trace(model, workload, batch_size=BATCH, folds=2, progress=False)
    finally:
        for h in hs:
            h.remove()
    path, scoring = CASES[model_type]
    L, E = len(blocks), spec.n_experts
    want = np.zeros((L, E))
    total = np.zeros((L, E))
    for m, blk in enumerate(blocks):
        w = _get(blk, path).detach().double()
        for f, h in enumerate(seen[m]):
            ls = LENGTHS[f * BATCH : (f + 1) * BATCH]
            valid = torch.tensor([[s < n for s in range(max(ls))] for n in ls]).reshape(-1)
            flat = h.reshape(-1, h.shape[-1])
            logits = flat.double() @ w.T
            probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
            with torch.no_grad():
                ids, _ = REFERENCE[model_type](blk, flat)
            ids = ids[valid]
            np.add.at(want[m], ids.reshape(-1).numpy(), probs[valid].gather(1, ids).reshape(-1).numpy())
            total[m] += probs[valid].sum(0).numpy()
    spm = t.arrays["selected_prob_mass"]
    assert spm.dtype == np.float64 and spm.shape == (L, E)
    np.testing.assert_allclose(spm, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.arrays["prob_mass"], total, rtol=1e-5, atol=1e-5)
    assert (spm <= t.arrays["prob_mass"] + 1e-5).all()
    if scoring == "softmax":  # selected mass of a token is at most 1, so per layer at most the token count
        assert (spm.sum(axis=1) <= sum(LENGTHS) + 1e-4).all()


def test_selected_prob_mass_saved_and_merged(tiny_dir, workload, tmp_path):
    t = moesift.trace(str(tiny_dir("qwen3_moe")), workload, out=tmp_path / "a.trace", progress=False)
    back = moesift.Trace.load(tmp_path / "a.trace")
    np.testing.assert_array_equal(back.arrays["selected_prob_mass"], t.arrays["selected_prob_mass"])
    m = moesift.merge([back, back])
    np.testing.assert_allclose(m.arrays["selected_prob_mass"], 2 * t.arrays["selected_prob_mass"])
