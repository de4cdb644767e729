"""Sweep: every (strategy, keep) point measured, bytes as planned, perplexity as eval, Pareto fronts correct."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from moesift.core.errors import MoesiftError
from moesift.evaluation.evaluate import eval_model
from moesift.evaluation.sweep import pareto_front, sweep
from moesift.formats.checkpoint import CheckpointIndex


def brute_front(points):
    def dominates(q, p):
        return all(a <= b for a, b in zip(q, p, strict=True)) and any(a < b for a, b in zip(q, p, strict=True))

    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


@pytest.mark.parametrize("dims", [2, 3])
def test_pareto_front_matches_brute_force(dims):
    rng = random.Random(dims)
    for _ in range(300):
        n = rng.randint(1, 12)
        # small integer grid: many ties and duplicates
        pts = [[rng.randint(0, 4) for _ in range(dims)] for _ in range(n)]
        assert pareto_front(pts) == brute_front(pts), pts


def test_pareto_front_ignores_nan():
    assert pareto_front([[1, float("nan")], [2, 2], [3, 1]]) == [False, True, True]


@pytest.fixture(scope="module")
def workload(tmp_path_factory, tiny_dir):
    import moesift

    d = tmp_path_factory.mktemp("sweep")
    rng = random.Random(5)
    for name, n in (("trace", 24), ("eval", 6)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": [rng.randrange(96) for _ in range(rng.randint(4, 30))]}) + "\n")
    model = tiny_dir("qwen3_moe")
    moesift.trace(model, d / "trace.jsonl", out=d / "sal.trace", saliency=True, progress=False)
    moesift.trace(model, d / "trace.jsonl", out=d / "plain.trace", progress=False)
    return model, d


def test_sweep_points_bytes_perplexity_and_front(workload):
    model, d = workload
    keeps, strategies = (0.25, 0.5, 0.75), ("frequency", "weighted", "saliency", "random")
    r = sweep(model, d / "sal.trace", d / "eval.jsonl", keep=keeps, strategy=strategies, out=d / "sweep.html",
              json=True, progress=False, max_length=32)
    pts = r["points"]
    assert [(p["strategy"], p["keep"]) for p in pts] == [("full", 1.0)] + list(itertools.product(strategies, keeps))
    idx = CheckpointIndex.build(model)
    assert pts[0]["bytes"] == idx.total_bytes() and pts[0]["ppl_ratio"] == 1.0
    for p in pts[1:]:
        resident = {e["layer"]: e["resident"] for e in p["plan"]["layers"]}
        assert p["bytes"] == idx.predicted_bytes(resident) < idx.total_bytes()
        assert p["ppl_ratio"] == pytest.approx(p["ppl"] / pts[0]["ppl"])
        for key in ("load_s", "ttft_s"):
            assert p[key] > 0
    # bytes grow with keep; the resident model holds fewer parameters than the full one
    for s in strategies:
        b = [p["bytes"] for p in pts if p["strategy"] == s]
        assert b == sorted(b) and len(set(b)) == 3
    assert all(p["params"] < pts[0]["params"] for p in pts[1:])
    # perplexity of a point is the restricted model's perplexity, as `eval` computes it
    p = pts[2]
    ev = eval_model(model, d / "eval.jsonl", plans=[{e["layer"]: e["resident"] for e in p["plan"]["layers"]}],
                    max_length=32, progress=False)
    assert ev["results"][1]["ppl"] == pytest.approx(p["ppl"], rel=1e-9)
    # fronts are what brute force says
    assert [p["pareto"] for p in pts] == brute_front([[p["bytes"], p["ppl"], p["ttft_s"]] for p in pts])
    assert [p["pareto_quality"] for p in pts] == brute_front([[p["bytes"], p["ppl"]] for p in pts])
    # the smallest checkpoint with the best perplexity among the smallest is always on the quality front
    smallest = min(p["bytes"] for p in pts)
    best_small = min((p for p in pts if p["bytes"] == smallest), key=lambda p: p["ppl"])
    assert best_small["pareto_quality"]
    page = (d / "sweep.html").read_text()
    assert "<script src=" not in page and "Plotly" in page and "fig-sweep-quality" in page


def test_sweep_skips_saliency_without_saliency_trace(workload):
    model, d = workload
    r = sweep(model, d / "plain.trace", d / "eval.jsonl", keep="0.5", strategy="frequency,saliency", json=True,
              progress=False, timing=False, max_length=32)
    assert [p["strategy"] for p in r["points"]] == ["full", "frequency"]
    assert r["skipped"] and r["skipped"][0]["strategy"] == "saliency"
    assert "ttft_s" not in r["points"][1]
    with pytest.raises(MoesiftError):
        sweep(model, d / "plain.trace", d / "eval.jsonl", keep=[1.5], json=True, progress=False)
    with pytest.raises(MoesiftError):
        sweep(model, d / "plain.trace", d / "eval.jsonl", strategy=["nope"], json=True, progress=False)


def test_cli_sweep_json(workload):
    from typer.testing import CliRunner

    from moesift.cli import app

    model, d = workload
    r = CliRunner().invoke(app, ["sweep", str(model), "--trace", str(d / "plain.trace"), "--data", str(d / "eval.jsonl"),
                                 "--keep", "0.5", "--strategy", "frequency", "--no-timing", "--max-length", "32",
                                 "--out", str(d / "cli.html"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [p["strategy"] for p in out["points"]] == ["full", "frequency"] and (d / "cli.html").is_file()
