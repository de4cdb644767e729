"""Multi-token-prediction layers (DeepSeek-V3/R1, GLM-4.5: `num_nextn_predict_layers` > 0, stored after the
last decoder layer): a trim that removes experts leaves them out and sets their count to 0, so every expert
tensor of the result agrees with the rewritten config; `moe_layer_freq` decides which layers are MoE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moesift
from moesift.arch import adapter_for
from moesift.formats.checkpoint import CheckpointIndex


def _with_mtp(src: Path, dst: Path) -> Path:
    """A copy of `src` whose checkpoint also stores one MTP layer (a copy of the last decoder layer under the
    next index, plus the MTP head's own projection and norms), as hub DeepSeek-V3 files do."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    files = sorted(dst.glob("*.safetensors"))
    assert len(files) == 1, "the tiny model is saved in one file"
    tensors = load_file(files[0])
    prefix = f"model.layers.{n - 1}."
    for name, a in list(tensors.items()):
        if name.startswith(prefix):
            tensors[f"model.layers.{n}." + name[len(prefix):]] = a.copy()
    h = cfg["hidden_size"]
    norm = tensors[f"{prefix}input_layernorm.weight"]
    tensors[f"model.layers.{n}.eh_proj.weight"] = np.zeros((h, 2 * h), dtype=norm.dtype)  # [h, 2h] as on the hub
    tensors[f"model.layers.{n}.enorm.weight"] = tensors[f"{prefix}input_layernorm.weight"].copy()
    tensors[f"model.layers.{n}.hnorm.weight"] = tensors[f"{prefix}input_layernorm.weight"].copy()
    save_file(tensors, files[0], metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def mtp_model(tiny_dir, tmp_path):
    return _with_mtp(tiny_dir("deepseek_v3"), tmp_path / "v3-mtp")


def test_mtp_tensors_are_their_own_kind(mtp_model):
    idx = CheckpointIndex.build(mtp_model)
    n = idx.config["num_hidden_layers"]
    mtp = [t for t in idx.tensors if t.role.kind == "mtp"]
    assert mtp and all(t.role.layer == n for t in mtp)
    assert idx.adapter.mtp_layers(idx.config) == (n,)
    assert n not in idx.spec.moe_layers
    idx.check_consistent()


def test_trim_leaves_out_mtp_layers_and_says_so(mtp_model, tmp_path):
    idx = CheckpointIndex.build(mtp_model)
    spec = idx.spec
    keep = {layer: list(range(spec.n_experts // 2)) for layer in spec.moe_layers}
    out = moesift.trim(mtp_model, keep, tmp_path / "t", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    assert cfg["n_routed_experts"] == spec.n_experts // 2
    trimmed = CheckpointIndex.build(out)
    trimmed.check_consistent()  # every expert and router tensor agrees with the rewritten config
    n = idx.config["num_hidden_layers"]
    assert not [t.name for t in trimmed.tensors if t.name.startswith(f"model.layers.{n}.")]
    rec = json.loads((out / "moesift_plan.json").read_text())
    assert rec["dropped_mtp_layers"] == [n]
    assert rec["tensor_bytes"] == rec["predicted_bytes"] == idx.predicted_bytes(keep)
    model, _ = moesift.load_trimmed(out, device="cpu")
    assert model.config.num_nextn_predict_layers == 0


def test_a_trim_that_keeps_every_expert_keeps_mtp_layers(mtp_model, tmp_path):
    idx = CheckpointIndex.build(mtp_model)
    spec = idx.spec
    out = moesift.trim(mtp_model, {la: list(range(spec.n_experts)) for la in spec.moe_layers}, tmp_path / "t",
                       progress=False)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert any(t.role.kind == "mtp" for t in CheckpointIndex.build(out).tensors)


def test_moe_layer_freq_decides_which_layers_are_moe():
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2,
           "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}
    assert adapter_for(cfg).spec(cfg).moe_layers == (2, 4)
    cfg["moe_layer_freq"] = 1
    assert adapter_for(cfg).spec(cfg).moe_layers == (1, 2, 3, 4, 5)
