"""Reference routing, written from each family's published rule: DeepSeek-V2 (softmax, group-limited greedy,
routed scaling), DeepSeek-V3 / Kimi-K2 / GLM-4-MoE / dots1 (sigmoid + correction bias, group-limited top-k,
renormalised, routed scaling), ERNIE-4.5 (softmax, bias added for selection only), gpt-oss (top-k of biased
logits, softmax over the k), Llama-4 (sigmoid of the top-k logits), DBRX (softmax top-k, p-norm
normalisation). Only router parameters and the config are read; no router module is called."""

from __future__ import annotations

import torch
from ref_routing import reference


def _group_allowed(choice: torch.Tensor, n_group: int, topk_group: int, top_in_group: int) -> torch.Tensor:
    """[T, E] bool: experts inside the `topk_group` groups whose score (sum of the `top_in_group` best
    choice scores of the group) is highest."""
    t, e = choice.shape
    per = e // n_group
    score = choice.reshape(t, n_group, per).sort(dim=-1, descending=True).values[..., :top_in_group].sum(-1)
    best = score.argsort(dim=-1, descending=True)[:, :topk_group]
    allowed = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, best, True)
    return allowed[:, :, None].expand(t, n_group, per).reshape(t, e)


@reference("deepseek_v2")
def _deepseek_v2(block, hidden):
    cfg = block.config
    probs = torch.softmax(hidden.double() @ block.gate.weight.double().T, dim=-1)
    choice = probs
    if cfg.topk_method == "group_limited_greedy":
        choice = probs.masked_fill(~_group_allowed(probs, cfg.n_group, cfg.topk_group, 1), -1.0)
    ids = choice.argsort(dim=-1, descending=True)[:, : cfg.num_experts_per_tok]
    return ids, probs.gather(1, ids) * cfg.routed_scaling_factor


@reference("deepseek_v3", "kimi_k2", "glm4_moe", "dots1")
def _sigmoid_bias_grouped(block, hidden):
    cfg = block.config
    scores = torch.sigmoid(hidden.double() @ block.gate.weight.double().T)
    choice = scores + block.gate.e_score_correction_bias.double()
    choice = choice.masked_fill(~_group_allowed(choice, cfg.n_group, cfg.topk_group, 2), float("-inf"))
    ids = choice.argsort(dim=-1, descending=True)[:, : cfg.num_experts_per_tok]
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return ids, w * cfg.routed_scaling_factor


@reference("ernie4_5_moe")
def _ernie(block, hidden):
    probs = torch.softmax(hidden.double() @ block.gate.weight.double().T, dim=-1)
    bias = block.gate.moe_statics.e_score_correction_bias.double().reshape(-1)
    ids = (probs + bias).argsort(dim=-1, descending=True)[:, : block.top_k]
    w = probs.gather(1, ids)
    return ids, w / w.sum(-1, keepdim=True).clamp(min=block.gate.norm_min)


@reference("gpt_oss")
def _gpt_oss(block, hidden):
    r = block.router
    logits = hidden.double() @ r.weight.double().T + r.bias.double()
    ids = logits.argsort(dim=-1, descending=True)[:, : r.top_k]
    return ids, torch.softmax(logits.gather(1, ids), dim=-1)


@reference("llama4_text")
def _llama4(block, hidden):
    logits = hidden.double() @ block.router.weight.double().T
    ids = logits.argsort(dim=-1, descending=True)[:, : block.top_k]
    return ids, torch.sigmoid(logits.gather(1, ids))


@reference("dbrx")
def _dbrx(block, hidden):
    probs = torch.softmax(hidden.double() @ block.router.layer.weight.double().T, dim=-1)
    ids = probs.argsort(dim=-1, descending=True)[:, : block.top_k]
    w = probs.gather(1, ids)
    p = block.moe_normalize_expert_weights
    if p is not None:
        w = w / w.norm(p=p, dim=-1, keepdim=True)
    return ids, w
