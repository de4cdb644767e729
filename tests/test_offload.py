"""Lossless residency (moesift.apply.offload): the offloaded model equals the FULL model on every family, its
measured hit rate equals the cache simulation on the same routing, and bad input fails in one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hostile import run_cli as _run_cli
from tiny import TINY

import moesift
from moesift.analysis.cachesim import simulate
from moesift.apply.offload_runtime import ExpertCache
from moesift.arch import adapter_for
from moesift.core.errors import MoesiftError

FAMILIES = sorted(TINY)


def _resident(spec) -> dict[int, list[int]]:
    """A resident set the family can serve, interleaved with non-resident ids (odd ids; whole groups for
    group-limited routers; hash-routed layers whole)."""
    E, K = spec.n_experts, spec.top_k
    if spec.n_group and spec.n_group > 1:
        per = E // spec.n_group
        groups = list(range(1, spec.n_group, 2))[: max(spec.topk_group or 1, 1)]
        while len(groups) < (spec.topk_group or 1):
            groups.append(next(g for g in range(spec.n_group) if g not in groups))
        ids = sorted(e for g in groups for e in range(g * per, (g + 1) * per))
    else:
        ids = list(range(1, E, 2))[: max(K, E // 4)]
        if len(ids) < K:
            ids = sorted(set(ids) | set(range(K)))
    res = {layer: ids for layer in spec.moe_layers}
    for layer in spec.hash_layers:
        res[layer] = list(range(E))
    return res


@pytest.mark.parametrize("model_type", FAMILIES)
def test_offloaded_equals_full_model(model_type, tiny_dir):
    """Host "device" + host pool: float32 logits within 1e-6 relative of the full model, top-1 agreement 1,
    identical greedy generations, and the measured hit rate equals cachesim on the full model's routing.
    Slots = top-k force misses; threshold 1 sends decode misses to the host and prefill misses to the slots."""
    d = tiny_dir(model_type)
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    r = moesift.verify_offloaded(d, _resident(spec), cache_slots=spec.top_k, host_compute_max_tokens=1,
                                 max_samples=2, max_new_tokens=4, progress=False)
    assert r["top1_agreement"] == 1.0
    assert r["max_rel_logit_diff"] <= 1e-6, r["max_rel_logit_diff"]
    assert r["generations_identical"], r["generation_mismatches"]
    assert r["hit_rate_equals_simulation"], r["hit_rate_layers"]
    assert r["ok"]
    assert r["loads"] > 0  # misses happened, so the slot and host paths both ran
    assert r["host_pairs"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_hit_rate_equals_simulation_any_threshold(policy, tiny_dir):
    """Where a miss is computed (host or device) never changes outputs or the cache's hits."""
    d = tiny_dir("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    hits, host = set(), []
    for thr in (0, 1000):
        r = moesift.verify_offloaded(d, {layer: [0, 5] for layer in spec.moe_layers}, cache_slots=3, policy=policy,
                                     host_compute_max_tokens=thr, max_samples=2, max_new_tokens=3, progress=False)
        assert r["ok"] and r["hit_rate_equals_simulation"]
        hits.add(r["hit_rate"])
        host.append(r["host_pairs"])
    assert len(hits) == 1
    # threshold 0: only experts loaded and evicted again within one prefill call run on the host
    assert host[0] < host[1]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_expert_cache_matches_cachesim(policy):
    """The online cache, fed token by token, reproduces cachesim on random logs (duplicates, pinned ids,
    negative padding)."""
    rng = random.Random(3)
    for _ in range(60):
        E, K = rng.randint(4, 12), rng.randint(1, 3)
        pinned = sorted(rng.sample(range(E), rng.randint(0, E // 2)))
        cap = rng.randint(min(K, E - len(pinned)), E - len(pinned))
        skew = [rng.random() ** 3 for _ in range(E)]
        log = np.array([[rng.choices(range(E), weights=skew)[0] if rng.random() > 0.05 else -1 for _ in range(K)]
                        for _ in range(rng.randint(1, 80))], dtype=np.int64)
        c = ExpertCache(cap, policy)
        hits = acc = 0
        for row in log.tolist():
            seen = []
            for e in row:
                if e >= 0 and e not in seen:
                    seen.append(e)
            acc += len(seen)
            hits += sum(1 for e in seen if e in pinned)
            c.token([e for e in seen if e not in pinned])
        s = simulate(log, cap, policy, pinned=pinned)
        assert (c.hits + hits, acc) == (s["hits"], s["accesses"])
        assert sorted(e for e in c.occupant if e is not None) == sorted(c.slot_of)


def test_offloaded_holds_only_what_it_should(tiny_dir):
    d = tiny_dir("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    res = {layer: [1, 2, 6] for layer in spec.moe_layers}
    m, _ = moesift.load_offloaded(d, res, device="cpu", cache_slots=2, progress=False)
    ad = adapter_for(m.config)
    for rt in m.moesift_offload.layers:
        assert ad.experts(m, rt.layer).num_experts == 3 + 2
        assert rt.host.num_experts == spec.n_experts - 3
        assert rt.nonresident == [e for e in range(spec.n_experts) if e not in (1, 2, 6)]
    info = m.moesift_offload.stats()
    assert info["device_bytes"]["total"] < moesift.checkpoint_index(d).total_bytes()


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("moesift: error: "), err
    return lines[0]


def test_bad_input_one_line_each(tiny_dir, tmp_path, monkeypatch, capsys):
    d = tiny_dir("qwen3_moe")
    other = tiny_dir("mixtral")
    ocfg = json.loads((other / "config.json").read_text())
    ospec = adapter_for(ocfg).spec(ocfg)
    wrong = moesift.Plan(model={"model_type": "mixtral", "n_experts": ospec.n_experts, "top_k": ospec.top_k,
                                "moe_layers": list(ospec.moe_layers)},
                         layers=[{"layer": la, "moe_index": i, "resident": [0, 1, 2, 3]}
                                 for i, la in enumerate(ospec.moe_layers)])
    wrong.save(tmp_path / "wrong.json")
    capsys.readouterr()  # building the tiny models prints
    code, _, err = _run_cli(["verify", d, "--offloaded", tmp_path / "wrong.json"], monkeypatch, capsys)
    assert code == 2 and "made for a mixtral model" in _one_error_line(err)

    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    ok = moesift.Plan(model={"model_type": "qwen3_moe", "n_experts": spec.n_experts},
                      layers=[{"layer": la, "moe_index": i, "resident": [0, 1, 2]}
                              for i, la in enumerate(spec.moe_layers)])
    ok.save(tmp_path / "ok.json")
    code, _, err = _run_cli(["verify", d, "--offloaded", tmp_path / "ok.json", "--cache-slots", spec.n_experts],
                            monkeypatch, capsys)
    assert code == 2 and "larger than the 5 non-resident experts" in _one_error_line(err)
    with pytest.raises(MoesiftError, match="below the 2 non-resident experts one token"):
        moesift.load_offloaded(d, ok, device="cpu", cache_slots=1, progress=False)


@pytest.fixture(scope="module")
def routed_trace(tiny_dir, tmp_path_factory):
    rng = random.Random(5)
    p = tmp_path_factory.mktemp("wl") / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 96) for _ in range(rng.randint(6, 14))]}) + "\n"
                         for _ in range(16)))
    d = tiny_dir("qwen3_moe")
    t = moesift.trace(str(d), str(p), batch_size=4, folds=4, log_routing=True, progress=False)
    out = tmp_path_factory.mktemp("tr") / "t.trace"
    t.save(out)
    return d, out


