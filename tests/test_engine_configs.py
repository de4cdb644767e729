"""A model saved by transformers 5 (tie_word_embeddings true, the rope base only under rope_parameters) is
refused by `verify --engine mlx` before anything runs, naming both conditions, and `trim --engine-config`
writes what mlx-lm reads (top-level rope_theta, a stored lm_head.weight), so the trim runs in mlx-lm and
matches the restricted full model."""

from __future__ import annotations

import json

import pytest
from hostile import assert_one_error, half_plan, plan_file, run_cli

import moesift
from moesift.formats.checkpoint import CheckpointIndex

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")


def _transformers5_qwen2_moe(directory):
    """A tiny Qwen2-MoE as transformers 5 saves a fine-tune: tied output, rope only in rope_parameters."""
    from tiny import build

    m = build("qwen2_moe", tie_word_embeddings=True, mlp_only_layers=[])
    m.config.rope_parameters = {"rope_type": "default", "rope_theta": 12345.0}
    m.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.pop("rope_theta", None)
    assert cfg["tie_word_embeddings"] and cfg["rope_parameters"]["rope_theta"] == 12345.0
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_mlx_names_both_conditions_and_engine_config_fixes_them(tmp_path, monkeypatch, capsys):
    src = _transformers5_qwen2_moe(tmp_path / "src")
    plan = plan_file(tmp_path / "p.json", half_plan(CheckpointIndex.build(src).spec))
    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", tmp_path / "plain"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["verify", src, tmp_path / "plain", "--engine", "mlx"], monkeypatch, capsys)
    assert_one_error(code, err, "rope_parameters", "tie_word_embeddings", "--engine-config")

    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", tmp_path / "eng", "--engine-config"],
                           monkeypatch, capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "eng" / "config.json").read_text())
    assert cfg["rope_theta"] == 12345.0 and cfg["tie_word_embeddings"] is False
    idx = CheckpointIndex.build(tmp_path / "eng")
    assert "lm_head.weight" in {t.name for t in idx.tensors}
    rec = json.loads((tmp_path / "eng" / "moesift_plan.json").read_text())
    assert rec["tensor_bytes"] == rec["predicted_bytes"]
    r = moesift.verify(src, tmp_path / "eng", max_new_tokens=4, max_samples=2, progress=False, engine="mlx")
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["max_rel_logit_diff"] <= 1e-5, r
    r = moesift.verify(src, tmp_path / "eng", max_new_tokens=4, max_samples=2, progress=False)  # transformers too
    assert r["ok"], r
