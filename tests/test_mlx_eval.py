"""`moesift eval --engine mlx` on mlx-lm model folders made by mlx-lm's own converter from tiny random
transformers models: the unquantized (float32) conversion's perplexities (full model, a half plan, top-k) equal
the transformers evaluation of the unconverted model on the same token windows; a 4-bit conversion's are
finite and the plan changes them; bad input is one error line."""

from __future__ import annotations

import json
import math

import pytest
from engine_models import MLX_SIZES, mlx_convert, mlx_source, per_family
from hostile import assert_one_error, run_cli

import moesift
from moesift.evaluation.evaluate import eval_model, format_table

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

SIZES = MLX_SIZES
TEXT = ("the quick brown fox jumps over the lazy dog\n\nexperts route tokens to a few of many feed forward "
        "networks\n\nshort\n\n" + "a longer paragraph that is cut into several windows of tokens " * 3)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (root with hf/, f32/, q4/, plan.json and the data files)."""
    def build(mt, root):
        mlx_source(mt, root / "hf")
        (root / "w.jsonl").write_text("\n".join(json.dumps({"input_ids": [(7 * i + j) % 90 for j in range(3 + 2 * i)]})
                                                for i in range(10)))
        (root / "t.txt").write_text(TEXT)
        moesift.trace(root / "hf", root / "w.jsonl", out=root / "w.trace", max_length=32, progress=False)
        moesift.plan([root / "w.trace"], out=root / "plan.json", keep=0.5)
        mlx_convert(root / "hf", root, "f32", *(("q4",) if mt == "qwen3_moe" else ()))
        return root

    return per_family(tmp_path_factory, build)


def _by_name(res):
    return {r["name"]: r for r in res["results"]}


@pytest.mark.parametrize("model_type", sorted(SIZES))
def test_float32_mlx_perplexity_equals_transformers(model_type, family):
    root = family(model_type)
    data = [root / "w.jsonl", root / "t.txt"]
    kw = dict(plans=[root / "plan.json"], top_k=[1], max_length=8, batch_size=3, progress=False)
    hf = _by_name(eval_model(root / "hf", data, device="cpu", dtype="float32", **kw))
    res = eval_model(root / "f32", data, **kw)  # auto: an mlx-lm folder runs in mlx-lm
    assert res["engine"].startswith("mlx-lm") and res["windows"] > 10
    mx = _by_name(res)
    assert list(mx) == list(hf) == ["full", "plan plan.json", "top-k 1"]
    for name, r in mx.items():
        assert r["tokens"] == hf[name]["tokens"] > 0
        assert abs(r["ppl"] / hf[name]["ppl"] - 1) < 1e-4, (name, r["ppl"], hf[name]["ppl"])
        assert r["mean_active"] == pytest.approx(hf[name]["mean_active"])
        assert r["tokens_per_s"] > 0
    assert mx["plan plan.json"]["ppl"] != mx["full"]["ppl"]
    format_table(res)


def test_4bit_perplexity_is_finite_and_a_plan_changes_it(family, monkeypatch, capsys):
    root = family("qwen3_moe")
    code, out, err = run_cli(["eval", root / "q4", "--data", root / "t.txt", "--plan", root / "plan.json",
                              "--engine", "mlx", "--max-length", "16", "--json"], monkeypatch, capsys)
    assert code == 0, err
    res = _by_name(json.loads(out))
    full, plan = res["full"], res["plan plan.json"]
    assert math.isfinite(full["ppl"]) and math.isfinite(plan["ppl"]) and plan["ppl"] != full["ppl"]
    assert plan["ppl_ratio"] == pytest.approx(plan["ppl"] / full["ppl"])
    code, out, err = run_cli(["eval", root / "q4", "--data", root / "t.txt", "--max-length", "16"], monkeypatch,
                             capsys)
    assert code == 0 and "perplexity on" in out, err


@pytest.mark.parametrize("args,needle", [
    (["--engine", "mlx"], "not one"),
    (["--top-p", "0"], "--top-p"),
    (["--dtype", "bfloat16"], "float32"),
    (["--engine", "vllm"], "unknown engine"),
])
def test_bad_input_is_one_error_line(args, needle, family, monkeypatch, capsys):
    root = family("qwen3_moe")
    model = root / "hf" if args == ["--engine", "mlx"] else root / "q4"
    code, _, err = run_cli(["eval", model, "--data", root / "t.txt", *args], monkeypatch, capsys)
    assert_one_error(code, err, needle)
