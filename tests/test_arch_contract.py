"""The adapter contract, checked on a tiny random model of every registered family.

For each family: the spec agrees with the model; the recorder reports the routing an independent
re-implementation computes (tests/ref_routing*.py); restricting routing equals a checkpoint trimmed by the
deliberately simple reference trimmer (tests/naive_trim.py); every on-disk tensor gets a role; top-k can be
changed at run time.
"""

from __future__ import annotations

import random

import pytest
import torch
from naive_trim import naive_trim
from ref_routing import REFERENCE
from tiny import TINY
from transformers import AutoModelForCausalLM

from moesift.arch import adapter_for, supported_model_types
from moesift.core.errors import MoesiftError
from moesift.formats.checkpoint import CheckpointIndex

FAMILIES = sorted(TINY)


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _inputs(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, 9), generator=g)


def resident_for(spec, seed: int = 0) -> dict[int, list[int]]:
    """A uniform, servable, non-prefix resident set: half the experts of every MoE layer (whole groups, one
    in two, for group-limited routers)."""
    rng = random.Random(seed)
    out = {}
    for layer in spec.moe_layers:
        if layer in spec.hash_layers:
            out[layer] = list(range(spec.n_experts))
        elif spec.n_group and spec.n_group > 1:
            per = spec.n_experts // spec.n_group
            groups = sorted(rng.sample(range(spec.n_group), max(spec.n_group // 2, spec.topk_group or 1)))
            out[layer] = [g * per + j for g in groups for j in range(per)]
        else:
            out[layer] = sorted(rng.sample(range(spec.n_experts), max(spec.top_k, spec.n_experts // 2)))
    return out


def test_every_supported_family_has_a_tiny_model_and_reference():
    missing = [mt for mt in supported_model_types() if mt not in TINY or mt not in REFERENCE]
    assert not missing, f"families without a tiny config or reference routing: {missing}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_recorder_matches_independent_routing(model_type, tiny_dir):
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    assert spec.moe_layers and spec.top_k <= spec.n_experts
    routes, inputs, probs = {}, {}, {}
    hs = ad.attach_recorder(
        model,
        lambda m, r: routes.__setitem__(m, (r.ids.clone(), r.weights.clone())),
        lambda m, p: probs.__setitem__(m, p.clone()),
    )
    for m, layer in enumerate(spec.moe_layers):
        blk = ad.moe_block(model, layer)
        hs.append(
            blk.register_forward_pre_hook(lambda mod, a, _m=m: inputs.__setitem__(_m, a[0].reshape(-1, a[0].shape[-1])))
        )
    x = _inputs(model.config.vocab_size)
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    assert sorted(routes) == list(range(len(spec.moe_layers)))
    for m, layer in enumerate(spec.moe_layers):
        ids, w = REFERENCE[model_type](ad.moe_block(model, layer), inputs[m])
        got_ids, got_w = routes[m]
        assert got_ids.shape == (x.numel(), spec.top_k)
        o_ref, o_got = ids.argsort(-1), got_ids.argsort(-1)
        assert torch.equal(ids.gather(-1, o_ref), got_ids.gather(-1, o_got)), f"layer {layer}: selected ids differ"
        torch.testing.assert_close(w.float().gather(-1, o_ref), got_w.float().gather(-1, o_got), rtol=1e-4, atol=1e-5)
        assert probs[m].shape == (x.numel(), spec.n_experts)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_restrict_equals_trimmed_checkpoint(model_type, tiny_dir, tmp_path):
    d = tiny_dir(model_type)
    model = _load(d)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    resident = resident_for(spec)
    assert ad.plan_problems(spec, resident, standard=True) == []
    trimmed = _load(naive_trim(d, tmp_path / "t", resident))
    x = _inputs(model.config.vocab_size)
    with torch.no_grad():
        with ad.restrict(model, resident):
            restricted = model(x).logits
        small = trimmed(x).logits
        full = model(x).logits
    scale = restricted.abs().max().item()
    assert (restricted - small).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (full - restricted).abs().max().item() > 1e-4, "the restriction did not change the function"
    with torch.no_grad():  # leaving the context restores the model exactly
        assert torch.equal(model(x).logits, full)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tensor_has_a_role(model_type, tiny_dir):
    idx = CheckpointIndex.build(tiny_dir(model_type))
    spec = idx.spec
    layers = {e.role.layer for e in idx.tensors if e.role.kind in ("expert", "router")}
    assert layers == set(spec.moe_layers)
    per = idx.expert_bytes()
    for layer in spec.moe_layers:
        assert sorted(per[layer]) == list(range(spec.n_experts))
        assert len(set(per[layer].values())) == 1, "experts of one layer have equal sizes"
    kinds = idx.bytes_by_kind()
    assert sum(kinds.values()) == idx.total_bytes() == sum(e.nbytes for e in idx.tensors)
    assert kinds.get("expert", 0) > 0 and kinds.get("other", 0) > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_set_top_k(model_type, tiny_dir):
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    x = _inputs(model.config.vocab_size)
    seen = []
    hs = ad.attach_recorder(model, lambda m, r: seen.append(r.ids.shape[-1]))
    try:
        with torch.no_grad():
            full = model(x).logits
            try:
                with ad.set_top_k(model, 1):
                    one = model(x).logits
            except MoesiftError as e:
                pytest.skip(f"{model_type}: top-k is fixed ({e})")
            with ad.set_top_k(model, spec.top_k):
                same = model(x).logits
    finally:
        for h in hs:
            h.remove()
    assert 1 in seen
    torch.testing.assert_close(same, full)
    if spec.top_k > 1:
        assert (one - full).abs().max().item() > 1e-4