def test_plan_offload_budget_and_prediction(routed_trace, tmp_path, monkeypatch, capsys):
    d, tr = routed_trace
    idx = moesift.checkpoint_index(d)
    from moesift.selection.offload_budget import device_bytes

    fixed = device_bytes(idx, {}, {})["non_expert"]
    per = max(device_bytes(idx, {}, {})["expert_bytes_per_layer"].values())
    L = len(idx.spec.moe_layers)
    mem = fixed + sum(t.nbytes for t in idx.tensors if t.role.kind == "router") + L * (2 + 4) * per
    p = moesift.plan([str(tr)], memory=mem, model=d, offload=True, cache_slots=2)
    o = p.predictions["offload"]
    assert o["device_bytes"] <= mem
    assert o["cache_slots"] == 2
    assert 0 < o["hit_rate"] <= 1 and 0 < o["heldout_hit_rate"] <= 1
    # the in-sample prediction is cachesim on the trace's log with the plan's sets pinned
    t = moesift.load_trace(tr)
    log = t.get("routing_log")
    h = a = 0
    for pos, e in enumerate(p.layers):
        s = simulate(np.asarray(log[:, pos, :], dtype=np.int64), min(2, idx.spec.n_experts - len(e["resident"])),
                     "lru", pinned=e["resident"])
        h, a = h + s["hits"], a + s["accesses"]
    assert o["hit_rate"] == pytest.approx(h / a)

    code, out, err = _run_cli(["plan", tr, "--model", d, "--memory", mem, "--offload", "--cache-slots", 2],
                              monkeypatch, capsys)
    assert code == 0, err
    assert "predicted hit rate in-sample" in out and "held-out" in out
    code, _, err = _run_cli(["plan", tr, "--model", d, "--memory", fixed - 1, "--offload"], monkeypatch, capsys)
    assert code == 2 and "of non-expert weights" in _one_error_line(err)


