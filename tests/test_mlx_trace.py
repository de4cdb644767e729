"""`moesift trace --engine mlx` on mlx-lm model folders made by mlx-lm's own converter (unquantized float32 and
4-bit) from tiny random transformers models of qwen3_moe, qwen2_moe, olmoe and mixtral: the unquantized
conversion's trace equals the transformers trace of the same weights; the 4-bit conversion's counts equal an
independent recount; MLX and transformers traces of one model merge and compare, of two models they do not;
bad input is one error line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from engine_models import MLX_SIZES, keep_router_outputs, mlx_convert, mlx_source, per_family
from hostile import assert_one_error, run_cli

import moesift
from moesift.core.errors import MoesiftError

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
SIZES = MLX_SIZES
BLOCK = {"qwen3_moe": "mlp", "qwen2_moe": "mlp", "olmoe": "mlp", "mixtral": "block_sparse_moe"}
BATCH = 4  # documents of different lengths per forward: right padding is exercised


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (root with hf/, f32/, q4/ and the workload w.jsonl, transformers trace)."""
    def build(mt, root):
        mlx_source(mt, root / "hf")
        rng = np.random.default_rng(1)
        (root / "w.jsonl").write_text("\n".join(
            json.dumps({"input_ids": [int(v) for v in rng.integers(0, 90, int(rng.integers(2, 28)))]})
            for _ in range(10)))
        mlx_convert(root / "hf", root, "f32", "q4")
        hf = moesift.trace(root / "hf", root / "w.jsonl", out=root / "hf.trace", batch_size=BATCH, folds=3,
                           log_routing=True, progress=False)
        return root, hf

    return per_family(tmp_path_factory, build)


@pytest.mark.parametrize("mt", FAMILIES)
def test_unquantized_mlx_trace_equals_transformers_trace(family, mt):
    root, hf = family(mt)
    t = moesift.trace(root / "f32", root / "w.jsonl", batch_size=BATCH, folds=3, log_routing=True, progress=False)
    assert t.tool["engine"].startswith("mlx-lm") and t.tool["weights"] == "unquantized weights"
    assert t.model["config_hash"] == hf.model["config_hash"] and t.workload == hf.workload
    for name in ("prefill_counts", "decode_counts", "fold_counts", "coactivation", "transitions", "routing_log",
                 "doc_offsets", "log_phase"):
        np.testing.assert_array_equal(t.arrays[name], hf.arrays[name], err_msg=name)
    assert hf.arrays["prefill_counts"].sum() == hf.workload["prefill_tokens"] * hf.top_k * hf.n_layers
    for name in ("weight_mass", "prob_mass", "selected_prob_mass"):
        np.testing.assert_allclose(t.arrays[name], hf.arrays[name], rtol=1e-4, atol=1e-4, err_msg=name)


def _recount(folder, mt: str, docs: list[list[int]], layers: list[int], E: int, K: int):
    """Counts and per-token selections, independently of moesift: the model loaded with mlx-lm's loader, each
    decoder layer's router module replaced by a test-local module that keeps its logits, one document per
    forward (no padding), top-k of the softmax by numpy's argsort, counts by np.bincount."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(folder, lazy=False, strict=True)
    model.set_dtype(mx.float32)
    n_layers = len(layers)
    seen = keep_router_outputs(model, layers, BLOCK[mt])
    sel = []
    for ids in docs:
        mx.eval(model(mx.array([ids])))
        per_layer = []
        for i in range(n_layers):
            logits = np.array(seen[i].pop().astype(mx.float32)).reshape(len(ids), E)
            p = np.exp(logits - logits.max(1, keepdims=True))
            per_layer.append(np.sort(np.argsort(-p, axis=1, kind="stable")[:, :K], axis=1))
        sel.append(np.stack(per_layer, axis=1))  # [tokens, L, K]
    sel = np.concatenate(sel)
    counts = np.stack([np.bincount(sel[:, i].reshape(-1), minlength=E) for i in range(n_layers)])
    return counts, sel


@pytest.mark.parametrize("mt", FAMILIES)
def test_4bit_counts_equal_independent_recount(family, mt):
    """Independent: the recount loads the folder itself, taps the routers with its own module, runs one
    document per forward (moesift pads batches of 4), ranks the softmax with numpy and counts with bincount;
    it shares neither moesift's router tap, its batching, nor its Recorder."""
    root, hf = family(mt)
    t = moesift.trace(root / "q4", root / "w.jsonl", batch_size=BATCH, log_routing=True, progress=False,
                      engine="mlx")
    assert t.tool["weights"] == "4-bit affine quantized weights (group size 64)"
    docs = [json.loads(line)["input_ids"] for line in (root / "w.jsonl").read_text().splitlines()]
    counts, sel = _recount(root / "q4", mt, docs, t.model["moe_layers"], t.n_experts, t.top_k)
    np.testing.assert_array_equal(t.arrays["prefill_counts"], counts)
    np.testing.assert_array_equal(np.sort(t.arrays["routing_log"], axis=2), sel)
    assert t.model["config_hash"] == hf.model["config_hash"]  # mlx-lm's "quantization" entry is storage


def test_mlx_and_transformers_traces_merge_and_compare(family, tmp_path, monkeypatch, capsys):
    root, hf = family("qwen3_moe")
    code, out, err = run_cli(["trace", root / "q4", "--data", root / "w.jsonl", "--out", tmp_path / "q4.trace",
                              "--max-length", 16], monkeypatch, capsys)  # auto: an mlx-lm folder runs in mlx-lm
    assert code == 0 and "wrote" in out, err
    m = moesift.merge_traces([tmp_path / "q4.trace", root / "hf.trace"], tmp_path / "both.trace")
    assert m.workload["documents"] == 20
    res = moesift.compare([tmp_path / "q4.trace", root / "hf.trace"], json=True)
    assert res
    other_root, _ = family("olmoe")
    with pytest.raises(MoesiftError, match="cannot merge traces of different models"):
        moesift.merge_traces([tmp_path / "q4.trace", other_root / "hf.trace"], tmp_path / "bad.trace")
    code, out, err = run_cli(["merge", tmp_path / "q4.trace", other_root / "hf.trace", "--out", tmp_path / "b2"],
                             monkeypatch, capsys)
    assert_one_error(code, err, "different models")


def test_bad_input_is_one_error_line(family, tmp_path, monkeypatch, capsys):
    root, _ = family("qwen3_moe")
    data = root / "w.jsonl"
    code, _, err = run_cli(["trace", root / "hf", "--data", data, "--engine", "mlx"], monkeypatch, capsys)
    assert_one_error(code, err, "not one", "--engine transformers")
    odd = tmp_path / "odd"
    shutil.copytree(root / "q4", odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["quantization"]["mode"] = "nf3"
    (odd / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["trace", odd, "--data", data, "--engine", "mlx"], monkeypatch, capsys)
    assert_one_error(code, err, "nf3", "affine")
    code, _, err = run_cli(["trace", root / "q4", "--data", data, "--engine", "vllm"], monkeypatch, capsys)
    assert_one_error(code, err, "unknown engine")
