"""What a family adapter describes: the MoE shape of a model (`MoESpec`), the role of each checkpoint tensor
(`TensorRole`), how routing is read (`Route`), name patterns (`Patterns`), and small helpers every adapter uses
(config lookup, group-limit rules, scores from router logits)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import MoesiftError
from ..core.values import is_int


def cfg_get(config: Any, *names: str, default: Any = None) -> Any:
    """First present attribute / key among `names` (configs on disk and in memory spell keys differently)."""
    for n in names:
        if isinstance(config, Mapping):
            if n in config and config[n] is not None:
                return config[n]
        else:
            v = getattr(config, n, None)
            if v is not None:
                return v
    return default


def required_int(config: Any, keys: Sequence[str], what: str, lo: int = 1) -> int:
    """The first of `keys` present in `config`, as an integer >= `lo`. A routing key the config does not
    carry is an error, never a default: a default describes some other model."""
    v = cfg_get(config, *keys)
    if v is None:
        raise MoesiftError(f"the config has no {keys[0]!r} ({what}); moesift does not guess it: add it to "
                           "config.json")
    if not is_int(v) or int(v) < lo:
        raise MoesiftError(f"the config's {keys[0]!r} ({what}) must be an integer >= {lo} (got {str(v)[:40]})")
    return int(v)


@dataclass(frozen=True)
class MoESpec:
    """What a config says about the MoE layers. Needs no weights."""

    model_type: str
    moe_layers: tuple[int, ...]  # decoder layer ids that hold routed experts, in order
    n_experts: int
    top_k: int
    n_shared: int = 0  # shared (always-on) experts per MoE layer
    scoring: str = "softmax"  # "softmax" | "sigmoid" (how router logits become probabilities)
    n_group: int | None = None  # group-limited routing: groups of n_experts // n_group experts
    topk_group: int | None = None
    hash_layers: tuple[int, ...] = ()  # decoder layer ids routed by a fixed table: keep whole

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "moe_layers": list(self.moe_layers),
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "n_shared": self.n_shared,
            "scoring": self.scoring,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "hash_layers": list(self.hash_layers),
        }


@dataclass(frozen=True)
class TensorRole:
    """What one on-disk tensor is, for byte accounting and trimming.

    kind:
      - "router": router weight rows (one row per expert along `expert_dim`) of decoder layer `layer`
      - "router_bias": router bias / selection bias with an expert dimension (`expert_dim`)
      - "expert": weights of routed experts; `expert` set for per-expert tensors, else the tensor is fused
        with experts along `expert_dim` (and quantized companions the same way)
      - "shared": shared / always-on experts of a MoE layer
      - "mtp": a multi-token-prediction layer stored after the last decoder layer (`layer` set); its experts
        belong to a router no trace sees, so a trim that removes experts drops these layers (see
        `Adapter.mtp_layers`)
      - "other": everything else (attention, norms, embeddings, dense MLPs)
    `expert_block`: for fused 2-D layouts that stack experts as [E * n, ...] along `expert_dim`
    (DBRX), the number of rows per expert; None when the dimension indexes experts directly.
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    expert_dim: int | None = None
    expert_block: int | None = None

    @property
    def sliced(self) -> bool:
        """True when trimming slices this tensor along an expert dimension."""
        return self.expert_dim is not None and self.expert is None


OTHER = TensorRole("other")


@dataclass
class Route:
    """One MoE layer's routing decision for a flat batch of T tokens (T = batch x sequence)."""

    ids: Any  # LongTensor [T, K], expert ids the model selected
    weights: Any  # Tensor [T, K], the routing weights the model applies
    hidden: Any = None  # Tensor [T, H], the input of the experts (for saliency)


@dataclass
class Patterns:
    """Regexes over on-disk tensor names. Each must have a named group `layer`; per-expert ones `expert`."""

    router: Sequence[str] = ()
    router_bias: Sequence[str] = ()
    expert: Sequence[str] = ()  # per-expert tensors: groups layer, expert
    fused: Sequence[tuple[str, int]] = ()  # (regex, expert_dim) for fused expert tensors
    shared: Sequence[str] = ()
    compiled: list[tuple[str, re.Pattern, int | None]] = field(default_factory=list, repr=False)

    def compile(self) -> list[tuple[str, re.Pattern, int | None]]:
        if not self.compiled:
            for kind, pats in (("router", self.router), ("router_bias", self.router_bias), ("expert", self.expert)):
                for p in pats:
                    self.compiled.append((kind, re.compile(p), 0))
            for p, dim in self.fused:
                self.compiled.append(("fused", re.compile(p), dim))
            for p in self.shared:
                self.compiled.append(("shared", re.compile(p), None))
        return self.compiled


MLX_QUANT_PARTS = r"(weight|scales|biases)"