def test_generate_cli_reports_hit_rate_beside_prediction(tmp_path, monkeypatch, capsys):
    """On the bundled reference model: a plan made with --offload, then generate --json."""
    from pathlib import Path

    ref = Path(moesift.__file__).parent / "assets" / "models" / "qwen3moe-ref"
    wl = Path(moesift.__file__).parent / "assets" / "workloads" / "code.trace.jsonl"
    t = moesift.trace(str(ref), str(wl), max_samples=8, max_length=32, folds=4, log_routing=True, progress=False)
    t.save(tmp_path / "t.trace")
    p = moesift.plan([str(tmp_path / "t.trace")], memory="6MiB", model=ref, offload=True, out=tmp_path / "p.json")
    assert p.predictions["offload"]["heldout_hit_rate"] is not None
    code, out, err = _run_cli(["generate", ref, "--plan", tmp_path / "p.json", "--prompt", "def add(a, b):",
                               "--device", "cpu", "--max-new-tokens", 6, "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["new_tokens"] == 6 and len(r["offload"]["layers"]) == 4
    assert r["predicted"]["heldout_hit_rate"] == p.predictions["offload"]["heldout_hit_rate"]
    assert 0 < r["offload"]["hit_rate"] <= 1
    # the same greedy tokens as the full model
    full, tok = moesift.load_trimmed(ref)
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        g = full.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=full.generation_config.pad_token_id)
    assert g[0, ids.shape[-1]:].tolist() == r["token_ids"]


def test_no_cache_and_fewer_than_top_k_resident(tiny_dir):
    """Routing is never changed, so any resident set works: whole layers on the host with no cache (like
    llama.cpp --n-cpu-moe) and a single resident expert with slots."""
    d = tiny_dir("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    whole = {la: (list(range(spec.n_experts)) if i == 0 else []) for i, la in enumerate(spec.moe_layers)}
    r = moesift.verify_offloaded(d, whole, cache_slots=0, max_samples=2, max_new_tokens=3, progress=False)
    assert r["ok"] and r["loads"] == 0 and r["host_pairs"] > 0
    assert r["hit_rate_layers"][0]["measured"] == 1.0 and r["hit_rate_layers"][1]["measured"] == 0.0
    one = {la: [3] for la in spec.moe_layers}
    r = moesift.verify_offloaded(d, one, cache_slots=spec.top_k, max_samples=2, max_new_tokens=3, progress=False)
    assert r["ok"] and r["hit_rate_equals_simulation"]


def _tiny_plan(tiny_dir, tmp_path, d=None):
    d = d or tiny_dir("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    spec = adapter_for(cfg).spec(cfg)
    moesift.Plan(model={"model_type": "qwen3_moe"}, layers=[{"layer": la, "moe_index": i, "resident": [0, 1]}
                                                            for i, la in enumerate(spec.moe_layers)]).save(
        tmp_path / "p.json")
    return d


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default on machines without CUDA")
def test_generate_with_default_flags_runs_on_the_cpu(tiny_dir, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    d = _tiny_plan(tiny_dir, tmp_path, Path(moesift.__file__).parent / "assets" / "models" / "qwen3moe-ref")
    capsys.readouterr()
    code, out, err = _run_cli(["generate", d, "--plan", tmp_path / "p.json", "--prompt", "def add(a, b):",
                               "--max-new-tokens", 2, "--json"], monkeypatch, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["device"] == "cpu" and r["new_tokens"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    d = _tiny_plan(tiny_dir, tmp_path)
    capsys.readouterr()
    code, _, err = _run_cli(["generate", d, "--plan", tmp_path / "p.json", "--prompt", "hi", "--device", "cuda"],
                            monkeypatch, capsys)
    assert code == 2 and "CUDA" in _one_error_line(err)


def test_plan_offload_without_routing_log_says_so(tiny_dir, tmp_path):
    d = tiny_dir("qwen3_moe")
    p = tmp_path / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": list(range(1 + i, 13 + i))}) + "\n" for i in range(8)))
    t = moesift.trace(str(d), str(p), batch_size=4, folds=4, progress=False)
    t.save(tmp_path / "t.trace")
    idx = moesift.checkpoint_index(d)
    pl = moesift.plan([str(tmp_path / "t.trace")], memory=idx.total_bytes() * 2, model=d, offload=True, cache_slots=2)
    o = pl.predictions["offload"]
    assert o["cache_slots"] == 2 and "hit_rate" not in o and "routing log" in o["note"]
