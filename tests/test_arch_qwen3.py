"""Contract checks on the example adapter (qwen3_moe); the other families have their own test files."""

from __future__ import annotations

import torch
from naive_trim import naive_trim
from ref_routing import REFERENCE
from transformers import AutoModelForCausalLM

from moesift.arch import adapter_for


def test_recorder_matches_reference_and_restrict_equals_trim(tiny_dir, tmp_path):
    d = tiny_dir("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    assert spec.moe_layers == (0, 2) and spec.n_experts == 8 and spec.top_k == 2
    routes, inputs = {}, {}
    hs = ad.attach_recorder(model, lambda m, r: routes.__setitem__(m, (r.ids.clone(), r.weights.clone())))
    for m, layer in enumerate(spec.moe_layers):
        blk = ad.moe_block(model, layer)
        hs.append(blk.register_forward_pre_hook(lambda mod, a, _m=m: inputs.__setitem__(_m, a[0].reshape(-1, a[0].shape[-1]))))
    x = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    for m, layer in enumerate(spec.moe_layers):
        ids, w = REFERENCE["qwen3_moe"](ad.moe_block(model, layer), inputs[m])
        assert torch.equal(ids.sort(-1).values, routes[m][0].sort(-1).values)
    resident = {0: [1, 3, 4, 6], 2: [0, 2, 5, 7]}
    trimmed = AutoModelForCausalLM.from_pretrained(naive_trim(d, tmp_path / "t", resident), dtype=torch.float32).eval()
    with torch.no_grad(), ad.restrict(model, resident):
        full = model(x).logits
    with torch.no_grad():
        small = trimmed(x).logits
        unrestricted = model(x).logits
    assert (full - small).abs().max().item() <= 1e-6
    assert (full - unrestricted).abs().max().item() > 1e-4  # the restriction really changes the function
