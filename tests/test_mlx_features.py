"""mlx-lm features on mlx-lm model folders made by mlx-lm's own converter from tiny random transformers models:
`trace --engine mlx --generate N` (decode counts equal an independent greedy recount, end-of-sequence
included) with `--saliency` and `--log-routing` (an unquantized float32 conversion's trace equals the
transformers trace of the same weights, and the two merge and compare); `eval --engine mlx --top-p` (float32
perplexity and active experts equal the transformers evaluation, for a renormalising and a non-renormalising
family); `sweep --engine mlx` (points carry the bytes of the trimmed MLX checkpoint, equal to a trim's
headers); `demo --engine mlx --quick`; bad input is one error line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from engine_models import keep_router_outputs, mlx_convert, mlx_source, per_family
from hostile import assert_one_error, run_cli

import moesift
from moesift.core.errors import MoesiftError
from moesift.evaluation.evaluate import eval_model
from moesift.formats.checkpoint import CheckpointIndex

pytest.importorskip("mlx_lm", reason="needs moesift[mlx]")

GEN = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> root with hf/, f32/ (and q4/ for qwen3_moe), w.jsonl and a half plan."""
    def build(mt, root):
        mlx_source(mt, root / "hf")
        rng = np.random.default_rng(3)
        (root / "w.jsonl").write_text("\n".join(
            json.dumps({"input_ids": [int(v) for v in rng.integers(0, 90, int(rng.integers(2, 20)))]})
            for _ in range(7)))
        mlx_convert(root / "hf", root, "f32", *(("q4",) if mt == "qwen3_moe" else ()))
        moesift.trace(root / "hf", root / "w.jsonl", out=root / "w.trace", progress=False)
        moesift.plan(root / "w.trace", keep=0.5, uniform=True, out=root / "plan.json")
        return root

    return per_family(tmp_path_factory, build)


