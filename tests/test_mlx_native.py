"""mlx-lm model folders (made by mlx-lm's own converter, 4-bit, 8-bit and unquantized): trim keeps the resident
experts of a plan traced on the transformers model (stacked switch_mlp tensors and router rows, quantized
companions included), every other tensor and file as it was, and only the expert count changes in config.json;
verify runs the MLX model restricted to the plan in mlx-lm against its trim; bad input is one error line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from engine_models import MLX_CONVERSIONS, MLX_SIZES, mlx_convert, mlx_source, per_family
from hostile import assert_one_error, run_cli

import moesift
from moesift.core.errors import MoesiftError
from moesift.evaluation.verify import verify

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

SIZES = MLX_SIZES
# tensors with an expert dimension (first) in an mlx-lm folder, named here independently of moesift
SLICED = re.compile(r"model\.layers\.\d+\.(mlp|block_sparse_moe)\.((gate|switch_mlp\.(gate|up|down)_proj)\."
                    r"(weight|scales|biases)|gate\.e_score_correction_bias)")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (transformers model dir, plan file traced on it, {conversion: mlx-lm folder})."""
    def build(mt, root):
        mlx_source(mt, root / "hf")
        data = root / "w.jsonl"
        data.write_text("\n".join(json.dumps({"input_ids": [(7 * i + j) % 90 for j in range(24)]})
                                  for i in range(12)))
        moesift.trace(root / "hf", data, out=root / "w.trace", max_length=32, progress=False)
        moesift.plan([root / "w.trace"], out=root / "plan.json", keep=0.5)
        return root / "hf", root / "plan.json", mlx_convert(root / "hf", root, *MLX_CONVERSIONS)

    return per_family(tmp_path_factory, build)


def _tensors(d):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _resident(plan_file):
    return {int(e["layer"]): sorted(e["resident"]) for e in json.loads(plan_file.read_text())["layers"]}


CASES = [(mt, q) for mt in SIZES for q in ("q4", "q8")] + [("qwen3_moe", "f32"), ("mixtral", "f32")]


def _check_sliced(src, out, keep):
    """Every tensor of the trim `out` against the source mlx-lm folder `src` sliced here with numpy; returns
    the number of sliced tensors."""
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    n_sliced = 0
    for name, x in a.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if SLICED.fullmatch(name) and m and int(m.group(1)) in keep:
            want = x[keep[int(m.group(1))]]
            n_sliced += 1
        else:
            want = x
        assert b[name].dtype == want.dtype and np.array_equal(b[name], want), name
    return n_sliced


@pytest.mark.parametrize("model_type,conversion", CASES)
def test_trim_of_an_mlx_folder_slices_every_expert_tensor(model_type, conversion, family, tmp_path):
    hf, plan, folders = family(model_type)
    src = folders[conversion]
    out = moesift.trim(src, plan, tmp_path / "t", progress=False)
    keep = _resident(plan)
    n_sliced = _check_sliced(src, out, keep)
    assert n_sliced >= 2 * (12 if conversion != "f32" else 4)  # two MoE layers or more
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (src, out))
    key = "num_local_experts" if model_type == "mixtral" else "num_experts"
    n = {len(v) for v in keep.values()}
    assert len(n) == 1 and cfg_b[key] == n.pop() < cfg_a[key]
    assert {k: v for k, v in cfg_b.items() if k != key} == {k: v for k, v in cfg_a.items() if k != key}
    assert ("quantization" in cfg_b) == (conversion != "f32")
    for f in src.iterdir():  # every other file copied as it is
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    rec = json.loads((out / "moesift_plan.json").read_text())
    assert rec["layout"] == "mlx-lm" and rec["standard"] and all(rec["files"].values())


@pytest.mark.parametrize("model_type,conversion", CASES)
def test_verify_of_an_mlx_trim_in_mlx(model_type, conversion, family, tmp_path):
    hf, plan, folders = family(model_type)
    src = folders[conversion]
    out = moesift.trim(src, plan, tmp_path / "t", progress=False)
    r = verify(src, out, max_new_tokens=4, max_samples=3, progress=False, engine="mlx")
    assert r["engine"].startswith("mlx-lm ") and r["ok"] and r["generations_identical"], r
    assert r["top1_agreement"] == 1.0 and r["max_rel_logit_diff"] <= 1e-6  # measured: 0.0 (same kernels, bytes)
    assert r["params_trimmed"] < r["params_full"]
    bits = "unquantized" if conversion == "f32" else f"{MLX_CONVERSIONS[conversion]['q_bits']}-bit"
    assert bits in r["engine_notes"][0]


def test_verify_cli_finds_mlx_folders_itself_and_catches_a_wrong_trim(family, tmp_path, monkeypatch, capsys):
    hf, plan, folders = family("qwen3_moe")
    src = folders["q4"]
    out = moesift.trim(src, plan, tmp_path / "t", progress=False)
    code, stdout, err = run_cli(["verify", src, out, "--max-samples", "2", "--max-new-tokens", "3", "--json"],
                                monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["ok"] and r["max_rel_logit_diff"] <= 1e-6 and r["engine"].startswith("mlx-lm")
    code, stdout, err = run_cli(["verify", src, out, "--engine", "mlx", "--max-samples", "1",
                                 "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 0 and "run by mlx-lm" in stdout and "OK" in stdout
    E = json.loads((src / "config.json").read_text())["num_experts"]
    other = {la: [e for e in range(E) if e not in ids] for la, ids in _resident(plan).items()}
    r = verify(src, out, plan=other, max_new_tokens=3, max_samples=2, progress=False)
    assert not r["ok"] and r["top1_agreement"] < 1.0 and r["max_rel_logit_diff"] > 1e-2


def _plan_file(path, model_type, n_experts, top_k, layers):
    path.write_text(json.dumps({"schema": "moesift-plan/1", "model": {
        "model_type": model_type, "n_experts": n_experts, "top_k": top_k, "moe_layers": sorted(layers)},
        "layers": [{"layer": la, "resident": ids} for la, ids in sorted(layers.items())]}))
    return path


def test_bad_input_is_one_line_and_writes_nothing(family, tmp_path, monkeypatch, capsys):
    hf, plan, folders = family("qwen3_moe")
    src = folders["q4"]
    uneven = _plan_file(tmp_path / "uneven.json", "qwen3_moe", 8, 2, {0: [0, 1, 2, 3], 2: [0, 1, 2, 3, 4, 5]})
    code, stdout, err = run_cli(["trim", src, "--plan", uneven, "--out", tmp_path / "o1"], monkeypatch, capsys)
    assert_one_error(code, err, "mlx-lm builds every MoE layer with one expert count", "--uniform")
    _, olmoe_plan, _ = family("olmoe")
    code, stdout, err = run_cli(["trim", src, "--plan", olmoe_plan, "--out", tmp_path / "o2"], monkeypatch, capsys)
    assert_one_error(code, err, "olmoe")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").unlink()  # the index still lists it
    for args in (["trim", broken, "--plan", plan, "--out", tmp_path / "o3"],
                 ["verify", broken, src, "--engine", "mlx"]):
        code, stdout, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err, "missing")
    code, stdout, err = run_cli(["trim", src, "--plan", plan, "--out", tmp_path / "o4", "--engine-config"],
                                monkeypatch, capsys)
    assert_one_error(code, err, "drop --engine-config")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    code, stdout, err = run_cli(["verify", hf, src, "--engine", "mlx"], monkeypatch, capsys)
    assert_one_error(code, err, "is an mlx-lm model folder")
    with pytest.raises(MoesiftError, match="float32"):
        verify(src, src, dtype="bfloat16")
