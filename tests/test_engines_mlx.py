"""verify --engine mlx: uniform trims of every family mlx-lm implements run in mlx-lm (float32) and match the
restricted full model in transformers; the bundled models load in mlx-lm; what mlx-lm cannot run is one
error line."""

from __future__ import annotations

import json
import sys

import pytest
from engine_models import ENGINE_FAMILIES, engine_model
from hostile import cli_one_error_line, run_cli
from test_trim import plan_for

from moesift.apply.trim import trim
from moesift.core.errors import MoesiftError
from moesift.evaluation.verify import verify
from moesift.formats.checkpoint import CheckpointIndex

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

FAMILIES = ENGINE_FAMILIES["mlx"]  # family -> config overrides its tiny model needs in mlx-lm


def _uniform_trim(src, out):
    return trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=True), out, progress=False)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_uniform_trim_runs_in_mlx_like_restricted_model(model_type, tiny_dir, tmp_path):
    from moesift.engines.mlx import implemented_model_types

    assert model_type in implemented_model_types()
    if FAMILIES[model_type]:
        src = engine_model("mlx", model_type, tmp_path / "src")
    else:
        src = tiny_dir(model_type)
    out = _uniform_trim(src, tmp_path / "t")
    r = verify(src, out, max_new_tokens=5, max_samples=2, progress=False, engine="mlx")
    assert r["engine"].startswith("mlx-lm ")
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["generations_identical"], r
    assert r["max_rel_logit_diff"] <= 1e-5 and r["params_trimmed"] < r["params_full"]


def test_mlx_catches_a_wrong_trim(tiny_dir, tmp_path):
    """The engine comparison can fail: a checkpoint trimmed to other experts than the plan it records."""
    src = tiny_dir("olmoe")
    spec = CheckpointIndex.build(src).spec
    out = _uniform_trim(src, tmp_path / "t")
    other = {layer: [e for e in range(spec.n_experts) if e not in ids] for layer, ids in plan_for(spec, True).items()}
    r = verify(src, out, plan=other, max_new_tokens=4, max_samples=2, progress=False, engine="mlx")
    assert not r["ok"] and r["top1_agreement"] < 1.0 and r["max_rel_logit_diff"] > 1e-2


@pytest.mark.parametrize("name", ["qwen3moe-ref", "deepseekv3-ref"])
def test_bundled_models_load_in_mlx_and_their_trims_verify(name, tmp_path, monkeypatch, capsys):
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    from moesift.assets import reference_model

    d = reference_model(name)
    model, _ = load_model(d)
    model.set_dtype(mx.float32)
    x = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(x).logits[0].numpy()
    got = np.array(model(mx.array(x.numpy()))[0])
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-5
    out = _uniform_trim(d, tmp_path / "t")
    code, stdout, err = run_cli(["verify", str(d), str(out), "--engine", "mlx", "--max-samples", "2",
                                 "--max-new-tokens", "4", "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["ok"] and r["max_rel_logit_diff"] <= 1e-5 and r["engine"].startswith("mlx-lm")


def test_cli_json_has_the_keys_of_the_transformers_check(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    out = _uniform_trim(src, tmp_path / "t")
    res = {}
    for engine in ("transformers", "mlx"):
        code, stdout, err = run_cli(["verify", str(src), str(out), "--engine", engine, "--max-samples", "2",
                                     "--max-new-tokens", "3", "--json"], monkeypatch, capsys)
        assert code == 0, err
        res[engine] = json.loads(stdout)
    assert set(res["mlx"]) == set(res["transformers"])
    assert res["transformers"]["engine"] == "transformers" and res["mlx"]["tokens"] == res["transformers"]["tokens"]
    code, stdout, err = run_cli(["verify", str(src), str(out), "--engine", "mlx", "--max-samples", "1",
                                 "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 0 and "mlx-lm" in stdout and "OK" in stdout


def test_nonuniform_trim_is_refused_in_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir("qwen3_moe")
    out = trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=False), tmp_path / "t", progress=False)
    cli_one_error_line(["verify", str(src), str(out), "--engine", "mlx"], monkeypatch, capsys,
                       "different number of experts per layer", "--uniform")


@pytest.mark.parametrize("model_type,needle", [
    ("qwen2_moe", "dense layers"),  # mlx-lm's qwen2_moe has no dense layers
    ("gpt_oss", "MXFP4"),  # mlx-lm reads gpt-oss experts only as the released MXFP4 blocks
    ("granitemoeshared", "no implementation"),  # no mlx-lm module
])
def test_what_mlx_cannot_run_is_one_line(model_type, needle, tiny_dir, tmp_path, monkeypatch, capsys):
    src = tiny_dir(model_type)
    out = _uniform_trim(src, tmp_path / "t")
    cli_one_error_line(["verify", str(src), str(out), "--engine", "mlx"], monkeypatch, capsys, needle)


@pytest.mark.parametrize("hidden", ["mlx_lm", "mlx"])
def test_missing_extra_names_it(hidden, tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, hidden, None)  # import of a None entry raises ImportError
    line = cli_one_error_line(["verify", str(tiny_dir("olmoe")), str(tmp_path / "nowhere"), "--engine", "mlx"],
                              monkeypatch, capsys, "moesift[mlx]", repr(hidden))
    assert "Traceback" not in line
    with pytest.raises(MoesiftError, match=r"moesift\[mlx\]"):
        verify(tiny_dir("olmoe"), tmp_path / "nowhere", engine="mlx")


def test_unknown_engine(tiny_dir, tmp_path, monkeypatch, capsys):
    cli_one_error_line(["verify", str(tiny_dir("olmoe")), str(tmp_path), "--engine", "vllm"], monkeypatch, capsys,
                       "unknown engine", "mlx", "llama.cpp")