def _greedy_recount(folder, docs, layers, E, K, n_new, eos):
    """Per document, independently of moesift: mlx-lm's loader, each router replaced by a test-local module
    that keeps its logits, the prompt then one generated token at a time through mlx-lm's KV cache (N - 1
    tokens fed for N new ones; an end-of-sequence token is not fed), top-k of the softmax by numpy's argsort.
    Returns (decode counts [L, E], decode selections [tokens, L, K] sorted per token, the tokens fed)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder, lazy=False, strict=True)
    model.set_dtype(mx.float32)
    seen = keep_router_outputs(model, layers)

    def selections():
        per = []
        for s in seen:
            lg = np.array(s.pop().astype(mx.float32)).reshape(-1, E)
            per.append(np.sort(np.argsort(-lg, axis=1, kind="stable")[:, :K], axis=1))
        return np.stack(per, axis=1)[-1:]  # the last position: the token just fed

    sel, fed = [], []
    for ids in docs:
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids]), cache=cache)
        for s in seen:
            s.clear()
        tok = int(np.argmax(np.array(logits[0, -1])))
        for _ in range(n_new - 1):
            if tok in eos:
                break
            logits = model(mx.array([[tok]]), cache=cache)
            fed.append(tok)
            sel.append(selections())
            tok = int(np.argmax(np.array(logits[0, -1])))
    sel = np.concatenate(sel) if sel else np.zeros((0, len(layers), K), np.int64)
    counts = np.stack([np.bincount(sel[:, i].reshape(-1), minlength=E) for i in range(len(layers))])
    return counts, sel, fed


def _decode_part(t):
    """The routing log's decode tokens, each token's ids sorted."""
    return np.sort(t.arrays["routing_log"][t.arrays["log_phase"] == 1], axis=2)


def test_decode_counts_equal_independent_recount(family, tmp_path):
    root = family("qwen3_moe")
    docs = [json.loads(line)["input_ids"] for line in (root / "w.jsonl").read_text().splitlines()]
    t = moesift.trace(root / "q4", root / "w.jsonl", generate=GEN, batch_size=3, folds=2, log_routing=True,
                      progress=False, engine="mlx")
    layers = t.model["moe_layers"]
    counts, sel, fed = _greedy_recount(root / "q4", docs, layers, t.n_experts, t.top_k, GEN, set())
    assert t.workload["generate"] == GEN and t.workload["decode_tokens"] == len(fed) == len(docs) * (GEN - 1)
    np.testing.assert_array_equal(t.arrays["decode_counts"], counts)
    np.testing.assert_array_equal(_decode_part(t), sel)
    assert t.arrays["fold_counts"].sum() == t.arrays["prefill_counts"].sum() + counts.sum()
    # an end-of-sequence token the model produces (the first one fed): decoding stops before feeding it
    stop = tmp_path / "q4-eos"
    shutil.copytree(root / "q4", stop)
    gc = json.loads((stop / "generation_config.json").read_text())
    gc["eos_token_id"] = fed[0]
    (stop / "generation_config.json").write_text(json.dumps(gc))
    c2, s2, fed2 = _greedy_recount(stop, docs, layers, t.n_experts, t.top_k, GEN, {fed[0]})
    assert len(fed2) < len(fed)
    t2 = moesift.trace(stop, root / "w.jsonl", generate=GEN, batch_size=3, log_routing=True, progress=False)
    assert t2.workload["decode_tokens"] == len(fed2)
    np.testing.assert_array_equal(t2.arrays["decode_counts"], c2)
    np.testing.assert_array_equal(_decode_part(t2), s2)


def test_float32_generate_saliency_trace_equals_transformers(family, tmp_path):
    root = family("qwen3_moe")
    kw = dict(generate=GEN, saliency=True, log_routing=True, batch_size=3, folds=3, progress=False)
    hf = moesift.trace(root / "hf", root / "w.jsonl", out=tmp_path / "hf.trace", device="cpu", dtype="float32", **kw)
    mx = moesift.trace(root / "f32", root / "w.jsonl", out=tmp_path / "mx.trace", **kw)
    assert mx.tool["engine"].startswith("mlx-lm") and hf.workload == mx.workload
    assert hf.workload["decode_tokens"] > 0 and set(hf.arrays) == set(mx.arrays)
    for name, a in hf.arrays.items():
        if a.dtype.kind in "iu":
            np.testing.assert_array_equal(mx.arrays[name], a, err_msg=name)
        else:
            np.testing.assert_allclose(mx.arrays[name], a, rtol=1e-4, atol=1e-4, err_msg=name)
    assert hf.arrays["saliency_sum"].sum() > 0
    m = moesift.merge_traces([tmp_path / "hf.trace", tmp_path / "mx.trace"], tmp_path / "both.trace")
    np.testing.assert_array_equal(m.arrays["decode_counts"], 2 * hf.arrays["decode_counts"])
    cmp_ = moesift.compare([tmp_path / "hf.trace", tmp_path / "mx.trace"], keep=0.5, json=True)
    assert np.allclose(cmp_["cross_coverage"], cmp_["cross_coverage"][0][0])  # identical routing both ways


@pytest.mark.parametrize("mt", ["qwen3_moe", "qwen2_moe"])  # renormalises its top-k / never does in mlx-lm
def test_float32_top_p_perplexity_equals_transformers(family, mt):
    root = family(mt)
    kw = dict(plans=[root / "plan.json"], top_p=[0.4, 0.9], max_length=8, batch_size=3, progress=False)
    hf = {r["name"]: r for r in eval_model(root / "hf", root / "w.jsonl", device="cpu", dtype="float32", **kw)["results"]}
    res = eval_model(root / "f32", root / "w.jsonl", **kw)
    mx = {r["name"]: r for r in res["results"]}
    assert list(mx) == list(hf) == ["full", "plan plan.json", "top-p 0.4", "top-p 0.9"]
    for name, r in mx.items():
        assert r["tokens"] == hf[name]["tokens"] > 0
        assert abs(r["ppl"] / hf[name]["ppl"] - 1) < 1e-4, (name, r["ppl"], hf[name]["ppl"])
        assert r["mean_active"] == pytest.approx(hf[name]["mean_active"]), name
        assert r["tokens_per_s"] > 0
    assert 1 <= mx["top-p 0.4"]["mean_active"] < mx["top-p 0.9"]["mean_active"]


def test_sweep_engine_mlx_points_carry_trim_bytes(family, tmp_path, monkeypatch, capsys):
    root = family("qwen3_moe")
    t = moesift.trace(root / "q4", root / "w.jsonl", out=tmp_path / "q4.trace", progress=False)
    code, out, err = run_cli(["sweep", root / "q4", "--trace", tmp_path / "q4.trace", "--data", root / "w.jsonl",
                              "--keep", "0.5", "--strategy", "frequency,random", "--uniform", "--max-length", "8",
                              "--out", tmp_path / "sweep.html", "--json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["engine"].startswith("mlx-lm") and not res["timing"]
    pts = res["points"]
    assert [p["strategy"] for p in pts] == ["full", "frequency", "random"]
    assert pts[0]["bytes"] == CheckpointIndex.build(root / "q4").total_bytes()
    for p in pts:
        assert p["tokens_per_s"] > 0 and np.isfinite(p["ppl"])
    plan = moesift.plan(t, keep=0.5, uniform=True, model=root / "q4")
    moesift.trim(root / "q4", plan, tmp_path / "trim", progress=False)
    assert pts[1]["bytes"] == CheckpointIndex.build(tmp_path / "trim").total_bytes() < pts[0]["bytes"]
    assert "mlx-lm" in (tmp_path / "sweep.html").read_text()


def test_demo_engine_mlx_quick(tmp_path):
    from moesift.surfaces.demo import demo

    res = demo(out=tmp_path / "d", json=True, quick=True, progress=False, engine="mlx")
    page = (tmp_path / "d" / "index.html").read_text()
    assert "mlx_lm.convert" in page and "fig-sweep-quality" in page
    name = res["plan_model"]
    folder = tmp_path / "d" / name
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
    assert len(list((tmp_path / "d" / "traces").glob(f"{name}.*.trace"))) == 4
    v = res["plan"]["verify"]
    assert v["top1_agreement"] == 1.0 and v["generations_identical"] and v["max_rel_logit_diff"] < 1e-5
    kinds = [r["kind"] for r in res["eval"]["results"]]
    assert kinds[:2] == ["full", "plan"] and "top_k" in kinds and "top_p" in kinds
    trimmed = tmp_path / "d" / res["plan"]["trimmed_dir"]
    assert res["plan"]["predictions"]["bytes"] == CheckpointIndex.build(trimmed).total_bytes()
    assert res["sweep"]["engine"].startswith("mlx-lm")


def test_bad_input_is_one_error_line(family, monkeypatch, capsys):
    root = family("qwen3_moe")
    code, _, err = run_cli(["sweep", root / "hf", "--trace", root / "w.trace", "--data", root / "w.jsonl",
                            "--engine", "mlx"], monkeypatch, capsys)
    assert_one_error(code, err, "not one")
    code, _, err = run_cli(["sweep", root / "q4", "--trace", root / "w.trace", "--data", root / "w.jsonl",
                            "--strategy", "calibrated"], monkeypatch, capsys)
    assert_one_error(code, err, "calibrated", "--engine mlx")
    code, _, err = run_cli(["eval", root / "q4", "--data", root / "w.jsonl", "--top-p", "1.5"], monkeypatch, capsys)
    assert_one_error(code, err, "--top-p")
    code, _, err = run_cli(["demo", "--engine", "vllm"], monkeypatch, capsys)
    assert_one_error(code, err, "unknown engine")
    with pytest.raises(MoesiftError, match="converts qwen3moe-ref"):
        moesift.demo(model="deepseekv3-ref", engine="mlx", json=True, progress=False)
    # a block whose experts are not mlx-lm's SwitchGLU / SwitchMLP: saliency cannot be read, said in one line
    import moesift.engines.mlx_capture as capture

    monkeypatch.setattr(capture, "expert_module", lambda block: None)
    code, _, err = run_cli(["trace", root / "q4", "--data", root / "w.jsonl", "--saliency"], monkeypatch, capsys)
    assert_one_error(code, err, "--saliency", "SwitchGLU")
