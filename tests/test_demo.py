"""`moesift demo` end to end on the bundled reference models (quick settings), and its output directory rules."""

from __future__ import annotations

import json

import pytest

from moesift.core.errors import MoesiftError


def _assets_or_skip():
    from moesift import assets

    try:
        for name in assets.MODELS:
            assets.reference_model(name)
        for d in assets.DOMAINS:
            assets.workload(d, "trace")
            assets.workload(d, "eval")
    except MoesiftError as e:
        pytest.skip(f"bundled reference assets missing: {e}")


def test_demo_quick_runs_end_to_end(tmp_path):
    _assets_or_skip()
    from moesift.surfaces.demo import MARKER, _check_out, demo

    out = tmp_path / "demo"
    res = demo(out=out, json=True, quick=True, progress=False)
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script src=" not in page
    for fig in ("fig-cc-qwen3moe-ref", "fig-cc-deepseekv3-ref", "fig-sweep-quality"):
        assert fig in page
    assert (out / MARKER).is_file() and (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["plan_domain"] == res["plan_domain"]
    for name in ("qwen3moe-ref", "deepseekv3-ref"):
        m = res["models"][name]
        cc = m["compare"]["cross_coverage"]
        assert len(cc) == 4 and all(len(r) == 4 for r in cc)
        assert 0 < m["cross_coverage_mean"] <= 1 and 0 < m["self_coverage"] <= 1
        assert len(list((out / "traces").glob(f"{name}.*.trace"))) == 4
    v = res["plan"]["verify"]
    assert v["top1_agreement"] == 1.0 and v["generations_identical"]
    kinds = [r["kind"] for r in res["eval"]["results"]]
    assert kinds[:2] == ["full", "plan"] and "top_k" in kinds and kinds.count("top_p") == 2
    assert [p["strategy"] for p in res["sweep"]["points"]] == ["full", "frequency", "random"]
    assert any(p["pareto_quality"] for p in res["sweep"]["points"])
    assert (out / res["plan"]["trimmed_dir"] / "config.json").is_file()
    # the output directory of a previous run may be reused; nothing temporary is left beside it
    _check_out(out)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_demo_refuses_a_foreign_directory(tmp_path):
    from moesift.surfaces.demo import demo

    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(MoesiftError, match="not a moesift demo output"):
        demo(out=d, json=True, quick=True, progress=False)
    assert (d / "notes.txt").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MoesiftError, match="not a directory"):
        demo(out=f, json=True, quick=True, progress=False)
    with pytest.raises(MoesiftError, match="does not exist"):
        demo(out=tmp_path / "no" / "such", json=True, quick=True, progress=False)
