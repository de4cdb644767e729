"""Published metrics on the bundled reference models: SCH never above Belady in the report, and the WCER export's
per_layer_weight_mass equal to the router probabilities recomputed from the model's own router logits."""

from __future__ import annotations

import json
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import torch

import moesift
from moesift.core.errors import MoesiftError

ROOT = Path(__file__).resolve().parents[1]
DOCS, LENGTH = 12, 160


def _assets():
    from moesift import assets

    try:
        for name in assets.MODELS:
            assets.reference_model(name)
        assets.workload("code", "trace")
    except MoesiftError as e:
        pytest.skip(f"bundled reference assets missing: {e}")
    return assets


@pytest.fixture(scope="module", params=["qwen3moe-ref", "deepseekv3-ref"])
def ref(request, tmp_path_factory):
    """(name, model, token ids per document, trace, trace path): the model traced with a routing log on
    pre-tokenised documents, so the recomputation below sees exactly the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = _assets()
    name = request.param
    d = assets.reference_model(name)
    tok = AutoTokenizer.from_pretrained(d)
    with open(assets.workload("code", "trace"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:DOCS]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:LENGTH] for t in texts]
    tmp = tmp_path_factory.mktemp(name)
    wl = tmp / "ids.jsonl"
    wl.write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in ids))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    t = moesift.trace(model, wl, tokenizer=tok, batch_size=4, max_length=LENGTH, log_routing=True, progress=False)
    return name, model, ids, t, t.save(tmp / f"{name}.trace")


def test_report_sch_never_above_belady(ref, tmp_path):
    from moesift.surfaces.report import LOCALITY_DEFINITIONS, report

    name, _, _, t, _ = ref
    html = tmp_path / "r.html"
    loc = report(t, json=True, out=html)["locality"]
    page = html.read_text()
    assert 'id="fig-locality"' in page and 'id="fig-cache"' in page  # SRP plot; SCH with LRU / LFU / Belady
    assert all(html_escape(d) in page for d in LOCALITY_DEFINITIONS.values())  # one line each
    assert loc["sch_definition"] == "paper-v3-demand-cache"
    sc, c = loc["sch"], loc["cache"]
    assert sc["moe_layers"] == c["moe_layers"] == list(range(t.n_layers))  # every MoE layer of the model
    assert sc["capacities"] == c["capacities"] == [r * t.top_k for r in (1, 2, 4, 8) if r * t.top_k <= t.n_experts]
    n = strict = 0
    for i in range(len(sc["moe_layers"])):
        for m in loc["seg_lens"]:
            for rho, cap in zip(sc["rhos"], sc["capacities"], strict=True):
                s, b = sc["layers"][i][str(m)][str(rho)], c["layers"][i][str(cap)]["belady"]
                assert 0 < s <= b + 1e-12, (name, i, m, cap)
                n += 1
                strict += s < b - 1e-9
    for m in loc["seg_lens"]:
        for rho, cap in zip(sc["rhos"], sc["capacities"], strict=True):
            assert sc["overall"][str(m)][str(rho)] <= c["overall"][str(cap)]["belady"] + 1e-12
    assert n == len(sc["moe_layers"]) * len(loc["seg_lens"]) * len(sc["capacities"])
    assert strict > 0  # SCH is a real online cache, below the optimum somewhere


def test_cli_report_json_names_the_sch_definition(ref):
    name, _, _, _, path = ref
    res = subprocess.run([sys.executable, "-m", "moesift.cli", "report", str(path), "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    loc = json.loads(res.stdout)["locality"]
    assert loc["sch_definition"] == "paper-v3-demand-cache" and loc["sch"]["definition"] == "paper-v3-demand-cache"
    assert all(0 < v <= 1 for per_m in loc["sch"]["overall"].values() for v in per_m.values())
    assert set(loc["definitions"]) == {"srp", "sch", "lru", "lfu", "belady"}


@torch.no_grad()
def _recompute_selected_prob_mass(model, ids):
    """Per MoE layer and expert: the router probability of each selected expert, summed over tokens, from the
    router's own logits (softmax over all experts; the sigmoid score for sigmoid routers), in float64."""
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    sigmoid = model.config.model_type == "deepseek_v3"
    E = gates[0].weight.shape[0]
    out = np.zeros((len(gates), E))
    got: list = []
    hs = [g.register_forward_hook(lambda mod, a, o, _i=i: got.append((_i, o[0], o[2]))) for i, g in enumerate(gates)]
    try:
        for x in ids:  # one document per forward: no padding
            got.clear()
            model(input_ids=torch.tensor([x]), use_cache=False)
            for i, logits, sel in got:
                z = logits.double()
                p = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=-1)
                np.add.at(out[i], sel.reshape(-1).numpy(), p.gather(1, sel).reshape(-1).numpy())
    finally:
        for h in hs:
            h.remove()
    return out


def test_wcer_export_weight_mass_is_the_router_probability(ref, tmp_path):
    name, model, ids, t, path = ref
    dst = tmp_path / "x.json"
    moesift.export_trace(path, dst)
    out = json.loads(dst.read_text())
    got = np.asarray(out["per_layer_weight_mass"])
    want = _recompute_selected_prob_mass(model, ids)
    assert got.shape == want.shape == (t.n_layers, t.n_experts)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert out["router_weights"].startswith("captured (summed router probability")
    assert out["max_tokens_per_prompt"] == 0  # prefill only: no generation budget
    # the applied weights are a different statistic: renormalised over the top-k they sum to 1 per token
    wm = t.arrays["weight_mass"]
    assert not np.allclose(wm, got, rtol=1e-3)
    back = moesift.Trace.load(dst)
    np.testing.assert_array_equal(back.arrays["selected_prob_mass"], got)
    assert back.get("weight_mass") is None
