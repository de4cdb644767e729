"""DeepSeek-V2: softmax router `mlp.gate` (greedy or group-limited greedy, group score = best expert of the
group), weights times `routed_scaling_factor` (no renormalisation), shared experts, dense first layers.

Also the base of the sigmoid + bias group-limited families (deepseek_v3.py, glm4_moe.py, dots1.py): the group
rules and the `n_group` rewrite live here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..core.values import int_or_none
from .registry import register
from .spec import MlxRouter, Patterns, cfg_get, mlx_switch_patterns
from .standard import StandardAdapter

L = r"model\.layers\.(?P<layer>\d+)\.mlp"
DEEPSEEK_PATTERNS = Patterns(
    router=(rf"{L}\.gate\.weight",),
    router_bias=(rf"{L}\.gate\.e_score_correction_bias",),
    expert=(rf"{L}\.experts\.(?P<expert>\d+)\.(gate|up|down)_proj\.[\w.]+",),
    fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
    shared=(rf"{L}\.shared_experts\.[\w.]+",),
)


def mlx_select(gate: Any, logits: Any, mask: Any) -> tuple[Any, Any]:
    """mlx-lm's DeepSeek-V2 gate (`MoEGate` of mlx_lm.models.deepseek_v2, the same operations) on the router
    logits plus `mask`: softmax over all experts, group-limited greedy (a group's score is its best expert)
    when `topk_method` says so, top-k, times `routed_scaling_factor`; no renormalisation."""
    import mlx.core as mx

    scores = mx.softmax(logits + mask.astype(logits.dtype), axis=-1, precise=True)
    if gate.topk_method == "group_limited_greedy":
        lead = scores.shape[:-1]
        scores = scores.reshape(*lead, gate.n_group, -1)
        group_scores = scores.max(axis=-1, keepdims=True)
        k = gate.n_group - gate.topk_group
        group_idx = mx.stop_gradient(mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :])
        scores = mx.put_along_axis(scores, group_idx, mx.array(0.0, scores.dtype), axis=-2)
        scores = scores.reshape(*lead, -1)
    k = gate.top_k
    inds = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
    return inds, mx.take_along_axis(scores, inds, axis=-1) * gate.routed_scaling_factor


@register
class DeepseekV2(StandardAdapter):
    model_types = ("deepseek_v2",)
    n_experts_keys = ("n_routed_experts", "num_experts", "num_local_experts")
    patterns = DEEPSEEK_PATTERNS
    mlx_patterns = mlx_switch_patterns(L)
    # mlx-lm: the gate `mlp.gate` selects itself (`MoEGate`: ids and weights), the block sums the experts
    mlx_router = MlxRouter("mlp", select=mlx_select, top_k_at="gate")
    normalise_selection = False  # V2 scales its top-k probabilities, it never renormalises them
    # a group's score is the sum of its best `group_score_top` experts: 1 for V2 (max), 2 for V3-style routers
    group_score_top: ClassVar[int] = 1
    tied_output_unsupported = ("mlx",)  # mlx-lm's deepseek_v2 / v3 and glm4_moe always build lm_head

    def is_moe_layer(self, config, i):
        n = int(cfg_get(config, *self.n_experts_keys, default=0) or 0)
        freq = int(cfg_get(config, "moe_layer_freq", default=1) or 1)  # as DeepSeek's own code and vLLM read it
        return n > 0 and i >= int(cfg_get(config, "first_k_dense_replace", default=0) or 0) and i % freq == 0

    def groups(self, config):
        if cfg_get(config, "topk_method", default="greedy") != "group_limited_greedy":
            return None, None
        return int_or_none(cfg_get(config, "n_group")), int_or_none(cfg_get(config, "topk_group"))

    def engine_problems(self, engine, config):
        if engine == "mlx" and type(self) is DeepseekV2 and not isinstance(config.get("rope_scaling"), dict):
            return ["mlx-lm's deepseek_v2 needs the YaRN `rope_scaling` of hub DeepSeek-V2 configs; this "
                    "config.json has none"]
        n_layers = int(cfg_get(config, "num_hidden_layers", default=0) or 0)
        mla = config.get("kv_lora_rank") is not None  # DeepSeek attention (not GLM-4-MoE's or dots1's)
        if engine == "llama.cpp" and mla and config.get("q_lora_rank") is None and n_layers not in (26, 27):
            return ["llama.cpp's deepseek2 needs q_lora_rank (queries without a low-rank projection are read "
                    "only for the layer counts of DeepSeek-V2-Lite-like models); this config.json has none"]
        return []

    def plan_problems(self, spec, resident, standard):
        if not (spec.n_group and spec.n_group > 1):
            return super().plan_problems(spec, resident, standard)
        problems = super().plan_problems(dataclasses.replace(spec, n_group=None), resident, standard)
        per, top = spec.n_experts // spec.n_group, self.group_score_top
        kept_groups = set()
        for layer, ids in sorted(resident.items()):
            sizes = _group_sizes(ids, spec.n_experts, spec.n_group)
            if top > 1 and any(0 < s < top for s in sizes):
                problems.append(
                    f"layer {layer}: a group holds fewer than {top} resident experts; its group score is -inf "
                    f"and its experts are unreachable (keep 0 or >= {top} per group)"
                )
            nonzero = sorted(s for s in sizes if s)
            if sum(nonzero[: spec.topk_group or spec.n_group]) < spec.top_k:
                problems.append(
                    f"layer {layer}: the {spec.topk_group} selectable groups can hold fewer than top-k "
                    f"{spec.top_k} resident experts (group sizes {sizes})"
                )
            if standard:
                whole, equal = all(s == per for s in nonzero), len(set(sizes)) == 1
                if not (whole or equal):
                    problems.append(
                        f"layer {layer}: group sizes {sizes}; a standard checkpoint keeps whole groups or the "
                        "same number in every group"
                    )
                kept_groups.add(_kept_groups(sizes, per))
        if standard and len(kept_groups) > 1:
            problems.append(f"MoE layers keep different numbers of groups {sorted(kept_groups)}; a standard "
                            "checkpoint needs one n_group")
        return problems

    def rewrite_config(self, config, resident):
        out = super().rewrite_config(config, resident)
        n_group, topk_group = self.groups(config)
        if n_group and n_group > 1:
            n = int(cfg_get(config, *self.n_experts_keys))
            ids = max(resident.values(), key=len)
            kept = _kept_groups(_group_sizes(ids, n, n_group), n // n_group)
            top = min(int(topk_group or kept), kept)
            if top >= kept:  # every kept group is selectable: group limiting is a no-op, say so as one group
                kept = top = 1  # (llama.cpp refuses topk_group == n_group; transformers, vLLM, SGLang agree)
            out["n_group"] = kept
            out["topk_group"] = top
        return out




def _group_sizes(ids, n_experts: int, n_group: int) -> list[int]:
    per = n_experts // n_group
    sizes = [0] * n_group
    for i in ids:
        if 0 <= i < n_experts:
            sizes[i // per] += 1
    return sizes


def _kept_groups(sizes: list[int], per: int) -> int:
    """n_group of the trimmed layer: the groups kept when whole groups are dropped, else unchanged (an equal
    count kept in every group)."""
    nonzero = [s for s in sizes if s]
    return len(nonzero) if all(s == per for s in nonzero) else len(sizes)
