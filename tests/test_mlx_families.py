"""mlx-lm model folders of more families (DeepSeek-V2's softmax gate with group-limited greedy; the sigmoid gates
with a selection bias and expert groups of DeepSeek-V3, GLM-4.5 and dots1; Granite-MoE's top-k gating;
Qwen3-Next's softmax router; Phi-MoE's SparseMixer; gpt-oss's router with a bias), made by mlx-lm's own converter (4-bit, and 8-bit for two
families):
`trace --engine mlx` counts equal an independent recount of every layer's top-k from the router modules'
outputs; the trim equals the full quantized model restricted by hand in the test; verify in mlx-lm agrees;
plans move between the transformers model and its MLX conversion, not to another model; bad input is one
error line."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from engine_models import (
    MLX_CONVERSIONS,
    MLX_FAMILY_SIZES,
    keep_router_outputs,
    mlx_convert,
    mlx_gpt_oss_source,
    mlx_source,
    per_family,
)
from hostile import assert_one_error, run_cli

import moesift
from moesift.evaluation.verify import verify

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

FAMILIES = sorted([*MLX_FAMILY_SIZES, "gpt_oss"])
Q8 = ("deepseek_v3", "granitemoe")
CASES = [(mt, "q4") for mt in FAMILIES] + [(mt, "q8") for mt in Q8]
# (MoE block, router module) in mlx-lm's build of each family, and the config key of the expert count
ROUTER = {"granitemoe": ("block_sparse_moe", "router"), "phimoe": ("block_sparse_moe", "gate"), "gpt_oss": ("mlp", "router")}
EXPERTS_KEY = {"granitemoe": "num_local_experts", "phimoe": "num_local_experts", "qwen3_next": "num_experts",
               "gpt_oss": "num_local_experts"}
BIASED = ("deepseek_v3", "glm4_moe", "dots1")  # sigmoid gates with e_score_correction_bias
GATES = ("deepseek_v2", *BIASED)  # gates that select themselves from x @ weight.T
# tensors with an expert dimension (first) in these mlx-lm folders, named here independently of moesift
SLICED = re.compile(r"\.(mlp|block_sparse_moe)\.((gate|router|router\.layer)\.(weight|scales|biases|bias)"
                    r"|gate\.e_score_correction_bias|(switch_mlp|experts)\.(gate|up|down)_proj\.(weight|scales|biases|bias))$")
# the Linear whose output is the router logits, in mlx-lm's build of the other families
LOGITS = {"granitemoe": "block_sparse_moe.router.layer", "qwen3_next": "mlp.gate", "phimoe": "block_sparse_moe.gate",
          "gpt_oss": "mlp.router"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (root with hf/, q4/ (q8/), w.jsonl, hf.trace, plan.json traced on hf/)."""
    def build(mt, root):
        if mt == "gpt_oss":  # mlx-lm converts gpt-oss experts from MXFP4 or its own layout only
            src = mlx_gpt_oss_source(root / "hf", root / "src")
        else:
            src = mlx_source(mt, root / "hf")
        rng = np.random.default_rng(2)
        (root / "w.jsonl").write_text("\n".join(
            json.dumps({"input_ids": [int(v) for v in rng.integers(0, 90, int(rng.integers(3, 24)))]})
            for _ in range(8)))
        moesift.trace(root / "hf", root / "w.jsonl", out=root / "hf.trace", max_length=32, progress=False)
        moesift.plan([root / "hf.trace"], out=root / "plan.json", keep=0.5)
        mlx_convert(src, root, *(("q4", "q8") if mt in Q8 else ("q4",)))
        return root

    return per_family(tmp_path_factory, build)


def _resident(plan_file):
    return {int(e["layer"]): sorted(e["resident"]) for e in json.loads(plan_file.read_text())["layers"]}


