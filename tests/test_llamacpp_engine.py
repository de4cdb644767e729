"""trace / eval / sweep --engine llama.cpp: a GGUF file run in llama-cpp-python, its routing read with
llama.cpp's graph evaluation callback. On F32 GGUF files converted by llama.cpp's own converter from tiny
transformers models, the trace counts and the perplexities equal the transformers ones. llama-cpp-python builds
llama.cpp from source (too slow for CI) and the converter comes from a llama.cpp tree named by
MOESIFT_LLAMA_CPP: without both the engine tests skip (bench/engines.py --tests runs them); the error-path
tests run everywhere."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from engine_models import engine_model, needs_llama
from hostile import cli_one_error_line, run_cli
from test_trim import plan_for

from moesift.formats.checkpoint import CheckpointIndex


def _workload(path, n=4):
    lines = ["the quick brown fox jumps over the lazy dog " * 3, "def f(x): return x + 1 " * 4,
             "the lazy dog and the quick fox", "return the brown fox over x"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:n]))
    return path


def test_missing_llama_cpp_names_the_extra(tmp_path, monkeypatch, capsys):
    """Runs everywhere: with llama_cpp hidden, a GGUF file traced or evaluated says which extra to install."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    data = _workload(tmp_path / "w.jsonl")
    for cmd in (["trace", str(tmp_path / "m.gguf"), "--data", str(data)],
                ["eval", str(tmp_path / "m.gguf"), "--data", str(data), "--engine", "llama.cpp"]):
        cli_one_error_line(cmd, monkeypatch, capsys, "moesift[gguf]", "'llama_cpp'")


def test_what_llamacpp_tracing_refuses_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """Runs everywhere: the checks made before llama.cpp is needed."""
    data = _workload(tmp_path / "w.jsonl")
    cli_one_error_line(["trace", str(tiny_dir("olmoe")), "--data", str(data), "--engine", "llama.cpp"], monkeypatch,
                       capsys, "GGUF file")
    cli_one_error_line(["trace", str(tmp_path / "m.gguf"), "--data", str(data), "--saliency"], monkeypatch, capsys,
                       "--saliency")
    cli_one_error_line(["eval", str(tmp_path / "m.gguf"), "--data", str(data), "--top-p", "0.5"], monkeypatch, capsys,
                       "--top-p")
    cli_one_error_line(["eval", str(tmp_path / "m.gguf"), "--data", str(data), "--dtype", "bfloat16"], monkeypatch,
                       capsys, "--dtype")


def _f32_gguf(model_type, tmp_path):
    """(transformers checkpoint, its F32 GGUF conversion by llama.cpp's converter)."""
    from moesift.engines.llamacpp import convert

    src = engine_model("llama.cpp", model_type, tmp_path / "src", tokenizer=True)
    out = tmp_path / "model-f32.gguf"
    convert(src, out)
    return src, out


@needs_llama
@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "mixtral", "deepseek_v3"])
def test_trace_counts_equal_transformers_on_f32(model_type, llama, tmp_path):
    from moesift.formats.trace import merge
    from moesift.record.tracer import trace

    src, gguf_file = _f32_gguf(model_type, tmp_path)
    data = _workload(tmp_path / "w.jsonl")
    kw = dict(max_length=32, generate=3, folds=2, log_routing=True, progress=False)
    ref = trace(src, data, device="cpu", dtype="float32", **kw)
    got = trace(gguf_file, data, engine="llama.cpp", hf_model=src, **kw)
    assert got.model_key() == ref.model_key()
    assert got.workload["token_sha256"] == ref.workload["token_sha256"]
    for name in ("prefill_counts", "decode_counts", "fold_counts", "coactivation", "transitions"):
        np.testing.assert_array_equal(got.arrays[name], ref.arrays[name], err_msg=name)
    assert got.workload["decode_tokens"] == ref.workload["decode_tokens"] > 0
    np.testing.assert_array_equal(got.arrays["routing_log"], ref.arrays["routing_log"])
    np.testing.assert_allclose(got.arrays["weight_mass"], ref.arrays["weight_mass"], rtol=1e-4)
    np.testing.assert_allclose(got.arrays["prob_mass"], ref.arrays["prob_mass"], rtol=1e-4)
    assert merge([ref, got]).counts.sum() == 2 * ref.counts.sum()


@needs_llama
def test_trace_without_hf_model_uses_the_files_tokenizer_and_metadata(llama, tmp_path):
    from moesift.record.tracer import trace

    _, gguf_file = _f32_gguf("olmoe", tmp_path)
    t = trace(gguf_file, _workload(tmp_path / "w.jsonl"), max_length=32, progress=False)
    assert t.model["model_type"] == "olmoe" and t.model["config"]["general.architecture"] == "olmoe"
    assert t.counts.sum() == t.workload["prefill_tokens"] * t.top_k * t.n_layers > 0
    assert t.tool["config_from"] == "GGUF metadata"


@needs_llama
def test_eval_perplexity_equals_transformers_on_f32(llama, tmp_path, monkeypatch, capsys):
    from moesift.evaluation.evaluate import eval_model

    src, gguf_file = _f32_gguf("qwen3_moe", tmp_path)
    data = _workload(tmp_path / "w.jsonl")
    plan = plan_for(CheckpointIndex.build(src).spec, uniform=True)
    ref = eval_model(src, data, plans=[plan], top_k=[1], max_length=16, device="cpu", dtype="float32",
                     progress=False)
    got = eval_model(gguf_file, data, plans=[plan], top_k=[1], max_length=16, engine="llama.cpp", hf_model=src,
                     progress=False)
    assert got["windows"] == ref["windows"] and got["tokens"] == ref["tokens"]
    for a, b in zip(got["results"], ref["results"], strict=True):
        assert a["name"] == b["name"]
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-6), (a["name"], a["ppl"], b["ppl"])
    full, trimmed, top1 = got["results"]
    assert top1["mean_active"] == 1.0 and top1["ppl"] != full["ppl"]  # the override changed the count used
    assert trimmed["bytes"] < full["bytes"] and trimmed["experts"] < full["experts"]
    assert full["prefill_tokens_per_s"] > 0 and full["decode_tokens_per_s"] > 0
    code, out, err = run_cli(["eval", str(gguf_file), "--data", str(data), "--max-length", "16", "--top-k", "1",
                              "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["engine"].startswith("llama.cpp") and [x["name"] for x in r["results"]] == ["full", "top-k 1"]


@needs_llama
def test_sweep_trims_the_gguf_file_per_budget(llama, tmp_path):
    from moesift.evaluation.sweep import sweep
    from moesift.record.tracer import trace

    src, gguf_file = _f32_gguf("olmoe", tmp_path)
    t = trace(gguf_file, _workload(tmp_path / "w.jsonl"), max_length=32, hf_model=src, progress=False)
    data = _workload(tmp_path / "e.jsonl", 2)
    r = sweep(gguf_file, [t], data, keep="0.5", strategy="frequency,calibrated", max_length=16, hf_model=src,
              json=True, progress=False)
    full, half = r["points"]
    assert (full["strategy"], half["strategy"], half["keep"]) == ("full", "frequency", 0.5)
    assert half["bytes"] < full["bytes"] and half["experts_resident"] == t.n_experts // 2
    assert half["ppl"] > 0 and half["decode_tokens_per_s"] > 0 and r["skipped"][0]["strategy"] == "calibrated"
