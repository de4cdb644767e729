"""Bundled reference models and workloads: present, loadable, MoE of the expected family, and actually trained."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moesift.assets import DOMAINS, MODELS, SPLITS, reference_model, workload
from moesift.core.errors import MoesiftError

EXPECTED = {
    # name: (model_type, n_shared, scoring, grouped)
    "qwen3moe-ref": ("qwen3_moe", 0, "softmax", False),
    "deepseekv3-ref": ("deepseek_v3", 1, "sigmoid", True),
    "olmoe-ref": ("olmoe", 0, "softmax", False),
    "qwen2moe-ref": ("qwen2_moe", 1, "softmax", False),
}


def _texts(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = reference_model(request.param)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    return request.param, model, tok


def test_unknown_names_raise_clear_errors():
    with pytest.raises(MoesiftError, match="qwen3moe-ref"):
        reference_model("nope")
    with pytest.raises(MoesiftError, match="code"):
        workload("poetry", "trace")
    with pytest.raises(MoesiftError, match="trace"):
        workload("code", "train")


def test_model_dirs_are_complete():
    for name in MODELS:
        d = reference_model(name)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
            assert (d / f).is_file(), f"{d / f} missing"
        assert (d / "model.safetensors").stat().st_size < 20e6


def test_workloads_disjoint_and_sized():
    seen = {}
    for domain in DOMAINS:
        per_split = {}
        for split in SPLITS:
            texts = _texts(workload(domain, split))
            assert len(texts) >= 16 and all(t.strip() for t in texts)
            assert len(set(texts)) == len(texts)
            per_split[split] = set(texts)
        assert not per_split["trace"] & per_split["eval"], domain
        for split, s in per_split.items():
            for other, o in seen.items():
                assert not s & o, (domain, split, other)
            seen[(domain, split)] = s


def test_model_is_moe_of_expected_family(loaded):
    from moesift.arch import adapter_for

    name, model, tok = loaded
    model_type, n_shared, scoring, grouped = EXPECTED[name]
    assert model.config.model_type == model_type
    spec = adapter_for(model.config).spec(model.config)
    assert spec.n_experts >= 16 and 2 <= spec.top_k < spec.n_experts
    assert len(spec.moe_layers) >= 3
    assert spec.n_shared == n_shared
    assert spec.scoring == scoring
    assert (spec.n_group or 1) > 1 if grouped else (spec.n_group or 1) == 1
    assert len(tok) == model.config.vocab_size


def test_selection_bias_was_trained():
    """The DeepSeek-V3 model's aux-loss-free balancing moved the selection bias away from its zero init."""
    from safetensors import safe_open

    d = reference_model("deepseekv3-ref")
    with safe_open(d / "model.safetensors", "pt") as f:
        biases = [f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")]
    assert biases and all(float(b.abs().max()) > 1e-3 for b in biases)


@torch.no_grad()
def test_model_beats_unigram_baseline_on_every_domain(loaded):
    """Perplexity on bundled held-out eval text, against a unigram model fitted on the domain's trace prompts."""
    name, model, tok = loaded
    eos = tok.eos_token_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention
    try:
        for domain in DOMAINS:
            counts = np.ones(len(tok))
            for ids in tok(_texts(workload(domain, "trace")), add_special_tokens=False)["input_ids"]:
                counts += np.bincount(ids, minlength=len(tok))
            logp_uni = np.log(counts / counts.sum())
            seqs = [[eos] + ids[:255] for ids in tok(_texts(workload(domain, "eval"))[:4],
                                                     add_special_tokens=False)["input_ids"]]
            width = max(map(len, seqs))
            x = torch.full((len(seqs), width), tok.pad_token_id)
            mask = torch.zeros_like(x)
            for i, s in enumerate(seqs):
                x[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            keep = mask[:, 1:].bool()
            n = int(keep.sum())
            ppl = math.exp(-float(lp[keep].sum()) / n)
            uni = math.exp(-float(logp_uni[x[:, 1:][keep].numpy()].sum()) / n)
            assert ppl < 0.5 * uni, f"{name} {domain}: perplexity {ppl:.1f} vs unigram {uni:.1f}"
    finally:
        torch.set_num_threads(threads)
