"""The tracer on a tiny random model of every family, checked against an independent recomputation.

The reference: a plain forward pre-hook on each MoE block captures the block's input; the family's
routing is recomputed from it by tests/ref_routing*.py (not through moesift's hooks) and counted over
the real (non-padding) tokens. Workloads are pre-tokenized JSONL (`input_ids`), as tiny models have no
tokenizer.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from ref_routing import REFERENCE
from tiny import TINY
from transformers import AutoModelForCausalLM

import moesift
from moesift.arch import adapter_for, supported_model_types

FAMILIES = sorted(TINY)
LENGTHS = [5, 11, 3, 8, 14, 6, 9]  # 7 documents, 3 per batch: padding in every batch
FOLDS = 3
BATCH = 3


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(7)
    return [[rng.randrange(1, 96) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def workload(tmp_path_factory, docs):
    p = tmp_path_factory.mktemp("wl") / "ids.jsonl"
    p.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in docs))
    return p


def _need_reference(model_type):
    if model_type not in supported_model_types():
        pytest.skip(f"{model_type}: no adapter registered in moesift/arch (tests/test_arch_contract.py covers it)")
    if model_type not in REFERENCE:
        pytest.skip(f"{model_type}: no independent reference routing registered in tests/ref_routing*.py")


class _Capture:
    """Inputs of every MoE block per forward, and the model's input ids per forward."""

    def __init__(self, model, spec, adapter):
        self.blocks = [adapter.moe_block(model, layer) for layer in spec.moe_layers]
        self.hidden: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.inputs: list[torch.Tensor] = []
        self.handles = []
        for m, blk in enumerate(self.blocks):
            self.handles.append(blk.register_forward_pre_hook(lambda mod, a, _m=m: self.hidden[_m].append(a[0].detach().clone())))

        def top(mod, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            self.inputs.append(x.detach().clone())

        self.handles.append(model.register_forward_pre_hook(top, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def _reference(model_type, cap, valid_per_forward):
    """Per MoE layer: list over forwards of (ids [T, K] sorted, weights [T, K] sorted, valid [T])."""
    out = []
    for m, blk in enumerate(cap.blocks):
        rows = []
        for f, h in enumerate(cap.hidden[m]):
            flat = h.reshape(-1, h.shape[-1])
            with torch.no_grad():
                ids, w = REFERENCE[model_type](blk, flat)
            order = ids.argsort(-1)
            rows.append((ids.gather(-1, order), w.float().gather(-1, order), valid_per_forward[f].reshape(-1)))
        out.append(rows)
    return out


def _right_padded_valid(lengths, batch):
    out = []
    for lo in range(0, len(lengths), batch):
        ls = lengths[lo : lo + batch]
        S = max(ls)
        out.append(torch.tensor([[s < n for s in range(S)] for n in ls]))
    return out


def _counts(ref, E, select=None):
    L = len(ref)
    c = np.zeros((L, E), np.int64)
    for m, rows in enumerate(ref):
        for f, (ids, _, v) in enumerate(rows):
            keep = v if select is None else v & select[f]
            np.add.at(c[m], ids[keep].reshape(-1).numpy(), 1)
    return c


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prefill_counts_match_independent_routing(model_type, tiny_dir, workload, docs):
    _need_reference(model_type)
    d = tiny_dir(model_type)
    model = _load(d)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    E, K, L = spec.n_experts, spec.top_k, len(spec.moe_layers)
    cap = _Capture(model, spec, ad)
    try:
        t = moesift.trace(model, workload, batch_size=BATCH, folds=FOLDS, log_routing=True, progress=False)
    finally:
        cap.remove()
    valid = _right_padded_valid(LENGTHS, BATCH)
    assert len(cap.inputs) == len(valid), "one forward per batch"
    ref = _reference(model_type, cap, valid)

    n_tok = sum(LENGTHS)
    assert t.workload["prefill_tokens"] == n_tok and t.workload["decode_tokens"] == 0
    assert t.workload["documents"] == len(docs)
    counts = t.arrays["prefill_counts"]
    assert counts.shape == (L, E)
    np.testing.assert_array_equal(counts, _counts(ref, E))
    assert (counts.sum(axis=1) == n_tok * K).all(), "routes per layer = tokens x top-k"

    # folds: document i in fold i % F; each fold's counts equal the reference restricted to its documents
    fc = t.arrays["fold_counts"]
    assert fc.shape == (FOLDS, L, E)
    np.testing.assert_array_equal(fc.sum(axis=0), counts)
    for f in range(FOLDS):
        sel = []
        for lo in range(0, len(LENGTHS), BATCH):
            rows = torch.tensor([(lo + r) % FOLDS == f for r in range(min(BATCH, len(LENGTHS) - lo))])
            sel.append(rows[:, None].expand(-1, max(LENGTHS[lo : lo + BATCH])))
        np.testing.assert_array_equal(fc[f], _counts(ref, E, [s.reshape(-1) for s in sel]))

    # router-weight mass: the weights the model applies, summed over real tokens
    wm = np.zeros((L, E))
    for m, rows in enumerate(ref):
        for ids, w, v in rows:
            np.add.at(wm[m], ids[v].reshape(-1).numpy(), w[v].reshape(-1).double().numpy())
    np.testing.assert_allclose(t.arrays["weight_mass"], wm, rtol=1e-4, atol=1e-5)
    if "prob_mass" in t.arrays:
        assert t.arrays["prob_mass"].shape == (L, E) and (t.arrays["prob_mass"] >= 0).all()

    # routing log: documents in order, real tokens only, the reference's ids
    log, offs = t.arrays["routing_log"], t.arrays["doc_offsets"]
    assert log.dtype == np.int16 and log.shape == (n_tok, L, K)
    np.testing.assert_array_equal(np.diff(offs), LENGTHS)
    assert (t.arrays["log_phase"] == 0).all()
    for m, rows in enumerate(ref):
        want = torch.cat([ids[v] for ids, _, v in rows])  # batches in order, rows in order = documents in order
        np.testing.assert_array_equal(np.sort(log[:, m, :], axis=-1), want.numpy())

    # co-activation and transitions against brute force over the routing log
    co = np.zeros((L, E, E), np.int64)
    tr = np.zeros((max(L - 1, 0), E, E), np.int64)
    for tok in log.astype(np.int64):
        for m in range(L):
            for a in tok[m]:
                for b in tok[m]:
                    if a != b:
                        co[m, a, b] += 1
                if m + 1 < L:
                    for b in tok[m + 1]:
                        tr[m, a, b] += 1
    np.testing.assert_array_equal(t.arrays["coactivation"], co)
    if L > 1:
        np.testing.assert_array_equal(t.arrays["transitions"], tr)

    # the same through the loading path (model directory) without padding (one document per batch)
    t_one = moesift.trace(str(d), workload, batch_size=1, folds=FOLDS, progress=False)
    np.testing.assert_array_equal(t_one.arrays["prefill_counts"], counts)
    np.testing.assert_array_equal(t_one.arrays["fold_counts"], fc)
    assert t_one.model["model_type"] == spec.model_type and t_one.model["moe_layers"] == list(spec.moe_layers)
    assert t_one.workload["token_sha256"] == t.workload["token_sha256"]
    assert t_one.model["config_hash"] == t.model["config_hash"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_records_decode_apart(model_type, tiny_dir, workload):
    _need_reference(model_type)
    model = _load(tiny_dir(model_type))
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    E, K = spec.n_experts, spec.top_k
    n_new = 3
    cap = _Capture(model, spec, ad)
    try:
        t = moesift.trace(model, workload, batch_size=BATCH, generate=n_new, folds=FOLDS, log_routing=True,
                          progress=False)
    finally:
        cap.remove()
    gc_eos = model.generation_config.eos_token_id
    eos = set(gc_eos if isinstance(gc_eos, list) else ([] if gc_eos is None else [gc_eos]))
    # which forward is which: per batch, the first forward is the (left-padded) prompt, the rest decode steps
    valid, phase = [], []
    batches = [LENGTHS[lo : lo + BATCH] for lo in range(0, len(LENGTHS), BATCH)]
    f = 0
    for ls in batches:
        S = max(ls)
        valid.append(torch.tensor([[s >= S - n for s in range(S)] for n in ls]))
        phase.append(0)
        f += 1
        done = torch.zeros(len(ls), dtype=torch.bool)
        while f < len(cap.inputs) and cap.inputs[f].shape[1] == 1:
            x = cap.inputs[f][:, 0]
            done = done | torch.tensor([int(v) in eos for v in x])
            valid.append((~done)[:, None])
            phase.append(1)
            f += 1
    assert f == len(cap.inputs)
    ref = _reference(model_type, cap, valid)
    pre = [torch.full_like(v, p == 0) for v, p in zip(valid, phase, strict=True)]
    dec = [torch.full_like(v, p == 1) for v, p in zip(valid, phase, strict=True)]
    np.testing.assert_array_equal(t.arrays["prefill_counts"], _counts(ref, E, [p.reshape(-1) for p in pre]))
    np.testing.assert_array_equal(t.arrays["decode_counts"], _counts(ref, E, [p.reshape(-1) for p in dec]))
    n_dec = sum(int(v.sum()) for v, p in zip(valid, phase, strict=True) if p == 1)
    assert t.workload["decode_tokens"] == n_dec > 0
    assert t.workload["prefill_tokens"] == sum(LENGTHS)
    assert (t.arrays["decode_counts"].sum(axis=1) == n_dec * K).all()
    np.testing.assert_array_equal(t.arrays["fold_counts"].sum(axis=0), t.counts)
    lp = t.arrays["log_phase"]
    assert int((lp == 1).sum()) == n_dec and len(lp) == sum(LENGTHS) + n_dec
    for i, o in enumerate(t.arrays["doc_offsets"][:-1]):  # per document: prompt tokens, then generated ones
        assert (lp[o : o + LENGTHS[i]] == 0).all()


def test_saliency(tiny_dir, workload):
    mt = "qwen3_moe"
    model = _load(tiny_dir(mt))
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    t = moesift.trace(model, workload, batch_size=BATCH, saliency=True, progress=False)
    s, c = t.arrays["saliency_sum"], t.arrays["saliency_count"]
    np.testing.assert_array_equal(c, t.arrays["prefill_counts"])
    assert (s[c > 0] > 0).all() and (s[c == 0] == 0).all()
    # layer 0, first document alone: gate weight x ||expert output|| from the expert weights directly
    one = moesift.trace(model, workload, max_samples=1, saliency=True, log_routing=True, progress=False)
    layer = spec.moe_layers[0]
    x = torch.tensor([json.loads(workload.read_text().splitlines()[0])["input_ids"]])
    hid = {}

    def grab(mod, a):
        hid["h"] = a[0][0]

    h = ad.moe_block(model, layer).register_forward_pre_hook(grab)
    with torch.no_grad():
        model(x)
    h.remove()
    ids, w = REFERENCE[mt](ad.moe_block(model, layer), hid["h"])
    ex = ad.experts(model, layer)
    want = np.zeros(spec.n_experts)
    for tok in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[tok, k])
            with torch.no_grad():
                g, u = (ex.gate_up_proj[e] @ hid["h"][tok]).chunk(2)
                y = ex.down_proj[e] @ (torch.nn.functional.silu(g) * u)
            want[e] += float(w[tok, k].detach()) * float(y.norm())
    np.testing.assert_allclose(one.arrays["saliency_sum"][0], want, rtol=1e-4, atol=1e-6)


def test_trace_saves_and_refuses_overwrite(tiny_dir, workload, tmp_path):
    out = tmp_path / "a.trace"
    t = moesift.trace(str(tiny_dir("qwen3_moe")), workload, out=out, label="ids", progress=False)
    back = moesift.Trace.load(out)
    assert back.label == "ids" and back.model == t.model
    np.testing.assert_array_equal(back.counts, t.counts)
    with pytest.raises(moesift.MoesiftError, match="already exists"):
        moesift.trace(str(tiny_dir("qwen3_moe")), workload, out=out, progress=False)
    moesift.trace(str(tiny_dir("qwen3_moe")), workload, out=out, force=True, max_samples=2, progress=False)
    assert moesift.Trace.load(out).workload["documents"] == 2
