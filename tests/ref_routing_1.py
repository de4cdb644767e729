"""Reference routing, written from each family's published rule: softmax top-k (Qwen2-MoE, Qwen3-Next, OLMoE:
renormalised when `norm_topk_prob`; Mixtral, MiniMax, Hunyuan: always renormalised; Jamba: never), Granite
(softmax over the top-k logits), Phi-MoE (SparseMixer at inference: best expert, then best of the rest, each
weighted by a softmax over the logits within a relative threshold 2 * jitter of it). Only router parameters
and the config are read; no router module is called."""

from __future__ import annotations

import torch
from ref_routing import reference


def _softmax_topk(weight, hidden, k: int, renormalise: bool):
    probs = torch.softmax(hidden.double() @ weight.double().T, dim=-1)
    vals, ids = probs.topk(k, dim=-1)
    if renormalise:
        vals = vals / vals.sum(-1, keepdim=True)
    return ids, vals


@reference("qwen2_moe", "qwen3_next", "olmoe")
def _qwen_style(block, hidden):
    g = block.gate
    return _softmax_topk(g.weight, hidden, g.top_k, bool(g.norm_topk_prob))


@reference("mixtral", "minimax")
def _mixtral(block, hidden):
    return _softmax_topk(block.gate.weight, hidden, block.gate.top_k, True)


@reference("jamba")
def _jamba(block, hidden):
    return _softmax_topk(block.router.weight, hidden, block.router.top_k, False)


@reference("hunyuan_v1_moe")
def _hunyuan(block, hidden):
    return _softmax_topk(block.gate.wg.weight, hidden, block.gate.top_k, True)


@reference("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa")
def _granite(block, hidden):
    logits = hidden.double() @ block.router.weight.double().T
    top, ids = logits.topk(block.router.top_k, dim=-1)
    return ids, torch.softmax(top, dim=-1)


@reference("phimoe")
def _phimoe(block, hidden):
    """Each of the two picks: the argmax of the logits still available; its weight is its softmax share among
    the available logits s with (best - s) / max(|s|, best) <= 2 * eps."""
    eps = float(block.router.router_jitter_noise)
    logits = hidden.double() @ block.router.weight.double().T
    available = torch.ones_like(logits, dtype=torch.bool)
    ids, weights = [], []
    for _ in range(2):
        scores = logits.masked_fill(~available, float("-inf"))
        best, pick = scores.max(dim=-1, keepdim=True)
        near = (best - logits) / logits.abs().clamp(min=best) <= 2 * eps
        kept = scores.masked_fill(~(near & available), float("-inf"))
        weights.append(torch.softmax(kept, dim=-1).gather(-1, pick))
        ids.append(pick)
        available = available.scatter(-1, pick, False)
    return torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)
