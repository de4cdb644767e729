"""verify --engine llama.cpp: uniform trims converted to F32 GGUF by llama.cpp's own converter and run by
llama-cpp-python match the restricted full model. llama-cpp-python builds llama.cpp from source (too slow for
CI), and its converter comes from a llama.cpp tree named by MOESIFT_LLAMA_CPP: without both these tests skip;
bench/engines.py sets them up and runs them."""

from __future__ import annotations

import sys

import pytest
from engine_models import ENGINE_FAMILIES, engine_model, needs_llama
from hostile import cli_one_error_line, run_cli
from test_trim import plan_for

from moesift.apply.trim import trim
from moesift.core.errors import MoesiftError
from moesift.evaluation.verify import verify
from moesift.formats.checkpoint import CheckpointIndex


def test_missing_extra_names_it(tiny_dir, tmp_path, monkeypatch, capsys):
    """Runs everywhere: with llama_cpp hidden, --engine llama.cpp says which extra to install."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    cli_one_error_line(["verify", str(tiny_dir("olmoe")), str(tmp_path), "--engine", "llama.cpp"], monkeypatch, capsys,
                       "moesift[gguf]", "'llama_cpp'")


def _uniform_trim(src, out):
    return trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=True), out, progress=False)


@needs_llama
@pytest.mark.parametrize("model_type", sorted(ENGINE_FAMILIES["llama.cpp"]))
def test_uniform_trim_runs_in_llamacpp_like_restricted_model(model_type, llama, tmp_path):
    src = engine_model("llama.cpp", model_type, tmp_path / "src", tokenizer=True)
    out = _uniform_trim(src, tmp_path / "t")
    r = verify(src, out, max_new_tokens=5, max_samples=2, progress=False, engine="llama.cpp")
    assert r["engine"].startswith("llama.cpp")
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["generations_identical"], r
    assert r["max_rel_logit_diff"] <= 1e-5


@needs_llama
def test_bundled_qwen3_trim_runs_in_llamacpp(llama, tmp_path, monkeypatch, capsys):
    import json

    from moesift.assets import reference_model

    d = reference_model("qwen3moe-ref")
    out = _uniform_trim(d, tmp_path / "t")
    code, stdout, err = run_cli(["verify", str(d), str(out), "--engine", "llama.cpp", "--max-samples", "2",
                                 "--max-new-tokens", "4", "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["ok"] and r["max_rel_logit_diff"] <= 1e-5
    # the bundled tokenizer is moesift's own byte-level BPE, whose pre-tokenizer llama.cpp does not know
    assert any("pre-tokenizer" in n for n in r["engine_notes"]), r["engine_notes"]


@needs_llama
def test_llamacpp_catches_a_wrong_trim(llama, tmp_path):
    src = engine_model("llama.cpp", "olmoe", tmp_path / "src", tokenizer=True)
    spec = CheckpointIndex.build(src).spec
    out = _uniform_trim(src, tmp_path / "t")
    other = {layer: [e for e in range(spec.n_experts) if e not in ids] for layer, ids in plan_for(spec, True).items()}
    r = verify(src, out, plan=other, max_new_tokens=3, max_samples=2, progress=False, engine="llama.cpp")
    assert not r["ok"] and r["max_rel_logit_diff"] > 1e-2


@needs_llama
def test_what_llamacpp_cannot_run_is_one_line(llama, tiny_dir, tmp_path, monkeypatch, capsys):
    from moesift.assets import reference_model

    d = reference_model("deepseekv3-ref")  # no q_lora_rank
    out = _uniform_trim(d, tmp_path / "ds")
    cli_one_error_line(["verify", str(d), str(out), "--engine", "llama.cpp"], monkeypatch, capsys, "q_lora_rank")
    src = tiny_dir("qwen3_moe")  # a dense layer
    out = _uniform_trim(src, tmp_path / "q")
    cli_one_error_line(["verify", str(src), str(out), "--engine", "llama.cpp"], monkeypatch, capsys, "dense layers")
    out = trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=False), tmp_path / "nu", progress=False)
    cli_one_error_line(["verify", str(src), str(out), "--engine", "llama.cpp"], monkeypatch, capsys, "--uniform")


@needs_llama
def test_missing_converter_or_tokenizer_is_one_line(llama, tmp_path, monkeypatch, capsys):
    src = engine_model("llama.cpp", "olmoe", tmp_path / "src")  # no tokenizer files
    out = _uniform_trim(src, tmp_path / "t")
    cli_one_error_line(["verify", str(src), str(out), "--engine", "llama.cpp"], monkeypatch, capsys, "tokenizer")
    monkeypatch.setenv("MOESIFT_LLAMA_CPP", str(tmp_path))
    with pytest.raises(MoesiftError, match="convert_hf_to_gguf.py"):
        verify(src, out, engine="llama.cpp", progress=False)
