"""`moesift.restrict` on a model built by mlx-lm (`mlx_lm.load`, `mlx_lm.utils.load_model`): inside the block its
logits are those of the trimmed mlx-lm folder run in mlx-lm; outside they are the unrestricted model's again,
bit for bit; a plan made for another model is one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_models import mlx_convert, mlx_source, per_family

import moesift
from moesift.core.errors import MoesiftError

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

FAMILIES = ("qwen3_moe", "deepseek_v3")  # a softmax router module; a selecting sigmoid gate with a bias and groups
PROMPTS = [[3, 17, 42, 8, 91, 5, 60, 23, 11], [70, 2, 33, 33, 9, 48]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (plan file traced on the transformers model, its 4-bit mlx-lm conversion)."""
    def build(mt, root):
        mlx_source(mt, root / "hf")
        (root / "w.jsonl").write_text("\n".join(
            json.dumps({"input_ids": [(5 * i + 3 * j) % 90 for j in range(20)]}) for i in range(8)))
        moesift.trace(root / "hf", root / "w.jsonl", out=root / "w.trace", max_length=32, progress=False)
        moesift.plan([root / "w.trace"], out=root / "plan.json", keep=0.5)
        return root / "plan.json", mlx_convert(root / "hf", root, "q4")["q4"]

    return per_family(tmp_path_factory, build)


def _logits(model, ids):
    import mlx.core as mx

    out = model(mx.array([ids], dtype=mx.int32))
    return np.array(out[0].astype(mx.float32))


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_restricted_mlx_model_computes_its_trim(model_type, family, tmp_path):
    from mlx_lm import load

    plan, src = family(model_type)
    trimmed = moesift.trim(src, plan, tmp_path / "t", progress=False)
    model, _ = load(str(src))
    small, _ = load(str(trimmed))
    before = [_logits(model, ids) for ids in PROMPTS]
    with moesift.restrict(model, plan) as m:
        assert m is model
        inside = [_logits(model, ids) for ids in PROMPTS]
    after = [_logits(model, ids) for ids in PROMPTS]
    want = [_logits(small, ids) for ids in PROMPTS]
    rel = max(_max_rel(a, b) for a, b in zip(inside, want, strict=True))
    print(f"{model_type} q4: max rel logit diff, restricted vs trim: {rel}")
    assert rel == 0.0  # the same kernels on the same stored bytes
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))  # restored exactly
    assert max(_max_rel(a, b) for a, b in zip(inside, before, strict=True)) > 1e-3  # the plan changed something


def test_restrict_accepts_load_model_and_refuses_another_models_plan(family, tmp_path):
    from mlx_lm.utils import load_model

    plan, src = family("qwen3_moe")
    other_plan, _ = family("deepseek_v3")
    model, _ = load_model(src)
    before = _logits(model, PROMPTS[0])
    with moesift.restrict(model, plan):
        assert not np.array_equal(_logits(model, PROMPTS[0]), before)
    with pytest.raises(MoesiftError) as e:
        with moesift.restrict(model, other_plan):
            pass
    assert "deepseek_v3" in str(e.value) and "\n" not in str(e.value)
    p = json.loads(plan.read_text())  # the same family with another hidden size: refused by the config check
    p["model"]["config"]["hidden_size"] = 2 * p["model"]["config"]["hidden_size"]
    p["model"]["config_hash"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(p))
    with pytest.raises(MoesiftError, match="another config.*hidden_size") as e:
        with moesift.restrict(model, tmp_path / "other.json"):
            pass
    assert "\n" not in str(e.value)
    assert np.array_equal(_logits(model, PROMPTS[0]), before)  # refusals leave the model as it was
