"""verify: the restricted full model against the trimmed model, through the CLI and the Python API."""

from __future__ import annotations

import json
import shutil

import pytest
from hostile import run_cli
from test_trim import plan_for

from moesift.apply.trim import trim
from moesift.evaluation.verify import verify
from moesift.formats.checkpoint import CheckpointIndex


def _with_tokenizer(src, dst):
    """A copy of a tiny model with a word-level tokenizer over its vocabulary ("w1" .. "wN")."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(dst)
    return dst


@pytest.fixture
def qwen_tok(tiny_dir, tmp_path):
    return _with_tokenizer(tiny_dir("qwen3_moe"), tmp_path / "src")


def test_verify_cli_on_held_out_text(qwen_tok, tmp_path, monkeypatch, capsys):
    spec = CheckpointIndex.build(qwen_tok).spec
    out = trim(qwen_tok, plan_for(spec, uniform=True), tmp_path / "t", progress=False)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 90 + 2}" for j in range(12))})
                              for i in range(4)) + "\n")
    code, stdout, err = run_cli(["verify", str(qwen_tok), str(out), "--data", str(data), "--max-new-tokens", "6",
                                 "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(stdout)
    for key in ("top1_agreement", "max_abs_logit_diff", "max_rel_logit_diff", "generations_identical"):
        assert key in r
    assert r["top1_agreement"] == 1.0 and r["generations_identical"] is True
    assert r["max_abs_logit_diff"] <= 1e-5 and r["data"]["kind"] == "files" and r["prompts"] == 4
    assert r["tokens"] == 4 * 12
    assert r["params_trimmed"] < r["params_full"]


def test_verify_nonuniform_with_random_prompts(tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    res = plan_for(spec, uniform=False)
    out = trim(src, res, tmp_path / "t", progress=False)
    r = verify(src, out, max_new_tokens=4, max_samples=3)
    assert r["ok"] and r["data"]["kind"] == "random" and "no --data" in r["data"]["note"]
    assert r["prompts"] == 3 and r["top1_agreement"] == 1.0 and r["max_rel_logit_diff"] <= 1e-6


def test_verify_detects_a_different_plan(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    out = trim(src, plan_for(spec, uniform=True, seed=0), tmp_path / "t", progress=False)
    other = {layer: [i for i in range(spec.n_experts) if i not in ids][: len(ids)]
             for layer, ids in plan_for(spec, uniform=True, seed=0).items()}
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"schema": "moesift-plan/1", "model": {},
                             "layers": [{"layer": k, "resident": v} for k, v in other.items()]}))
    code, stdout, err = run_cli(["verify", str(src), str(out), "--plan", str(p), "--max-new-tokens", "4", "--json"],
                                monkeypatch, capsys)
    assert code == 1, err
    r = json.loads(stdout)
    assert not r["ok"] and (r["top1_agreement"] < 1.0 or not r["generations_identical"])
    assert r["max_abs_logit_diff"] > 1e-3


def test_verify_needs_a_plan(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    code, _, err = run_cli(["verify", str(src), str(plain)], monkeypatch, capsys)
    assert code == 2 and "--plan" in err
