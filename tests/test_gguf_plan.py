"""`plan --model FILE.gguf`: a --memory budget counted from the GGUF headers, checked against the model the
traces were recorded on; the trim of the plan fits the budget (bytes counted by gguf-py's own reader)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf_models import write_model  # noqa: E402
from hostile import assert_one_error, run_cli  # noqa: E402
from test_plan import make_trace  # noqa: E402

import moesift  # noqa: E402
from moesift.core.errors import MoesiftError  # noqa: E402
from moesift.formats.gguf import read_gguf  # noqa: E402

# llama.cpp architecture -> (model_type of the traced model, expert type)
CASES = {"qwen3moe": ("qwen3_moe", "Q4_0"), "deepseek2": ("deepseek_v3", "Q8_0"), "glm4moe": ("glm4_moe", "F16")}


def _trace(path, model_type, seed=0):
    idx = read_gguf(path)
    sp = idx.spec
    cfg = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": idx.model_shape()["num_hidden_layers"]}
    counts = np.random.default_rng(seed).integers(1, 60, size=(len(sp.moe_layers), sp.n_experts))
    return make_trace(counts, moe_layers=sp.moe_layers, model_type=model_type, top_k=sp.top_k, config=cfg)


def _tensor_bytes(path):
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_memory_plan_for_a_gguf_file_trims_within_the_budget(arch, tmp_path):
    model_type, qtype = CASES[arch]
    src = write_model(tmp_path / "m.gguf", arch, qtype, n_layers=4)
    idx = read_gguf(src)
    full = _tensor_bytes(src)
    experts = sum(sum(v.values()) for v in idx.expert_bytes().values())
    budget = full - experts + int(0.6 * experts)
    t = _trace(src, model_type)
    p = moesift.plan([t], memory=budget, model=src, uniform=True, out=tmp_path / "plan.json", progress=False)
    n = {len(e["resident"]) for e in p.layers}
    assert len(n) == 1 and 0 < (k := n.pop()) < idx.spec.n_experts
    assert p.model["checkpoint"] == str(src) and p.predictions["bytes_full"] == full
    out = moesift.trim(src, tmp_path / "plan.json", tmp_path / "t.gguf", progress=False)
    assert _tensor_bytes(out) == p.predictions["bytes"] <= budget
    # one expert more per layer would not fit (group-limited routers keep groups; multi-token-prediction blocks
    # count as fixed bytes in the budget, though a trim leaves them out, so such a plan can keep fewer)
    if not idx.spec.n_group and not idx.nextn_blocks():
        assert idx.predicted_bytes({b: list(range(k + 1)) for b in idx.spec.moe_layers}) > budget


def test_gguf_memory_plan_in_the_cli_and_refusals(tmp_path, monkeypatch, capsys):
    src = write_model(tmp_path / "m.gguf", "qwen3moe", "Q8_0")
    t = _trace(src, "qwen3_moe")
    t.save(tmp_path / "w.trace")
    budget = _tensor_bytes(src) * 3 // 4
    code, out, err = run_cli(["plan", tmp_path / "w.trace", "--memory", str(budget), "--model", src, "--uniform",
                              "--out", tmp_path / "p.json"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["trim", src, "--plan", tmp_path / "p.json", "--out", tmp_path / "t.gguf"],
                             monkeypatch, capsys)
    assert code == 0, err
    assert _tensor_bytes(tmp_path / "t.gguf") == json.loads((tmp_path / "p.json").read_text())["predictions"]["bytes"] <= budget
    # traces of another model, a budget the file cannot meet, per-layer counts a GGUF file cannot hold, offload
    olmoe = write_model(tmp_path / "o.gguf", "olmoe", "F32")
    for args, needles in (
        (["--memory", str(budget), "--model", olmoe], ("another model", "model_type: qwen3_moe vs olmoe")),
        (["--memory", "1000", "--model", src], ("cannot meet the plan",)),
        (["--coverage", "0.6", "--model", src], ("one expert count", "--uniform")),
        (["--memory", str(budget), "--model", src, "--offload"], ("not a GGUF file",)),
    ):
        code, out, err = run_cli(["plan", tmp_path / "w.trace", *args, "--out", tmp_path / "x.json"], monkeypatch, capsys)
        assert_one_error(code, err, *needles)
    assert not (tmp_path / "x.json").exists()


def test_llamacpp_engine_refuses_a_folder_in_one_line(tiny_dir):
    """`--engine llama.cpp` on something that is not a GGUF file: one line for trace and for eval; `auto` leaves
    such a model to the other engines."""
    from moesift.evaluation.eval_gguf import uses_llamacpp as evaluates
    from moesift.record.gguf_trace import uses_llamacpp as traces

    folder = tiny_dir("qwen3_moe")
    with pytest.raises(MoesiftError, match="llama.cpp traces a GGUF file; .* is not one"):
        traces(folder, "llama.cpp", False)
    with pytest.raises(MoesiftError, match="llama.cpp evaluates a GGUF file; .* is not one"):
        evaluates(folder, "llama.cpp", (), "auto", None)
    assert not traces(folder, "auto", False) and not evaluates(folder, "auto", (), "auto", None)
