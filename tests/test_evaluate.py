"""Perplexity evaluation: against an independent computation, restricted vs trimmed, top-k and top-p routing."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesift.arch import adapter_for
from moesift.core.errors import MoesiftError
from moesift.evaluation.evaluate import eval_model, top_p_chooser

MAX_LEN = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pre-tokenized documents (tiny models have no tokenizer), some longer than MAX_LEN, one too short."""
    rng = random.Random(3)
    p = tmp_path_factory.mktemp("eval_data") / "data.jsonl"
    lengths = [5, 40, 16, 17, 1, 9, 23, 2]
    with open(p, "w") as f:
        for n in lengths:
            f.write(json.dumps({"input_ids": [rng.randrange(96) for _ in range(n)]}) + "\n")
    return p


def _docs(path):
    return [json.loads(line)["input_ids"] for line in open(path)]


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _by_name(result):
    return {r["name"]: r for r in result["results"]}


def test_perplexity_equals_independent_computation(tiny_dir, data):
    d = tiny_dir("qwen3_moe")
    res = eval_model(d, data, max_length=MAX_LEN, batch_size=3, progress=False)
    # independent: one window at a time, no padding, transformers' own label shift and mean loss
    model = _load(d)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in _docs(data):
            for i in range(0, len(ids), MAX_LEN):
                w = ids[i : i + MAX_LEN]
                if len(w) < 2:
                    continue
                x = torch.tensor([w])
                total += float(model(input_ids=x, labels=x).loss) * (len(w) - 1)
                n += len(w) - 1
    full = res["results"][0]
    assert full["kind"] == "full" and full["tokens"] == n == res["tokens"]
    assert full["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert full["mean_active"] == pytest.approx(2.0)  # tiny qwen3_moe: top-2 on every real token
    # batch size (hence padding) does not change the figure
    res1 = eval_model(d, data, max_length=MAX_LEN, batch_size=1, progress=False)
    assert res1["results"][0]["ppl"] == pytest.approx(full["ppl"], rel=1e-5)


def test_restricted_eval_equals_eval_of_trimmed_model(tiny_dir, data, tmp_path):
    from moesift.apply.trim import trim

    d = tiny_dir("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    rng = random.Random(0)
    resident = {layer: sorted(rng.sample(range(spec.n_experts), 4)) for layer in spec.moe_layers}
    out = trim(d, resident, tmp_path / "trimmed", progress=False)
    restricted = eval_model(d, data, plans=[resident], max_length=MAX_LEN, batch_size=4, progress=False)
    trimmed = eval_model(out, data, max_length=MAX_LEN, batch_size=4, progress=False)
    r = _by_name(restricted)
    assert r["plan 1"]["ppl"] == pytest.approx(trimmed["results"][0]["ppl"], rel=1e-6)
    assert r["plan 1"]["ppl"] != pytest.approx(r["full"]["ppl"], rel=1e-6)  # the restriction did something
    assert r["plan 1"]["mean_active"] == pytest.approx(spec.top_k)


def test_top_k(tiny_dir, data):
    d = tiny_dir("qwen3_moe")
    res = _by_name(eval_model(d, data, top_k=[2, 1, 4], max_length=MAX_LEN, progress=False))
    assert res["top-k 2"]["ppl"] == res["full"]["ppl"]  # K = the model's own top-k: the same computation
    assert res["top-k 1"]["ppl"] != pytest.approx(res["full"]["ppl"], rel=1e-7)
    assert res["top-k 4"]["ppl"] != pytest.approx(res["full"]["ppl"], rel=1e-7)
    assert [res[f"top-k {k}"]["mean_active"] for k in (1, 2, 4)] == [1.0, 2.0, 4.0]
    with pytest.raises(MoesiftError):
        eval_model(d, data, top_k=[9], max_length=MAX_LEN, progress=False)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_top_p_extremes(tiny_dir, data, model_type):
    try:
        d = tiny_dir(model_type)
        adapter_for(json.loads((d / "config.json").read_text()))
    except (KeyError, MoesiftError):
        pytest.skip(f"no {model_type} adapter or tiny model")
    res = _by_name(eval_model(d, data, top_p=[1.0, 1e-6], top_k=[1], max_length=MAX_LEN, progress=False))
    cfg = json.loads((d / "config.json").read_text())
    n_experts = adapter_for(cfg).spec(cfg).n_experts
    assert res["top-p 1"]["mean_active"] == pytest.approx(n_experts)
    assert res["top-p 1e-06"]["mean_active"] == pytest.approx(1.0)
    assert math.isfinite(res["top-p 1"]["ppl"]) and math.isfinite(res["top-p 1e-06"]["ppl"])
    if model_type == "qwen3_moe":
        # softmax router, renormalised top-k: the single most probable expert with weight 1 is top-k 1
        assert res["top-p 1e-06"]["ppl"] == pytest.approx(res["top-k 1"]["ppl"], rel=1e-6)


def test_reroute_with_the_models_own_top_k_is_the_full_model(tiny_dir):
    """The generic rerouting path weights a selection exactly as the family does: choosing the top-k
    experts by probability through it reproduces the model's logits (softmax router without bias)."""
    model = _load(tiny_dir("qwen3_moe"))
    ad = adapter_for(model.config)
    k = ad.spec(model.config).top_k

    def choose(_m, probs):
        ids = torch.topk(probs, k, dim=-1).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)

    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with ad.reroute(model, choose):
            got = model(input_ids=x).logits
        after = model(input_ids=x).logits
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert torch.equal(after, ref)  # hooks removed


def test_top_p_chooser_sets():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]])
    ids, active = top_p_chooser(0.8)(0, probs)
    sizes = active.sum(-1).tolist()
    assert sizes == [2, 1, 4]  # 0.5+0.3 reaches 0.8; 0.8 alone; uniform needs all four (0.75 < 0.8)
    assert ids[0, :2].tolist() == [0, 1] and ids[1, 0].item() == 3
    # sigmoid-style scores that do not sum to one are normalised first
    ids, active = top_p_chooser(0.6)(0, torch.tensor([[0.9, 0.9, 0.1, 0.1]]))
    assert active.sum().item() == 2  # 0.45 + 0.45; unnormalised, 0.9 alone would reach 0.6


def test_text_data_needs_a_tokenizer(tiny_dir, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "hello world"}) + "\n")
    with pytest.raises(MoesiftError, match="input_ids"):
        eval_model(tiny_dir("qwen3_moe"), p, progress=False)


def test_cli_eval_json(tiny_dir, data):
    from typer.testing import CliRunner

    from moesift.cli import app

    d = tiny_dir("qwen3_moe")
    r = CliRunner().invoke(app, ["eval", str(d), "--data", str(data), "--top-k", "1,2", "--top-p", "0.5",
                                 "--max-length", str(MAX_LEN), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [x["name"] for x in out["results"]] == ["full", "top-k 1", "top-k 2", "top-p 0.5"]
    assert out["results"][2]["ppl"] == out["results"][0]["ppl"]
