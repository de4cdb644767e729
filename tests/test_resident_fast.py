"""Loading with every byte read into its final place (`moesift.engines.assemble`): `load_resident` and
`load_trimmed` give bit for bit the parameters, buffers and logits that transformers' own loading gives
(`from_pretrained` of the trimmed checkpoint, and transformers' conversion path for plans with counts that
differ by layer), on families with per-expert tensors on disk, renamed blocks, fused experts, a shared
expert and selection biases; and the fast arrangement is the one taken, not a fallback."""

from __future__ import annotations

import os

import pytest
import torch
from test_trim import _inputs, plan_for
from tiny import TINY
from transformers import AutoModelForCausalLM

from moesift.apply.resident import load_resident, load_trimmed, variable_expert_class
from moesift.apply.trim import trim
from moesift.engines.assemble import meta_model, model_sources
from moesift.engines.hf import from_pretrained_checked
from moesift.engines.tensors import layout_sources, read_layout
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.trimmed import plan_layout

# per-expert on disk (qwen3_moe, olmoe, deepseek_v3 with a shared expert and a selection bias; mixtral and
# phimoe with renamed blocks), shared expert with its gate (qwen2_moe), fused on disk (gpt_oss, granitemoe)
FAMILIES = ["qwen3_moe", "deepseek_v3", "mixtral", "olmoe", "gpt_oss", "qwen2_moe", "granitemoe"]


def _same(a: torch.nn.Module, b: torch.nn.Module, logits: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones (rotary) included
    assert list(ba) == list(bb)
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and pa.device.type != "meta" and pb.device.type != "meta", na
    if logits:
        x = _inputs(int(a.config.get_text_config().vocab_size))
        with torch.no_grad():
            assert torch.equal(a(x).logits, b(x).logits)


def _converted(src, plan):
    """(the model `load_resident(src, plan)` builds, loaded through transformers' conversion path: the
    checkpoint's own tensors handed to from_pretrained; whether the fast arrangement applies)."""
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    full = {layer: sorted(plan.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
    cls, cfg = variable_expert_class(idx.config, full)
    layout = plan_layout(idx, plan)
    specs, ready = layout_sources(idx, layout)
    arranged = model_sources(meta_model(cls, cfg), specs, ready) is not None
    conv = from_pretrained_checked(cls, None, src, config=cfg, state_dict=read_layout(idx, layout, "cpu"),
                                   dtype="auto").eval()
    return conv, arranged


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_family_is_arranged_as_transformers_converts(model_type, tiny_dir):
    """Every family takes the fast arrangement (no fallback) and gets the same parameters and buffers."""
    src = tiny_dir(model_type)
    plan = plan_for(CheckpointIndex.build(src).spec, uniform=False)
    conv, arranged = _converted(src, plan)
    assert arranged
    _same(load_resident(src, plan, device="cpu"), conv, logits=False)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fast_loading_equals_transformers_loading(model_type, tiny_dir, tmp_path):
    src = tiny_dir(model_type)
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    uniform = plan_for(spec, uniform=True)
    out = trim(src, uniform, tmp_path / "u", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    _same(load_resident(src, uniform, device="cpu"), ref)
    _same(load_trimmed(out, device="cpu")[0], ref)
    ref16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    _same(load_resident(src, uniform, device="cpu", dtype="bfloat16"), ref16)

    varied = plan_for(spec, uniform=False)
    conv, _ = _converted(src, varied)
    _same(load_resident(src, varied, device="cpu"), conv)
    _same(load_trimmed(trim(src, varied, tmp_path / "v", progress=False), device="cpu")[0], conv)


def test_tied_output_stays_tied(tiny_dir):
    """A family whose tiny model ties its output projection to the embedding (ernie4_5_moe)."""
    src = tiny_dir("ernie4_5_moe")
    idx = CheckpointIndex.build(src)
    m = load_resident(src, plan_for(idx.spec, uniform=True), device="cpu")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_without_linux_only_calls_the_same_models(tiny_dir, tmp_path, monkeypatch):
    """Where Python has no `os.copy_file_range`, `os.preadv` or `os.posix_fadvise` (macOS), the trim copies
    with reads and writes and the loaders read with `os.pread`: the same files, checksums and models."""
    import moesift.apply.writer as writer

    src = tiny_dir("qwen3_moe")
    plan = plan_for(CheckpointIndex.build(src).spec, uniform=False)
    linux = trim(src, plan, tmp_path / "linux", progress=False)
    resident = load_resident(src, plan, device="cpu")
    for name in ("copy_file_range", "preadv", "posix_fadvise"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(writer, "_ADVISE", None)
    other = trim(src, plan, tmp_path / "other", progress=False)
    for f in sorted(linux.iterdir()):  # the record too: the same checksums
        assert (other / f.name).read_bytes() == f.read_bytes(), f.name
    _same(load_resident(src, plan, device="cpu"), resident)
    _same(load_trimmed(other, device="cpu")[0], load_trimmed(linux, device="cpu")[0])
