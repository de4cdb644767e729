"""`moesift trace / show / merge / export` through the command line: contract fields, round trips, and one
clear error line (exit code 2, no traceback, nothing written) for each bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import WCER_DIR

import moesift
from moesift.cli import main

WCER_FILE = WCER_DIR / "Mixtral-8x7B-Instruct-v0.1-4bit-trace-code.json"


def run(args, capsys, monkeypatch):
    """(exit code, stdout, stderr) of `moesift ARGS` run in this process."""
    capsys.readouterr()  # drop what earlier calls printed
    monkeypatch.setattr(sys, "argv", ["moesift", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def wl(tmp_path_factory):
    d = tmp_path_factory.mktemp("cliwl")
    rng = random.Random(3)
    for name, n in (("a", 5), ("b", 4)):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps({"input_ids": [rng.randrange(96) for _ in range(rng.randrange(4, 12))]}) + "\n"
                    for _ in range(n))
        )
    return d


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _assert_error(code, out, err, match, where: Path | None = None, name: str | None = None):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesift: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    if where is not None:
        leftovers = [p.name for p in where.iterdir() if name and name in p.name]
        assert leftovers == [], f"half-written files: {leftovers}"


def test_trace_show_merge_export(tiny_dir, wl, tmp_path, capsys, monkeypatch):
    d = tiny_dir("qwen3_moe")
    ta, tb = tmp_path / "a.trace", tmp_path / "b.trace"
    code, out, err = run(["trace", d, "--data", wl / "a.jsonl", "--out", ta, "--label", "A", "--batch-size", 2,
                          "--folds", 2, "--log-routing", "--json"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["workload"]["label"] == "A" and summary["arrays"]["fold_counts"][0] == 2
    code, out, err = run(["trace", d, "--data", wl / "b.jsonl", "--out", tb, "--max-samples", 3, "--generate", 2,
                          "--folds", 2, "--log-routing", "--max-length", 6], capsys, monkeypatch)
    assert code == 0, err
    assert "traced 3 documents" in out

    code, out, err = run(["show", ta, "--json"], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads(out)
    a = moesift.Trace.load(ta)
    assert info["schema"] == "moesift-trace/1"
    assert info["model"]["model_type"] == "qwen3_moe"
    assert info["model"]["n_layers"] == len(a.model["moe_layers"]) == 2
    assert info["model"]["n_experts"] == 8 and info["model"]["top_k"] == 2
    w = info["workload"]
    assert w["label"] == "A" and w["documents"] == 5 and w["decode_tokens"] == 0
    assert w["prefill_tokens"] == a.workload["prefill_tokens"] > 0
    assert info["counts"] == a.counts.tolist()
    assert all(sum(row) == w["prefill_tokens"] * 2 for row in info["counts"])
    b = moesift.Trace.load(tb)
    assert b.workload["documents"] == 3 and b.workload["decode_tokens"] == 3  # 2 new tokens: 1 fed back each
    assert b.workload["prefill_tokens"] <= 3 * 6

    code, out, err = run(["show", ta], capsys, monkeypatch)  # the table
    assert code == 0 and "per MoE layer" in out

    merged = tmp_path / "ab.trace"
    code, out, err = run(["merge", ta, tb, "--out", merged, "--label", "AB", "--json"], capsys, monkeypatch)
    assert code == 0, err
    m = moesift.Trace.load(merged)
    np.testing.assert_array_equal(m.counts, a.counts + b.counts)
    np.testing.assert_array_equal(m.arrays["fold_counts"], a.arrays["fold_counts"] + b.arrays["fold_counts"])
    assert m.label == "AB" and m.workload["documents"] == 8
    assert m.arrays["routing_log"].shape[0] == a.arrays["routing_log"].shape[0] + b.arrays["routing_log"].shape[0]
    assert int(m.arrays["doc_offsets"][-1]) == m.arrays["routing_log"].shape[0]

    ex = tmp_path / "ab.json"
    code, out, err = run(["export", merged, "--out", ex, "--format", "expert-trace/1"], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run(["show", ex, "--json"], capsys, monkeypatch)
    back = json.loads(out)
    assert back["counts"] == m.counts.tolist() and back["model"]["top_k"] == 2
    assert back["workload"]["prefill_tokens"] == m.workload["prefill_tokens"]
    assert back["workload"]["decode_tokens"] == m.workload["decode_tokens"]
    pairs = json.loads(ex.read_text())["coactivation_top_pairs_per_layer"]
    co = m.arrays["coactivation"]
    assert all(co[layer, i, j] == c for layer, p in enumerate(pairs) for i, j, c in p)
    cp = tmp_path / "copy.trace"
    code, out, err = run(["export", merged, "--out", cp, "--format", "moesift-trace/1"], capsys, monkeypatch)
    assert code == 0, err
    np.testing.assert_array_equal(moesift.Trace.load(cp).arrays["transitions"], m.arrays["transitions"])


def test_merge_refuses_different_models(tiny_dir, wl, tmp_path, capsys, monkeypatch):
    ta = tmp_path / "a.trace"
    moesift.trace(str(tiny_dir("qwen3_moe")), wl / "a.jsonl", out=ta, progress=False)
    out = tmp_path / "m.trace"
    _assert_error(*run(["merge", ta, WCER_FILE, "--out", out], capsys, monkeypatch), "different models",
                  tmp_path, "m.trace")
    assert not out.exists()


def test_bad_inputs(tiny_dir, dense_dir, wl, tmp_path, capsys, monkeypatch):
    d = tiny_dir("qwen3_moe")
    data = wl / "a.jsonl"
    out = tmp_path / "t.trace"

    def check(args, match):
        _assert_error(*run(args, capsys, monkeypatch), match, tmp_path, "t.trace")
        assert not out.exists()

    check(["trace", d, "--data", tmp_path / "nope.jsonl", "--out", out], "not found")
    check(["trace", tmp_path / "no-model", "--data", data, "--out", out], "not found")
    check(["trace", dense_dir, "--data", data, "--out", out], "not a supported MoE family")
    (tmp_path / "w.csv").write_text("a,b\n")
    check(["trace", d, "--data", tmp_path / "w.csv", "--out", out], "unknown extension")
    (tmp_path / "empty.jsonl").write_text("\n")
    check(["trace", d, "--data", tmp_path / "empty.jsonl", "--out", out], "holds no documents")
    (tmp_path / "nofield.jsonl").write_text('{"input_ids": [1, 2]}\n{"body": "x"}\n')
    check(["trace", d, "--data", tmp_path / "nofield.jsonl", "--out", out], "line 2")
    check(["trace", d, "--data", data, "--out", tmp_path / "missing-dir" / "t.trace"], "does not exist")
    check(["trace", d, "--data", data, "--out", out, "--batch-size", 0], "batch_size")
    check(["show", tmp_path / "nope.trace"], "not found")
    (tmp_path / "junk.trace").write_bytes(b"\x00" * 32)
    check(["show", tmp_path / "junk.trace"], "not a moesift trace")
    check(["export", WCER_FILE, "--out", tmp_path / "x.json", "--format", "csv"], "unknown export format")

    out.write_bytes(b"keep me")
    _assert_error(*run(["trace", d, "--data", data, "--out", out], capsys, monkeypatch), "already exists")
    assert out.read_bytes() == b"keep me"
    code, _, err = run(["trace", d, "--data", data, "--out", out, "--force"], capsys, monkeypatch)
    assert code == 0, err
    assert moesift.Trace.load(out).workload["documents"] == 5


def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "moesift.cli", "show", str(tmp_path / "missing.trace"), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("moesift: error: ") and "Traceback" not in r.stderr
