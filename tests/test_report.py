"""Report: byte accounting against saved tiny checkpoints of every family, the HTML page in headless
Chromium, and the CLI's JSON contract and errors."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analysis import make_trace
from tiny import TINY

from moesift.analysis.stats import PCTS, budget_n, select_top
from moesift.formats.checkpoint import CheckpointIndex, read_header, shard_files
from moesift.surfaces.report import report, savings

FAMILIES = sorted(TINY)
ROOT = Path(__file__).resolve().parents[1]


def _tensor_bytes(d: Path) -> tuple[int, dict[str, int]]:
    """Bytes of every tensor, from the loaded tensors themselves (numel x element size)."""
    from safetensors import safe_open

    sizes = {}
    for f in shard_files(d):
        with safe_open(str(d / f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                sizes[k] = t.numel() * t.element_size()
    return sum(sizes.values()), sizes


def _trace_for(d: Path, seed: int = 0):
    """A trace whose shape matches the checkpoint in `d`."""
    spec = CheckpointIndex.build(d).spec
    t = make_trace(L=len(spec.moe_layers), E=spec.n_experts, K=spec.top_k, n_tokens=160, doc_len=10, seed=seed,
                   log=False)
    t.model["moe_layers"] = list(spec.moe_layers)
    t.model["model_type"] = spec.model_type
    return t


@pytest.mark.parametrize("model_type", FAMILIES)
def test_byte_accounting_matches_saved_checkpoint(model_type, tiny_dir, tmp_path):
    from naive_trim import naive_trim

    d = tiny_dir(model_type)
    idx = CheckpointIndex.build(d)
    total, sizes = _tensor_bytes(d)
    assert idx.total_bytes() == total
    assert sum(idx.bytes_by_kind().values()) == total
    # stored sizes: the data sections of the shards, whatever the dtypes
    data = sum((d / f).stat().st_size - read_header(d / f)[1] for f in shard_files(d))
    assert data == total
    spec = idx.spec
    t = _trace_for(d)
    sv = savings(t, d)
    assert sv["total_bytes"] == total
    assert sv["expert_bytes"] + sv["non_expert_bytes"] == total
    assert 0 < sv["expert_bytes"] < total
    # the prediction at half the experts equals the tensor bytes of a checkpoint trimmed to that set
    E, K = spec.n_experts, spec.top_k
    n = max(budget_n(0.5, E), K)
    resident = {dec: [int(e) for e in select_top(t.counts[i], n)]
                for i, dec in enumerate(spec.moe_layers) if dec not in spec.hash_layers}
    out = naive_trim(d, tmp_path / "trimmed", resident)
    trimmed, _ = _tensor_bytes(out)
    row = next(r for r in sv["budgets"] if r["budget"] == "0.5")
    assert row["predicted_bytes"] == trimmed
    # expert / non-expert split: dropping E - n experts of every layer removes (E - n) / E of the expert bytes
    if not spec.hash_layers and n < E:
        assert (total - trimmed) * E == sv["expert_bytes"] * (E - n)
    # non-expert bytes are what a checkpoint keeps whatever the budget
    assert all(r["predicted_bytes"] >= sv["non_expert_bytes"] for r in sv["budgets"])


def test_quantized_checkpoint_counts_stored_bytes(tiny_dir, tmp_path):
    """A checkpoint stored in bf16 with int8-packed expert weights is counted at its stored sizes."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_dir("qwen3_moe")
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    for f in shard_files(dst):
        sd = load_file(str(dst / f))
        q = {}
        for k, v in sd.items():
            if ".experts." in k and v.dim() >= 2:
                q[k] = (v * 64).round().clamp(-127, 127).to(torch.int8)
            else:
                q[k] = v.to(torch.bfloat16)
        save_file(q, str(dst / f))
    total, _ = _tensor_bytes(dst)
    full, _ = _tensor_bytes(src)
    sv = savings(_trace_for(dst), dst)
    assert sv["total_bytes"] == total < full / 2
    assert "I8" in sv["dtypes"] and "BF16" in sv["dtypes"]


def test_savings_refuses_a_different_model(tiny_dir):
    from moesift.core.errors import MoesiftError

    t = make_trace(L=5, E=16, K=2, n_tokens=50, log=False)
    with pytest.raises(MoesiftError, match="MoE layers"):
        savings(t, tiny_dir("qwen3_moe"))