def mlx_switch_patterns(block: str) -> Patterns:
    """Tensor names of an mlx-lm model folder (as `mlx_lm.convert` writes it) for the MoE block regex `block`
    (with a group `layer`): the router `gate` (one row per expert; a quantized router stores its packed
    `weight` with `scales` and `biases` of the same rows) and the stacked experts
    `switch_mlp.{gate,up,down}_proj` with the expert dimension first (weight, and scales / biases when
    quantized)."""
    q = MLX_QUANT_PARTS
    return Patterns(router=(rf"{block}\.gate\.{q}",),
                    fused=((rf"{block}\.switch_mlp\.(gate|up|down)_proj\.{q}", 0),))


@dataclass(frozen=True)
class MlxRouter:
    """How mlx-lm builds a family's MoE block: the block is `block` of decoder layer i
    (``model.layers.{i}.{block}``) and its router module is `gate` (a dotted path inside the block).

    Two kinds of router module:
      - `select` None: the module returns the router logits (a Linear, or a QuantizedLinear in a quantized
        folder) and the block selects from them by softmax over all experts, top-k, and then renormalises the
        k weights as `renorm` says: "always", "never", or "config" (the config's ``norm_topk_prob``);
      - `select` set: the module selects itself from the logits ``x @ gate.weight.T`` and returns (ids [..., k],
        weights [..., k]); ``select(gate, logits, mask)`` is the family's selection from those logits with the
        additive expert mask `mask` (0 for resident experts, -inf else) applied wherever the family's own
        restriction masks (the logits, and a selection bias when the family has one).
    `pick`: for a logits router whose block selects otherwise than by softmax top-k, ``pick(block, logits)`` is
    the block's own selection (ids, weights) from the router logits.
    `top_k_at`: the module, relative to the block, whose integer attribute ``top_k`` or
    ``num_experts_per_tok`` the block selects with ("": the block itself)."""

    block: str
    renorm: str = "always"  # "always" | "never" | "config"
    gate: str = "gate"
    select: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None
    pick: Callable[[Any, Any], tuple[Any, Any]] | None = None
    top_k_at: str = ""

    def gate_path(self, layer: int) -> str:
        """Module path of decoder layer `layer`'s router in the mlx-lm model."""
        return f"{self.block_path(layer)}.{self.gate}"

    def block_path(self, layer: int) -> str:
        """Module path of decoder layer `layer`'s MoE block in the mlx-lm model."""
        return f"model.layers.{layer}.{self.block}"

    def top_k_path(self, layer: int) -> str:
        """Module path of the module holding decoder layer `layer`'s top-k attribute."""
        return self.block_path(layer) + (f".{self.top_k_at}" if self.top_k_at else "")

    def renormalises(self, config: Any) -> bool:
        """Whether the block divides the k selected weights by their sum, for `config`."""
        if self.renorm == "config":
            return bool(cfg_get(config, "norm_topk_prob", default=False))
        return self.renorm == "always"


def equal_group_floor(n_experts: int, n_group: int, topk_group: int | None, top_k: int, score_top: int) -> int:
    """Fewest experts per group when every group of a group-limited router keeps the same number: the
    group score's terms (`score_top`), and enough in the `topk_group` selectable groups for top-k."""
    per = n_experts // n_group
    return min(max(score_top, -(-top_k // int(topk_group or n_group))), per)


def group_problems(spec: MoESpec, resident: Mapping[int, Sequence[int]], standard: bool) -> list[str]:
    """Group-limited routing: a group with fewer than 2 resident experts can never win (its score is a
    sum of its top-2); a standard export keeps whole groups or an equal count in every group."""
    assert spec.n_group
    per = spec.n_experts // spec.n_group
    problems = []
    for layer, ids in resident.items():
        sizes = [sum(1 for i in ids if i // per == g) for g in range(spec.n_group)]
        if any(s == 1 for s in sizes):
            problems.append(f"layer {layer}: a group holds a single resident expert (groups need 0 or >= 2)")
        if standard:
            kept = [s for s in sizes if s]
            whole = all(s == per for s in kept)
            equal = len(set(sizes)) == 1
            if not (whole or equal):
                problems.append(
                    f"layer {layer}: group sizes {sizes}; a standard checkpoint keeps whole groups or the "
                    "same number in every group"
                )
    return problems


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def has_path(obj: Any, path: str) -> bool:
    try:
        get_path(obj, path)
        return True
    except (AttributeError, IndexError):
        return False


def expert_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(hidden, ids, weights) from the positional / keyword arguments of an experts forward."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [None] * (3 - len(args[:3]))
    for i, n in enumerate(names):
        if vals[i] is None and n in kwargs:
            vals[i] = kwargs[n]
    if any(v is None for v in vals):
        alt = [v for k, v in kwargs.items() if k not in names]
        vals = [v if v is not None else alt.pop(0) for v in vals]
    return vals[0], vals[1], vals[2]


def scores_from_logits(logits: Any, scoring: str) -> Any:
    """Router probabilities from logits [..., E]: softmax over the experts, or the sigmoid score, in float32."""
    import torch

    x = logits.float()
    return torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, dim=-1)