def _np_select(mt: str, cfg: dict, logits: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The family's top-k from router logits [T, E], in numpy, from the family's published routing rule."""
    E, K = logits.shape[1], int(cfg["num_experts_per_tok"])
    if mt in LOGITS:  # softmax top-k, Granite's top-k of the logits and SparseMixer's two argmax steps all rank logits
        return np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :K], axis=1)
    if mt == "deepseek_v2":
        p = np.exp(logits - logits.max(1, keepdims=True))
        choice = p / p.sum(1, keepdims=True)
        grouped = cfg.get("topk_method") == "group_limited_greedy"
    else:
        choice = 1 / (1 + np.exp(-logits)) + bias
        grouped = True
    G, top_g = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if grouped and G > 1 and top_g < G:
        g = choice.reshape(len(choice), G, E // G)
        score = g.max(-1) if mt == "deepseek_v2" else np.sort(g, axis=-1)[..., -2:].sum(-1)
        drop = np.argsort(-score, axis=1, kind="stable")[:, top_g:]
        g = g.copy()
        np.put_along_axis(g, drop[..., None], 0.0, axis=1)
        choice = g.reshape(len(choice), E)
    return np.sort(np.argsort(-choice, axis=1, kind="stable")[:, :K], axis=1)


def _load(folder):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(folder, lazy=False, strict=True)
    model.set_dtype(mx.float32)
    return model


def _recount(folder, mt: str, docs: list[list[int]], layers: list[int], E: int):
    """Counts and per-token selections, independently of moesift: the folder loaded with mlx-lm's loader, each
    MoE layer's router module replaced by a test-local module that keeps its output (the router logits, or the
    ids a selecting gate picked, with the logits it picked from), one document per forward, the family's rule
    applied here in numpy to the logits (and checked against a selecting gate's own ids), counts by
    np.bincount."""
    import mlx.core as mx

    model = _load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    block, attr = ROUTER.get(mt, ("mlp", "gate"))

    def record(router, x, out):  # the logits, and the ids a selecting gate picked
        if mt in GATES:
            return x @ router.weight.T, out[0]
        return (router.layer(x) if mt == "granitemoe" else out), None

    biases = [np.array(getattr(model.model.layers[layer], block).gate.e_score_correction_bias) if mt in BIASED
              else None for layer in layers]
    seen = keep_router_outputs(model, layers, block, attr, record)
    sel = []
    for ids in docs:
        mx.eval(model(mx.array([ids])))
        per_layer = []
        for i in range(len(layers)):
            logits, picked = seen[i].pop()
            mine = _np_select(mt, cfg, np.array(logits.astype(mx.float32)).reshape(len(ids), E), biases[i])
            if picked is not None:
                np.testing.assert_array_equal(np.sort(np.array(picked).reshape(len(ids), -1), axis=1), mine)
            per_layer.append(mine)
        sel.append(np.stack(per_layer, axis=1))  # [tokens, L, K]
    sel = np.concatenate(sel)
    counts = np.stack([np.bincount(sel[:, i].reshape(-1), minlength=E) for i in range(len(layers))])
    return counts, sel


@pytest.mark.parametrize("mt,q", CASES)
def test_mlx_trace_counts_equal_independent_recount(family, mt, q):
    root = family(mt)
    t = moesift.trace(root / q, root / "w.jsonl", batch_size=3, log_routing=True, progress=False, engine="mlx")
    assert t.tool["engine"].startswith("mlx-lm") and f"{MLX_CONVERSIONS[q]['q_bits']}-bit" in t.tool["weights"]
    docs = [json.loads(line)["input_ids"] for line in (root / "w.jsonl").read_text().splitlines()]
    counts, sel = _recount(root / q, mt, docs, t.model["moe_layers"], t.n_experts)
    np.testing.assert_array_equal(t.arrays["prefill_counts"], counts)
    np.testing.assert_array_equal(np.sort(t.arrays["routing_log"], axis=2), sel)
    hf = moesift.Trace.load(root / "hf.trace")
    assert t.model["config_hash"] == hf.model["config_hash"]  # mlx-lm's "quantization" entry is storage


def _hand_masked(model, mt: str, resident: dict[int, list[int]], E: int) -> None:
    """Restrict the loaded full mlx-lm `model` by hand: sigmoid gates get a selection bias of -inf for every
    non-resident expert (mlx-lm's own gate then never picks them); DeepSeek-V2's gate and the router Linear of
    the other families get -inf added to those experts' logits (V2's gate rewritten here from its published
    rule)."""
    import mlx.core as mx
    import mlx.nn as nn

    for layer, ids in resident.items():
        mask = np.full(E, -math.inf, dtype=np.float32)
        mask[ids] = 0.0
        m = mx.array(mask)
        if mt in BIASED:
            gate = model.model.layers[layer].mlp.gate
            gate.e_score_correction_bias = gate.e_score_correction_bias + m
        elif mt in LOGITS:
            path, attr = LOGITS[mt].rsplit(".", 1)
            parent = model.model.layers[layer]
            for part in path.split("."):
                parent = getattr(parent, part)

            class Add(nn.Module):
                def __init__(self, inner, add):
                    super().__init__()
                    self.inner, self.add = inner, add

                def __call__(self, x):
                    return self.inner(x) + self.add

            setattr(parent, attr, Add(getattr(parent, attr), m))
        else:
            blk = model.model.layers[layer].mlp

            class V2Gate(nn.Module):
                def __init__(self, inner, add):
                    super().__init__()
                    self.inner, self.add = inner, add

                def __call__(self, x):
                    g = self.inner
                    scores = mx.softmax(x @ g.weight.T + self.add, axis=-1, precise=True)
                    if g.topk_method == "group_limited_greedy" and g.n_group > g.topk_group:
                        s = scores.reshape(*scores.shape[:-1], g.n_group, -1)
                        drop = mx.argsort(-s.max(axis=-1, keepdims=True), axis=-2)[..., g.topk_group:, :]
                        scores = mx.put_along_axis(s, drop, mx.array(0.0), axis=-2).reshape(scores.shape)
                    inds = mx.argsort(-scores, axis=-1)[..., : g.top_k]
                    return inds, mx.take_along_axis(scores, inds, axis=-1) * g.routed_scaling_factor

            blk.gate = V2Gate(blk.gate, m)


def _tensors(d):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _per_group_plan(path, root, mt: str, per_group: int):
    """A plan that keeps the first `per_group` experts of every expert group in every MoE layer (the group
    count stays; the group scores are then taken over resident experts)."""
    t = moesift.Trace.load(root / "hf.trace")
    cfg = json.loads((root / "hf" / "config.json").read_text())
    size = t.n_experts // int(cfg["n_group"])
    ids = [g * size + j for g in range(int(cfg["n_group"])) for j in range(per_group)]
    path.write_text(json.dumps({"schema": "moesift-plan/1", "model": {
        "model_type": mt, "n_experts": t.n_experts, "top_k": t.top_k, "moe_layers": t.model["moe_layers"]},
        "layers": [{"layer": la, "resident": ids} for la in t.model["moe_layers"]]}))
    return path


# (family, conversion, plan): "traced" is the plan of the transformers trace; "per-group" keeps an equal count
# in every expert group, so the trim keeps n_group and group-limited routing runs over resident experts
TRIMS = [(mt, q, "traced") for mt, q in CASES] + [("glm4_moe", "q4", "per-group"), ("deepseek_v2", "q4", "per-group")]


@pytest.mark.parametrize("mt,q,how", TRIMS)
def test_trim_equals_the_hand_masked_full_model(family, mt, q, how, tmp_path):
    import mlx.core as mx

    root = family(mt)
    plan = root / "plan.json" if how == "traced" else _per_group_plan(tmp_path / "p.json", root, mt,
                                                                     {"glm4_moe": 2, "deepseek_v2": 1}[mt])
    src, keep = root / q, _resident(plan)
    out = moesift.trim(src, plan, tmp_path / "t", progress=False)
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    sliced = 0
    for name, x in a.items():  # every tensor with an expert dimension sliced, every other one as it was
        parts = name.split(".")
        expert_dim = bool(SLICED.search(name))
        want = x[keep[int(parts[2])]] if expert_dim else x
        sliced += expert_dim
        assert b[name].dtype == want.dtype and np.array_equal(b[name], want), name
    assert sliced >= 2 * 10
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (src, out))
    key = EXPERTS_KEY.get(mt, "n_routed_experts")
    assert cfg_b[key] == len(next(iter(keep.values()))) < cfg_a[key]
    changed = {k for k in cfg_a if cfg_a[k] != cfg_b.get(k)}
    assert changed <= {key, "n_group", "topk_group"} and cfg_b["quantization"] == cfg_a["quantization"]
    if how == "per-group":
        assert cfg_b["n_group"] == cfg_a["n_group"] > cfg_b["topk_group"] == cfg_a["topk_group"]

    E = cfg_a[key]
    full, small = _load(src), _load(out)
    _hand_masked(full, mt, keep, E)
    worst = 0.0
    for i in range(3):
        ids = mx.array([[(5 * i + 3 * j) % 90 for j in range(6 + 3 * i)]])
        lf, ls = np.array(full(ids)), np.array(small(ids))
        assert (lf.argmax(-1) == ls.argmax(-1)).all()
        worst = max(worst, float(np.abs(lf - ls).max() / np.abs(lf).max()))
    assert worst <= 1e-6, worst  # measured: 0.0 (the same kernels on the same bytes)
    r = verify(src, out, plan=plan, max_new_tokens=4, max_samples=3, progress=False, engine="mlx")
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["generations_identical"], r
    assert r["max_rel_logit_diff"] <= 1e-6, r["max_rel_logit_diff"]  # measured: 0.0


def test_restriction_to_every_expert_changes_nothing_and_to_other_experts_does(family):
    """moesift's mlx-lm restriction with every expert resident computes exactly the unrestricted model; with the
    complement of the plan it computes another model, and no non-resident expert is ever selected."""
    import mlx.core as mx

    from moesift.engines.mlx_native import restricted
    from moesift.engines.mlx_record import tapped
    from moesift.formats.checkpoint import CheckpointIndex

    root = family("deepseek_v3")
    index = CheckpointIndex.build(root / "q4")
    model, E = _load(root / "q4"), index.spec.n_experts
    ids = mx.array([[(3 * j) % 90 for j in range(12)]])
    base = np.array(model(ids))
    with restricted(model, index, {la: list(range(E)) for la in index.spec.moe_layers}):
        assert np.array_equal(np.array(model(ids)), base)
    other = {la: [e for e in range(E) if e not in v] for la, v in _resident(root / "plan.json").items()}
    with restricted(model, index, other), tapped(model, index.spec, index.adapter.mlx_router, index.config) as taps:
        assert not np.allclose(np.array(model(ids)), base)
        for m, r in enumerate(taps.pop()):
            assert np.isin(r.ids, other[index.spec.moe_layers[m]]).all()
    assert np.array_equal(np.array(model(ids)), base)  # left as it was


def test_plans_move_between_transformers_and_mlx_but_not_to_another_model(family, tmp_path, monkeypatch, capsys):
    root = family("deepseek_v3")
    t = moesift.trace(root / "q4", root / "w.jsonl", out=tmp_path / "q4.trace", progress=False)
    moesift.plan([tmp_path / "q4.trace"], out=tmp_path / "mlx-plan.json", keep=0.5)
    hf_trim = moesift.trim(root / "hf", tmp_path / "mlx-plan.json", tmp_path / "hf-t", progress=False)
    assert json.loads((hf_trim / "config.json").read_text())["n_routed_experts"] == t.n_experts // 2
    code, out, err = run_cli(["trim", root / "q4", "--plan", root / "plan.json", "--out", tmp_path / "mlx-t"],
                             monkeypatch, capsys)  # the transformers plan on the MLX conversion
    assert code == 0, err
    glm = family("glm4_moe")
    code, _, err = run_cli(["trim", root / "q4", "--plan", glm / "plan.json", "--out", tmp_path / "o1"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "glm4_moe")
    other = tmp_path / "other"
    shutil.copytree(root / "q4", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3  # the same shapes, another model
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["trim", other, "--plan", tmp_path / "mlx-plan.json", "--out", tmp_path / "o2"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "rms_norm_eps", "--force-plan")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_mlx_folders_are_one_error_line(family, tmp_path, monkeypatch, capsys):
    root = family("deepseek_v3")
    for mode in ("mxfp4", "nf3"):  # the tracer reads affine folders only (trim and verify copy / load any)
        odd = tmp_path / mode
        shutil.copytree(root / "q4", odd)
        cfg = json.loads((odd / "config.json").read_text())
        cfg["quantization"]["mode"] = mode
        (odd / "config.json").write_text(json.dumps(cfg))
        code, _, err = run_cli(["trace", odd, "--data", root / "w.jsonl", "--engine", "mlx"], monkeypatch, capsys)
        assert_one_error(code, err, mode, "affine")
    broken = tmp_path / "broken"
    shutil.copytree(root / "q4", broken)
    (broken / "model.safetensors").unlink()  # the index still lists it
    for args in (["trace", broken, "--data", root / "w.jsonl"],
                 ["trim", broken, "--plan", root / "plan.json", "--out", tmp_path / "o"],
                 ["verify", broken, root / "q4", "--engine", "mlx"]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err, "missing")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mt", ["deepseek_v3", "granitemoe"])
def test_mlx_eval_of_a_plan_equals_the_trim_and_top_k_reaches_the_gate(family, mt, tmp_path):
    """`eval --engine mlx`: the restricted full model's perplexity equals its trim's; --top-k sets the top-k the
    family's router module selects with (a DeepSeek gate's, Granite's gating's)."""
    from moesift.evaluation.evaluate import eval_model

    root = family(mt)
    out = moesift.trim(root / "q4", root / "plan.json", tmp_path / "t", progress=False)
    kw = dict(max_length=12, batch_size=3, progress=False)
    full = {r["name"]: r for r in eval_model(root / "q4", [root / "w.jsonl"], plans=[root / "plan.json"], top_k=[1],
                                             **kw)["results"]}
    small = eval_model(out, [root / "w.jsonl"], **kw)["results"][0]
    assert full["plan plan.json"]["ppl"] == small["ppl"] and full["plan plan.json"]["tokens"] == small["tokens"]
    assert full["top-k 1"]["ppl"] != full["full"]["ppl"] and full["top-k 1"]["mean_active"] == 1.0
