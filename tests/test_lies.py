"""Files that lie: a config.json that does not describe the checkpoint's tensors is refused in one line
before any model is built, in every command that loads weights; a routing key the config lacks is an error,
never a default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moesift
from moesift.formats.checkpoint import CheckpointIndex

REF = Path(moesift.__file__).parent / "assets" / "models" / "qwen3moe-ref"
DOCS = Path(moesift.__file__).parent / "assets" / "workloads" / "code.trace.jsonl"

# (edit of config.json, what the one error line must name)
LIES = {
    "more_layers": (lambda c: c.update(num_hidden_layers=8), r"decoder layer 4 .* no router tensor"),
    "fewer_layers": (lambda c: c.update(num_hidden_layers=2), r"MoE layer 2, which the config does not have"),
    "more_experts": (lambda c: c.update(num_experts=64), r"32 expert rows, but num_experts is 64"),
    "wider": (lambda c: c.update(hidden_size=256), r"hidden_size is 256"),
    "top_k_past_experts": (lambda c: c.update(num_experts_per_tok=64), r"num_experts_per_tok 64 is outside 1\.\.32"),
    "top_k_zero": (lambda c: c.update(num_experts_per_tok=0), r"num_experts_per_tok"),
    "no_top_k": (lambda c: c.pop("num_experts_per_tok"), r"no 'num_experts_per_tok'.*does not guess"),
    "no_expert_count": (lambda c: c.pop("num_experts"), r"no 'num_experts'"),
}


def _liar(tmp_path: Path, edit) -> Path:
    d = tmp_path / "m"
    shutil.copytree(REF, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_the_bundled_models_are_consistent():
    for name in ("qwen3moe-ref", "deepseekv3-ref"):
        CheckpointIndex.build(REF.parent / name).check_consistent()


@pytest.mark.parametrize("case", sorted(LIES))
def test_index_names_the_first_mismatch(tmp_path, case):
    edit, want = LIES[case]
    d = _liar(tmp_path, edit)
    with pytest.raises(moesift.MoesiftError, match=want):
        CheckpointIndex.build(d).check_consistent()


def test_every_family_checkpoint_is_consistent(tiny_dir):
    """The check refuses no honest checkpoint: a saved tiny model of every supported family passes."""
    from moesift.arch import supported_model_types

    for mt in supported_model_types():
        if mt == "kimi_k2":  # no transformers class: its checkpoints are indexed from the DeepSeek-V3 layout
            continue
        CheckpointIndex.build(tiny_dir(mt)).check_consistent()


def _cli(args, monkeypatch, capsys):
    from hostile import run_cli

    return run_cli(args, monkeypatch, capsys)


@pytest.mark.parametrize("case", ["more_layers", "no_top_k", "mixtral_on_qwen_tensors"])
def test_commands_that_load_weights_refuse_a_lying_config(tmp_path, monkeypatch, capsys, case):
    """trace, eval, generate (offloaded loading) and trim stop in one line before any weight is used;
    nothing is written."""
    from hostile import assert_one_error, plan_file

    edit = (lambda c: c.update(model_type="mixtral")) if case == "mixtral_on_qwen_tensors" else LIES[case][0]
    d = _liar(tmp_path, edit)
    out = tmp_path / "out"
    plan = plan_file(tmp_path / "p.json", {layer: list(range(16)) for layer in range(4)})
    for args in (["trace", d, "--data", DOCS, "--max-samples", 2, "--out", out],
                 ["eval", d, "--data", DOCS, "--max-samples", 2],
                 ["generate", d, "--plan", plan, "--prompt", "def f(x):", "--max-new-tokens", 2],
                 ["trim", d, "--plan", plan, "--out", out]):
        if case == "mixtral_on_qwen_tensors" and args[0] == "trim":
            continue  # trim reads bytes by the adapter's names and builds no model
        code, _, err = _cli(args, monkeypatch, capsys)
        assert_one_error(code, err, "config")
        assert "newly initialized" not in err and not out.exists()


def test_loading_refuses_weights_the_checkpoint_does_not_hold(tmp_path):
    """The header check cannot know every name a model class needs: transformers' own list of missing
    weights is refused too (Qwen3 tensors under a Mixtral config: expert names differ)."""
    d = _liar(tmp_path, lambda c: c.update(model_type="mixtral"))
    with pytest.raises(moesift.MoesiftError, match=r"holds no weights for model\.layers\.\d+\.mlp\.experts"):
        moesift.load_model(str(d), device="cpu")
