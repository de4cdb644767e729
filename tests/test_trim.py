"""Trimming, on a tiny random model of every family: the streamed checkpoint equals the deliberately simple
reference trimmer, loads with `from_pretrained` (uniform plans) or through moesift (non-uniform plans) and
computes what the full model computes with routing restricted to the same experts; `load_resident` does too.
Plus the refusals the trimmer owes its users."""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from hostile import run_cli
from naive_trim import naive_trim
from tiny import TINY
from transformers import AutoModelForCausalLM

from moesift.apply.resident import load_resident, load_trimmed
from moesift.apply.trim import trim
from moesift.arch import adapter_for
from moesift.core.errors import MoesiftError
from moesift.core.io import file_checksum
from moesift.engines.restrict import restrict
from moesift.formats.checkpoint import CheckpointIndex, read_header
from moesift.formats.trimmed import INDEX_FILE, NONSTANDARD_MODEL_TYPE, PLAN_FILE

FAMILIES = sorted(TINY)


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _inputs(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))


def _vocab(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


def plan_for(spec, uniform: bool, seed: int = 0) -> dict[int, list[int]]:
    """A servable, non-prefix resident set per MoE layer; `uniform=False` alternates two counts by layer."""
    rng = random.Random(seed)
    out = {}
    for j, layer in enumerate(spec.moe_layers):
        if layer in spec.hash_layers:
            out[layer] = list(range(spec.n_experts))
        elif spec.n_group and spec.n_group > 1:
            per = spec.n_experts // spec.n_group
            base = max(spec.n_group // 2, spec.topk_group or 1)
            ng = base if uniform or j % 2 == 0 else min(spec.n_group, base + 1)
            if not uniform and ng == base and j % 2:
                ng = spec.n_group
            groups = sorted(rng.sample(range(spec.n_group), ng))
            out[layer] = [g * per + i for g in groups for i in range(per)]
        else:
            n = max(spec.top_k, spec.n_experts // 2)
            if not uniform and j % 2:
                n = min(spec.n_experts, n + max(1, spec.n_experts // 4))
            out[layer] = sorted(rng.sample(range(spec.n_experts), n))
    return out


def _sha(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, relative to the logit scale when above 1."""
    return (a - b).abs().max().item() / max(1.0, a.abs().max().item())


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tensor_bytes(d: Path) -> int:
    total = 0
    for f in d.glob("*.safetensors"):
        h, _ = read_header(f)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")
    return total


def _greedy(model, x, n=4):
    return model.generate(x[:1], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_uniform_trim_loads_in_transformers_and_equals_restricted(model_type, tiny_dir, tmp_path):
    src = tiny_dir(model_type)
    before = _sha(src)
    model = _load(src)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    resident = plan_for(spec, uniform=True)
    idx = CheckpointIndex.build(src)
    shard = max(4096, idx.total_bytes() // 3)  # several output shards
    out = trim(src, resident, tmp_path / "t", max_shard_size=shard, progress=False)
    assert _sha(src) == before, "the source was modified"
    assert len(list(out.glob("*.safetensors"))) >= 2 and (out / INDEX_FILE).is_file()
    # equals the reference trimmer tensor for tensor
    ref = naive_trim(src, tmp_path / "naive", resident)
    got, want = _tensors(out), _tensors(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    # predicted bytes
    assert _tensor_bytes(out) == idx.predicted_bytes(resident)
    rec = json.loads((out / PLAN_FILE).read_text())
    assert rec["tensor_bytes"] == rec["predicted_bytes"] == idx.predicted_bytes(resident)
    assert rec["standard"] is True
    assert {int(k): v for k, v in rec["id_map"].items()} == {k: sorted(v) for k, v in resident.items()}
    assert rec["checksum"] == "blake3"  # the default
    for name, h in rec["files"].items():
        assert file_checksum(out / name, rec["checksum"]) == h, name
    # loads with stock transformers and equals the restricted full model
    small = _load(out)
    x = _inputs(_vocab(model))
    with torch.no_grad():
        with restrict(model, resident):
            restricted = model(x).logits
            gen_full = _greedy(model, x)
        got_logits = small(x).logits
        gen_small = _greedy(small, x)
    assert _close(restricted, got_logits) <= 1e-6
    assert gen_full == gen_small


@pytest.mark.parametrize("model_type", FAMILIES)
def test_nonuniform_trim_and_load_resident_equal_restricted(model_type, tiny_dir, tmp_path):
    """A plan with different counts by layer: the trimmed checkpoint loads through moesift only, and so
    does the full checkpoint read with only the resident experts (`load_resident`); both equal the full
    model restricted to the plan. (Families with one MoE layer get a uniform plan here.)"""
    src = tiny_dir(model_type)
    model = _load(src)
    spec = adapter_for(model.config).spec(model.config)
    resident = plan_for(spec, uniform=False)
    x = _inputs(_vocab(model))
    with torch.no_grad(), restrict(model, resident):
        restricted = model(x).logits
        gen_full = _greedy(model, x)
    out = trim(src, resident, tmp_path / "t", progress=False)
    assert _tensor_bytes(out) == CheckpointIndex.build(src).predicted_bytes(resident)
    if len({len(v) for v in resident.values()}) > 1:
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == NONSTANDARD_MODEL_TYPE
        assert cfg["moesift"]["experts_per_layer"] == {str(k): len(v) for k, v in resident.items()}
        with pytest.raises(ValueError):  # a loader that does not know the format refuses it
            AutoModelForCausalLM.from_pretrained(out)
    small, _ = load_trimmed(out)
    resident_model = load_resident(src, resident)
    for m in (small, resident_model):
        with torch.no_grad():
            assert _close(restricted, m(x).logits) <= 1e-6
            assert _greedy(m, x) == gen_full
        assert m.moesift_resident == {k: sorted(v) for k, v in resident.items()}
    n_res = sum(p.numel() for p in resident_model.parameters())
    assert n_res == sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# ---- refusals -----------------------------------------------------------------------------------------


def _plan_file(path: Path, resident: dict[int, list[int]], **model) -> Path:
    layers = [{"layer": k, "resident": v} for k, v in sorted(resident.items())]
    path.write_text(json.dumps({"schema": "moesift-plan/1", "model": model, "layers": layers}))
    return path


@pytest.fixture
def qwen(tiny_dir):
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    return src, spec


def test_refuses_overwrite_without_force(qwen, tmp_path, monkeypatch, capsys):
    src, spec = qwen
    plan = _plan_file(tmp_path / "p.json", plan_for(spec, True), model_type="qwen3_moe")
    out = tmp_path / "out"
    assert run_cli(["trim", str(src), "--plan", str(plan), "--out", str(out)], monkeypatch, capsys)[0] == 0
    code, _, err = run_cli(["trim", str(src), "--plan", str(plan), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and err.startswith("moesift: error:") and "--force" in err
    code, _, _ = run_cli(["trim", str(src), "--plan", str(plan), "--out", str(out), "--force"], monkeypatch, capsys)
    assert code == 0 and (out / PLAN_FILE).is_file()


def test_refuses_plan_for_another_model(qwen, tmp_path, monkeypatch, capsys):
    src, spec = qwen
    res = plan_for(spec, True)
    cases = [
        _plan_file(tmp_path / "a.json", res, model_type="mixtral"),
        _plan_file(tmp_path / "b.json", res, model_type="qwen3_moe", n_experts=spec.n_experts * 2),
        _plan_file(tmp_path / "c.json", {1: list(range(spec.top_k))}, model_type="qwen3_moe"),  # dense layer
        _plan_file(tmp_path / "d.json", {spec.moe_layers[0]: [0, spec.n_experts]}),  # id out of range
    ]
    for p in cases:
        code, _, err = run_cli(["trim", str(src), "--plan", str(p), "--out", str(tmp_path / "o")], monkeypatch, capsys)
        assert code == 2 and err.startswith("moesift: error:"), (p.name, err)
        assert not (tmp_path / "o").exists()


def test_refuses_budget_below_top_k(qwen, tmp_path, monkeypatch, capsys):
    src, spec = qwen
    p = _plan_file(tmp_path / "p.json", {layer: list(range(spec.top_k - 1)) for layer in spec.moe_layers})
    code, _, err = run_cli(["trim", str(src), "--plan", str(p), "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert code == 2 and "top-k" in err


def test_refuses_bad_plan_files(qwen, tmp_path, monkeypatch, capsys):
    src, _ = qwen
    bad = [("notjson.json", "{not json"), ("schema.json", json.dumps({"schema": "other/1", "layers": []})),
           ("nolayers.json", json.dumps({"schema": "moesift-plan/1"})),
           ("badids.json", json.dumps({"schema": "moesift-plan/1", "layers": [{"layer": 0, "resident": ["x"]}]}))]
    for name, text in bad:
        (tmp_path / name).write_text(text)
        code, _, err = run_cli(["trim", str(src), "--plan", str(tmp_path / name), "--out", str(tmp_path / "o")],
                               monkeypatch, capsys)
        assert code == 2 and err.startswith("moesift: error:") and name in err, (name, err)
    code, _, err = run_cli(["trim", str(src), "--plan", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")],
                           monkeypatch, capsys)
    assert code == 2 and "not found" in err


def _sharded_copy(src: Path, dst: Path) -> Path:
    """A copy of `src` re-saved as two shards with an index."""
    from safetensors.torch import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = _tensors(src)
    names = sorted(sd)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(dst / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in part})
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


def test_refuses_broken_sources(qwen, tmp_path, monkeypatch, capsys):
    src, spec = qwen
    plan = _plan_file(tmp_path / "p.json", plan_for(spec, True))
    # missing shard
    d = _sharded_copy(src, tmp_path / "missing")
    (d / "model-00002-of-00002.safetensors").unlink()
    code, _, err = run_cli(["trim", str(d), "--plan", str(plan), "--out", str(tmp_path / "o1")], monkeypatch, capsys)
    assert code == 2 and "missing" in err
    # index naming a file outside the model directory
    d = _sharded_copy(src, tmp_path / "escape")
    idx = json.loads((d / INDEX_FILE).read_text())
    shutil.copy(d / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    idx["weight_map"] = {k: ("../outside.safetensors" if v.endswith("2.safetensors") else v)
                         for k, v in idx["weight_map"].items()}
    (d / INDEX_FILE).write_text(json.dumps(idx))
    code, _, err = run_cli(["trim", str(d), "--plan", str(plan), "--out", str(tmp_path / "o2")], monkeypatch, capsys)
    assert code == 2 and "outside" in err
    # pickle weights only
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    code, _, err = run_cli(["trim", str(d), "--plan", str(plan), "--out", str(tmp_path / "o3")], monkeypatch, capsys)
    assert code == 2 and "pickle" in err
    # output inside the source
    code, _, err = run_cli(["trim", str(src), "--plan", str(plan), "--out", str(src / "sub")], monkeypatch, capsys)
    assert code == 2 and "overlaps" in err
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()


def test_sharded_source_trims_like_single_file(qwen, tmp_path):
    src, spec = qwen
    res = plan_for(spec, True, seed=5)
    d = _sharded_copy(src, tmp_path / "sharded")
    a = trim(src, res, tmp_path / "a", progress=False)
    b = trim(d, res, tmp_path / "b", progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_group_imbalanced_plan_refused_for_standard_export(tiny_dir, tmp_path):
    grouped = [mt for mt in FAMILIES if (lambda s: s.n_group and s.n_group > 1 and s.n_experts // s.n_group >= 3)(
        CheckpointIndex.build(tiny_dir(mt)).spec)]
    if not grouped:
        pytest.skip("no tiny family with group-limited routing and >= 3 experts per group")
    src = tiny_dir(grouped[0])
    spec = CheckpointIndex.build(src).spec
    per = spec.n_experts // spec.n_group
    # same count in every layer, but groups unequal and not whole: 3 experts of group 0, 2 of group 1, ...
    n = max(spec.top_k, 5)
    ids = list(range(3)) + [per + i for i in range(n - 3)]
    with pytest.raises(MoesiftError, match="group"):
        trim(src, {layer: ids for layer in spec.moe_layers}, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_interrupted_trim_leaves_nothing(qwen, tmp_path, monkeypatch):
    T = importlib.import_module("moesift.apply.trim")

    src, spec = qwen
    calls = {"n": 0}
    real = T._copy_range

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "_copy_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        trim(src, plan_for(spec, True), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    # an interrupted overwrite keeps the old checkpoint intact
    monkeypatch.setattr(T, "_copy_range", real)
    out = trim(src, plan_for(spec, True), tmp_path / "out", progress=False)
    before = _sha(out)
    calls["n"] = 0
    monkeypatch.setattr(T, "_copy_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        trim(src, plan_for(spec, True, seed=9), tmp_path / "out", force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and _sha(out) == before


def test_wcer_manifest_drives_trim(qwen, tmp_path):
    src, spec = qwen
    per = [sorted(random.Random(i).sample(range(spec.n_experts), spec.n_experts // 2)) for i in range(len(spec.moe_layers))]
    m = {"schema_version": "resident-manifest/1", "model_id": "tiny", "n_experts": spec.n_experts,
         "n_layers": len(spec.moe_layers), "top_k": spec.top_k, "bank_name": "t-50pct", "hash_layers": [],
         "per_layer_resident": per, "budget_frac": 0.5, "n_resident_per_layer": spec.n_experts // 2}
    (tmp_path / "m.json").write_text(json.dumps(m))
    out = trim(src, tmp_path / "m.json", tmp_path / "o", progress=False)
    rec = json.loads((out / PLAN_FILE).read_text())
    assert rec["id_map"] == {str(layer): per[i] for i, layer in enumerate(spec.moe_layers)}


def test_fused_companions_and_inner_expert_dims_are_sliced(qwen, tmp_path, monkeypatch):
    """Quantized companions of fused experts (here MXFP4-style `*_blocks` in U8) are sliced as raw rows; a
    tensor whose expert dimension is not the outermost goes through the adapter's slice_experts."""
    import numpy as np
    from safetensors.numpy import load_file as np_load
    from safetensors.numpy import save_file as np_save

    from moesift.arch.qwen3_moe import Qwen3Moe
    from moesift.arch.spec import TensorRole

    src, spec = qwen
    d = tmp_path / "src"
    shutil.copytree(src, d)
    E = spec.n_experts
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (E, 6, 5), dtype=np.uint8)
    inner = rng.standard_normal((3, E, 2)).astype(np.float32)
    l0, l1 = spec.moe_layers[0], spec.moe_layers[-1]
    np_save({f"model.layers.{l0}.mlp.experts.down_proj_blocks": blocks,
             f"model.layers.{l1}.mlp.experts.odd_scale": inner}, str(d / "extra.safetensors"))
    st = json.loads((d / "model.safetensors.index.json").read_text()) if (d / INDEX_FILE).exists() else None
    if st is None:  # single-file source: turn it into an index over both files
        wm = {k: "model.safetensors" for k in _tensors(src)}
    else:
        wm = st["weight_map"]
    wm[f"model.layers.{l0}.mlp.experts.down_proj_blocks"] = "extra.safetensors"
    wm[f"model.layers.{l1}.mlp.experts.odd_scale"] = "extra.safetensors"
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    real = Qwen3Moe.classify

    def classify(self, name, config):
        if name.endswith("odd_scale"):
            return TensorRole("expert", layer=l1, expert_dim=1)
        return real(self, name, config)

    monkeypatch.setattr(Qwen3Moe, "classify", classify)
    res = plan_for(spec, uniform=True, seed=4)
    out = trim(d, res, tmp_path / "o", progress=False)
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(np_load(str(f)))
    np.testing.assert_array_equal(got[f"model.layers.{l0}.mlp.experts.down_proj_blocks"], blocks[res[l0]])
    np.testing.assert_array_equal(got[f"model.layers.{l1}.mlp.experts.odd_scale"], inner[:, res[l1]])
    assert _tensor_bytes(out) == CheckpointIndex.build(d).predicted_bytes(res)