# ---- HTML ----------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def test_html_renders_in_headless_chromium(tiny_dir, tmp_path):
    chrome = _chromium()
    if chrome is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    d = tiny_dir("qwen3_moe")
    a, b = _trace_for(d, seed=1), _trace_for(d, seed=2)
    for t, lab, seed in ((a, "code", 1), (b, "prose", 2)):
        t.workload["label"] = lab
        full = make_trace(L=t.n_layers, E=t.n_experts, K=t.top_k, n_tokens=160, doc_len=10, seed=seed)
        t.arrays["routing_log"] = full.arrays["routing_log"]
        t.arrays["doc_offsets"] = full.arrays["doc_offsets"]
    html = tmp_path / "report.html"
    r = report([a, b], model=d, out=html, json=True)
    text = html.read_text()
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in text  # plotly.js inlined
    rest = text.replace(get_plotlyjs(), "")
    assert "src=" not in rest and "cdn." not in rest  # nothing fetched from elsewhere
    expected = {"coverage", "usage", "heldout", "learning", "bytes", "locality", "compare"}
    assert {f"fig-{n}" for n in expected} <= set(part.split('"')[0] for part in text.split('id="')[1:])
    env = dict(os.environ, HOME=str(tmp_path))
    cmd = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=3000", "--dump-dom", html.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]  # every console message, errors included
    assert console == [], console
    rendered = dom.stdout.count('class="plot-container')
    assert rendered == len(expected) + ("cache" in text and 'id="fig-cache"' in text), rendered
    assert r["comparison"]["workloads"] == ["code", "prose"]


# ---- CLI -----------------------------------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moesift.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def _strict_json(s: str):
    def bad(x):
        raise ValueError(f"non-standard JSON constant {x}")

    return json.loads(s, parse_constant=bad)


def test_cli_report_json_contract(tmp_path):
    t = make_trace(L=3, E=16, K=2, n_tokens=400, doc_len=20)
    p = t.save(tmp_path / "a.trace")
    res = _cli("report", p, "--json")
    assert res.returncode == 0, res.stderr
    out = _strict_json(res.stdout)
    assert len(out["layers"]) == 3
    c = t.counts
    for i, s in enumerate(out["layers"]):
        assert set(s["experts_for_coverage"]) == {str(p) for p in PCTS}
        for pct in PCTS:
            srt = np.sort(c[i])[::-1]
            want = int(np.argmax(np.cumsum(srt) * 100 >= pct * srt.sum())) + 1
            assert s["experts_for_coverage"][str(pct)] == want
        assert set(s["heldout_coverage"]) == set(out["budgets"])
        assert all(0 <= v <= 1 for v in s["heldout_coverage"].values())
    want90 = np.mean([s["experts_for_coverage"]["90"] / 16 for s in out["layers"]])
    assert out["overall"]["mean_fraction_for_90"] == pytest.approx(want90)
    assert out["locality"]["srp"]["overall"]["4"]["srp"] > 0
    assert out["affinity"]["chains"]


def test_cli_report_with_wcer_file():
    importlib.import_module("moesift.formats.wcer")
    from conftest import WCER_DIR

    f = sorted(WCER_DIR.glob("OLMoE*code*.json"))[0]
    res = _cli("report", f, "--json")
    assert res.returncode == 0, res.stderr
    out = _strict_json(res.stdout)
    d = json.loads(f.read_text())
    assert [s["experts_for_coverage"] for s in out["layers"]] == d["experts_needed_for_pct_coverage_per_layer"]


def test_cli_compare_json(tmp_path):
    a = make_trace(L=2, E=16, K=2, n_tokens=200, seed=1, label="a", log=False).save(tmp_path / "a.trace")
    b = make_trace(L=2, E=16, K=2, n_tokens=200, seed=2, label="b", log=False).save(tmp_path / "b.trace")
    res = _cli("compare", a, b, "--keep", "0.25", "--json")
    assert res.returncode == 0, res.stderr
    out = _strict_json(res.stdout)
    assert out["workloads"] == ["a", "b"] and np.array(out["cross_coverage"]).shape == (2, 2)
    assert out["experts_kept"] == 4


def _cli_inprocess(args, capsys, monkeypatch):
    from moesift import cli

    monkeypatch.setattr(sys, "argv", ["moesift", *map(str, args)])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    cap = capsys.readouterr()
    return ex.value.code, cap.out, cap.err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    a = make_trace(L=2, E=16, K=2, n_tokens=100, log=False).save(tmp_path / "a.trace")
    other = make_trace(L=3, E=8, K=2, n_tokens=100, log=False).save(tmp_path / "b.trace")
    (tmp_path / "junk.trace").write_bytes(b"not a trace at all")
    cases = [
        ("report", tmp_path / "missing.trace"),
        ("report", a, other),
        ("report", tmp_path / "junk.trace"),
        ("report", a, "--model", tmp_path / "nowhere"),
        ("report", a, "--out", tmp_path / "no" / "dir" / "r.html"),
        ("compare", a),
        ("compare", a, a, "--keep", "1.5"),
        ("compare", a, other),
    ]
    for args in cases:
        code, out, err = _cli_inprocess(args, capsys, monkeypatch)
        assert code == 2, (args, out, err)
        assert err.startswith("moesift: error: "), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_report_html_is_not_overwritten_without_force(tmp_path):
    t = make_trace(L=2, E=16, K=2, n_tokens=200, seed=3, label="a", log=False).save(tmp_path / "a.trace")
    html = tmp_path / "report.html"
    html.write_text("keep me")
    res = _cli("report", t, "--out", html)
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    assert html.read_text() == "keep me"
    res = _cli("report", t, "--out", html, "--force")
    assert res.returncode == 0, res.stderr
    assert html.read_text().lstrip().lower().startswith("<!doctype html")
