"""The adapter contract: everything moesift needs to know about one MoE family.

Generic code (tracer, analysis, plan, trim, verify) talks to models and checkpoints only through an
`Adapter`. Each family file in this package subclasses `Adapter` (usually `StandardAdapter`, which
covers the common `block.gate` + `block.experts` layout of transformers 5) and registers itself with
`@register`. Generic code never tests a family name.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import MoesiftError

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available for each of its `model_types`."""
    for mt in cls.model_types:
        if mt in _REGISTRY:
            raise RuntimeError(f"model_type {mt!r} registered twice ({_REGISTRY[mt].__name__}, {cls.__name__})")
        _REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    from . import _load_all

    _load_all()
    return sorted(_REGISTRY)


def adapter_for(config: Any) -> Adapter:
    """The adapter for a transformers config (or a config dict with `model_type`)."""
    from . import _load_all

    _load_all()
    mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    cls = _REGISTRY.get(mt or "")
    if cls is None:
        raise MoesiftError(
            f"model_type {mt!r} is not a supported MoE family; supported: {', '.join(supported_model_types())}"
        )
    return cls()


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


class Adapter:
    """Family knowledge. Subclass, set `model_types`, implement or inherit the methods below."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # group-limited routers: a group's score is the sum of its best `group_score_top` experts, so a group
    # kept with fewer resident experts can never be selected (0 or at least this many per group)
    group_score_top: ClassVar[int] = 2

    # ---- config ---------------------------------------------------------------------------------
    def spec(self, config: Any) -> MoESpec:
        """MoE layout from a transformers config object or a config.json dict."""
        raise NotImplementedError

    def model_shape(self, config: Any) -> dict[str, int | None]:
        """``hidden_size`` (width of a token's hidden state) and ``num_hidden_layers`` (decoder layers, dense
        ones included) from a transformers config object or a config.json dict; None where the config does
        not say. Placement needs them for all-to-all bytes and for per-decoder-layer expert maps."""
        h = cfg_get(config, "hidden_size", "d_model")
        n = cfg_get(config, "num_hidden_layers", "n_layers")
        return {"hidden_size": int(h) if h else None, "num_hidden_layers": int(n) if n else None}

    def rewrite_config(self, config: dict[str, Any], resident: Mapping[int, Sequence[int]]) -> dict[str, Any]:
        """config.json of a checkpoint trimmed to `resident` ({decoder layer: kept original ids}).

        Uniform plans must give a config that stock transformers loads. Non-uniform plans are handled by
        the trimmer (it records per-layer counts); adapters only rewrite the fields for the largest count.
        """
        raise NotImplementedError

    # config keys that transformers 5 saves under another name than hub checkpoints of the family use:
    # {transformers-5 name: hub name}
    hub_renames: ClassVar[dict[str, str]] = {}
    # keys hub checkpoints of the family carry (and engines read) with the meaning these weights need,
    # added when absent: {key: value}
    hub_defaults: ClassVar[dict[str, Any]] = {}

    def hub_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` (a config.json dict) with the key names hub checkpoints of this family use, which is what
        serving engines (vLLM, SGLang, mlx-lm, llama.cpp's converter) read: transformers-5 renames undone,
        a single `rope_parameters` also written as `rope_theta` / `rope_scaling` / `partial_rotary_factor`
        (it stays: transformers 5 reads it first, and some families default to another rope without it),
        and the family's routing keys (`hub_defaults`) added where absent. Every other key is kept."""
        out = dict(config)
        for new, old in self.hub_renames.items():
            if new in out and old not in out:
                out[old] = out.pop(new)
        rope = out.get("rope_parameters")
        if isinstance(rope, Mapping) and "rope_theta" in rope:  # one rope for every layer (not per layer type)
            out.setdefault("rope_theta", rope["rope_theta"])
            if "partial_rotary_factor" in rope:
                out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            rest = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            kind = rest.get("rope_type", rest.get("type", "default"))
            out.setdefault("rope_scaling", None if kind == "default" else {**rest, "type": kind, "rope_type": kind})
        for k, v in self.hub_defaults.items():
            out.setdefault(k, v)
        return out

    def engine_problems(self, engine: str, config: Mapping[str, Any]) -> list[str]:
        """Why serving engine `engine` ("mlx", "llama.cpp") cannot run a checkpoint of this family with
        `config` (its config.json) although it implements the model_type; empty when it can."""
        return []

    def plan_problems(self, spec: MoESpec, resident: Mapping[int, Sequence[int]], standard: bool) -> list[str]:
        """Why `resident` cannot be served (empty list when it can). `standard`: must load in stock
        transformers (equal counts per layer, group rules). Generic rules are checked here."""
        problems = []
        for layer, ids in resident.items():
            if len(set(ids)) != len(ids):
                problems.append(f"layer {layer}: duplicate expert ids")
            if any(i < 0 or i >= spec.n_experts for i in ids):
                problems.append(f"layer {layer}: expert id out of range 0..{spec.n_experts - 1}")
            if len(ids) < spec.top_k:
                problems.append(f"layer {layer}: {len(ids)} experts kept, below top-k {spec.top_k}")
            if layer in spec.hash_layers and len(ids) != spec.n_experts:
                problems.append(f"layer {layer}: hash-routed layers must be kept whole")
        if standard and len({len(v) for v in resident.values()}) > 1:
            problems.append("a standard checkpoint needs the same number of experts in every MoE layer (use --uniform)")
        if spec.n_group and spec.n_group > 1:
            problems += group_problems(spec, resident, standard)
        return problems

    # ---- loaded model -----------------------------------------------------------------------------
    def moe_block(self, model: Any, layer: int) -> Any:
        """The module holding router + experts of decoder layer `layer`."""
        raise NotImplementedError

    def attach_recorder(
        self,
        model: Any,
        on_route: Callable[[int, Route], None],
        on_logits: Callable[[int, Any], None] | None = None,
        want_hidden: bool = False,
    ) -> list[Any]:
        """Install hooks that call `on_route(moe_index, Route)` once per MoE layer and forward, and
        `on_logits(moe_index, probs [T, E])` with the router probabilities over all experts (or, when
        `on_logits` has a true attribute ``wants_logits``, with the router logits [T, E] as the router
        returned them: probabilities are then the spec's scoring of their float32 value).
        Returns hook handles (call `.remove()` on each). Hooks must not copy to the host."""
        raise NotImplementedError

    def expert_output(self, model: Any, layer: int, hidden: Any, ids: Any) -> Any:
        """Output of expert ids[t] on hidden[t], unweighted: Tensor [T, H] (for saliency)."""
        raise NotImplementedError

    def replace_moe_block(self, model: Any, layer: int, block: Any) -> None:
        """Put `block` (a module built for another expert count) in place of decoder layer `layer`'s MoE
        block; used to build models whose MoE layers hold different numbers of experts."""
        raise NotImplementedError

    @contextlib.contextmanager
    def restrict(self, model: Any, resident: Mapping[int, Sequence[int]]) -> Iterator[None]:
        """Within the block, routing of each decoder layer in `resident` behaves as if experts outside
        the set did not exist (DESIGN.md, restriction semantics). Layers not in `resident` are untouched."""
        raise NotImplementedError
        yield

    def set_top_k(self, model: Any, k: int) -> contextlib.AbstractContextManager:
        """Context manager: route to `k` experts per token instead of top-k (quality experiments)."""
        raise NotImplementedError

    def reroute(self, model: Any, choose: Callable[[int, Any], tuple[Any, Any]]) -> contextlib.AbstractContextManager:
        """Context manager for routing experiments (dynamic top-p): on every MoE layer and forward,
        `choose(moe_index, probs [T, E])` returns (ids [T, K'], active [T, K'] bool) and the experts run on
        those ids; active slots are weighted as the family weights its own selection (same normalisation
        and scaling), inactive slots get weight 0."""
        raise NotImplementedError

    # ---- offloading (moesift.offload) -------------------------------------------------------------
    def replace_experts(self, model: Any, layer: int, module: Any) -> None:
        """Put the experts module `module` (built for another expert count) in decoder layer `layer`'s MoE
        block, keeping its router."""
        raise NotImplementedError

    def expert_params(self, module: Any) -> list[tuple[str, int, int]]:
        """(parameter name, expert dimension, rows per expert) of every tensor of an experts module: what
        moving one expert between two experts modules copies."""
        raise NotImplementedError

    def experts_apply(self, module: Any, hidden: Any, ids: Any, weights: Any) -> Any:
        """Sum over k of the family's contribution of expert ids[t, k] of `module` (its own numbering) to
        token t, weighted by weights[t, k] as the family weights it: Tensor [T, H]. Pairs with a negative
        id contribute nothing."""
        raise NotImplementedError

    def pair_reduction(self, module: Any) -> str:
        """How the experts module sums the contributions of a token's experts: "k_sum" (one row per (token,
        slot k), summed over k) or "expert_order" (from zeros, expert by expert in id order)."""
        raise NotImplementedError

    def offload_experts(self, model: Any, layer: int, run: Callable[[Any, Any, Any], Any]) -> None:
        """Make decoder layer `layer`'s MoE block obtain its routed-experts output from
        `run(hidden [T, H], ids [T, K], weights [T, K]) -> [T, H]` (original expert ids, the router's own
        choice and weights) instead of its experts module; hooks on the experts module still fire."""
        raise NotImplementedError

    # ---- checkpoint ---------------------------------------------------------------------------------
    def classify(self, name: str, config: Mapping[str, Any]) -> TensorRole:
        """Role of the on-disk tensor `name` in a checkpoint with config.json `config`."""
        raise NotImplementedError

    def rename_expert(self, name: str, config: Mapping[str, Any], new_id: int) -> str:
        """Name of per-expert tensor `name` once its expert is renumbered to `new_id`."""
        raise NotImplementedError

    def slice_experts(self, tensor: Any, role: TensorRole, keep: Sequence[int], config: Mapping[str, Any]) -> Any:
        """Keep rows `keep` (sorted original ids) of a fused / router tensor along its expert dimension.
        Works on torch tensors; `role.expert_block` handles [E * n, ...] layouts."""
        import torch

        dim = role.expert_dim if role.expert_dim is not None and role.expert_dim >= 0 else tensor.dim() + (role.expert_dim or 0)
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        if role.expert_block:
            n = role.expert_block
            shape = list(tensor.shape)
            v = tensor.reshape(shape[:dim] + [shape[dim] // n, n] + shape[dim + 1 :])
            out = v.index_select(dim, idx)
            return out.reshape(shape[:dim] + [len(keep) * n] + shape[dim + 1 :]).contiguous()
        return tensor.index_select(dim, idx).contiguous()


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


# ------------------------------------------------------------------------------------------------
# The common layout of transformers 5: decoder layer -> block (router `gate` + fused `experts`).
# ------------------------------------------------------------------------------------------------


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class _MaskRouterLinear:
    """TorchFunctionMode that adds `mask` (0 for resident, -inf otherwise) to the output of the router's
    linear projection, identified by its weight tensor. Entered around the router's forward only."""

    def __new__(cls, weight: Any, mask: Any):
        import torch
        from torch.overrides import TorchFunctionMode

        casts = (torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)

        class _Mode(TorchFunctionMode):
            aliases: list = []  # the weight and its dtype casts made in this forward (routers often cast to fp32)

            def __enter__(self):
                self.aliases = [weight]
                return super().__enter__()

            def __exit__(self, *exc):
                self.aliases = []
                return super().__exit__(*exc)

            def __torch_function__(self, func, types, args=(), kwargs=None):
                import torch.nn.functional as F

                out = func(*args, **(kwargs or {}))
                if func is F.linear and len(args) > 1 and any(args[1] is w for w in self.aliases):
                    out = out + mask.to(device=out.device, dtype=out.dtype)
                elif func in casts and args and any(args[0] is w for w in self.aliases):
                    self.aliases.append(out)
                return out

        return _Mode()


class StandardAdapter(Adapter):
    """Block at `{layers_path}.{i}.{block_attr}` with router `gate` and fused experts `experts` whose
    forward is ``experts(hidden [T, H], ids [T, K], weights [T, K]) -> [T, H]``."""

    layers_path: ClassVar[str] = "model.layers"
    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    # config keys, first present wins (on-disk and in-memory spellings)
    n_experts_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts", "n_routed_experts")
    top_k_keys: ClassVar[tuple[str, ...]] = ("num_experts_per_tok", "top_k", "moe_k")
    n_shared_keys: ClassVar[tuple[str, ...]] = ("n_shared_experts",)
    scoring: ClassVar[str] = "softmax"
    # router attributes holding a selection bias with one entry per expert (masked with -inf by restrict)
    bias_attrs: ClassVar[tuple[str, ...]] = ()
    # router attribute holding top-k (set_top_k)
    router_top_k_attr: ClassVar[str] = "top_k"
    patterns: ClassVar[Patterns] = Patterns()

    # ---- config ---------------------------------------------------------------------------------
    def n_layers(self, config: Any) -> int:
        return int(cfg_get(config, "num_hidden_layers", "n_layers"))

    def is_moe_layer(self, config: Any, i: int) -> bool:
        return True

    def n_shared(self, config: Any) -> int:
        return int(cfg_get(config, *self.n_shared_keys, default=0) or 0)

    def groups(self, config: Any) -> tuple[int | None, int | None]:
        return None, None

    def hash_layers(self, config: Any) -> tuple[int, ...]:
        return ()

    def spec(self, config: Any) -> MoESpec:
        mt = config.get("model_type") if isinstance(config, Mapping) else config.model_type
        n_group, topk_group = self.groups(config)
        return MoESpec(
            model_type=mt,
            moe_layers=tuple(i for i in range(self.n_layers(config)) if self.is_moe_layer(config, i)),
            n_experts=int(cfg_get(config, *self.n_experts_keys)),
            top_k=int(cfg_get(config, *self.top_k_keys)),
            n_shared=self.n_shared(config),
            scoring=self.scoring,
            n_group=n_group,
            topk_group=topk_group,
            hash_layers=self.hash_layers(config),
        )

    def rewrite_config(self, config: dict[str, Any], resident: Mapping[int, Sequence[int]]) -> dict[str, Any]:
        out = dict(config)
        n = max(len(v) for v in resident.values())
        hit = False
        for k in self.n_experts_keys:
            if k in out and out[k] is not None:
                out[k] = n
                hit = True
        if not hit:
            raise MoesiftError(f"config has none of {self.n_experts_keys}; cannot rewrite the expert count")
        return out

    # ---- loaded model -----------------------------------------------------------------------------
    def moe_block(self, model: Any, layer: int) -> Any:
        return getattr(_get_path(model, self.layers_path)[layer], self.block_attr)

    def replace_moe_block(self, model: Any, layer: int, block: Any) -> None:
        setattr(_get_path(model, self.layers_path)[layer], self.block_attr, block)

    def router(self, model: Any, layer: int) -> Any:
        return getattr(self.moe_block(model, layer), self.router_attr)

    def experts(self, model: Any, layer: int) -> Any:
        return getattr(self.moe_block(model, layer), self.experts_attr)

    def router_logits(self, router: Any, output: Any) -> Any:
        """Router logits over all experts [T, E] (the router's dtype) from the router's forward output."""
        logits = output[0] if isinstance(output, tuple) else output
        return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])

    def probs_from_router_output(self, router: Any, output: Any) -> Any:
        """Router probabilities over all experts [T, E] from the router's forward output."""
        return scores_from_logits(self.router_logits(router, output), self.scoring)

    def attach_recorder(self, model, on_route, on_logits=None, want_hidden=False):
        handles = []
        spec = self.spec(model.config)
        for m, layer in enumerate(spec.moe_layers):
            experts = self.experts(model, layer)

            def pre(mod, args, kwargs, _m=m):
                hidden, ids, weights = _expert_args(args, kwargs)
                flat = hidden.reshape(-1, hidden.shape[-1]) if want_hidden else None  # [T, H] whatever the family passes
                on_route(_m, Route(ids=ids, weights=weights, hidden=flat))

            handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
            if on_logits is not None:
                router = self.router(model, layer)

                raw = bool(getattr(on_logits, "wants_logits", False))

                def post(mod, args, output, _m=m, _raw=raw):
                    on_logits(_m, self.router_logits(mod, output) if _raw else self.probs_from_router_output(mod, output))

                handles.append(router.register_forward_hook(post))
        return handles

    def expert_output(self, model, layer, hidden, ids):
        import torch

        ids = ids.reshape(-1, 1)
        ones = torch.ones(ids.shape, dtype=hidden.dtype, device=hidden.device)
        return self.experts(model, layer)(hidden, ids, ones)

    def router_weight(self, router: Any) -> Any:
        """The weight tensor of the router's linear projection (rows = experts)."""
        w = getattr(router, "weight", None)
        if w is None:
            for mod in router.modules():
                if getattr(mod, "weight", None) is not None:
                    return mod.weight
        return w

    @contextlib.contextmanager
    def restrict(self, model, resident):
        import torch

        spec = self.spec(model.config)
        handles, saved = [], []
        try:
            for layer, ids in resident.items():
                if layer not in spec.moe_layers:
                    raise MoesiftError(f"decoder layer {layer} is not a MoE layer of this model")
                router = self.router(model, layer)
                weight = self.router_weight(router)
                keep = torch.zeros(spec.n_experts, dtype=torch.bool, device=weight.device)
                keep[list(ids)] = True
                mask = torch.zeros(spec.n_experts, dtype=torch.float32, device=weight.device)
                mask[~keep] = float("-inf")
                mode = _MaskRouterLinear(weight, mask)

                def enter(mod, args, _mode=mode):
                    _mode.__enter__()

                def leave(mod, args, output, _mode=mode):
                    _mode.__exit__(None, None, None)

                handles.append(router.register_forward_pre_hook(enter))
                handles.append(router.register_forward_hook(leave))
                for attr in self.bias_attrs:
                    b = _get_path(router, attr) if _has_path(router, attr) else None
                    if b is None:
                        continue
                    saved.append((b, b.detach().clone()))
                    with torch.no_grad():
                        b.view(-1, spec.n_experts)[:, ~keep] = float("-inf")
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for b, orig in saved:
                    b.copy_(orig)

    @contextlib.contextmanager
    def set_top_k(self, model, k):
        spec = self.spec(model.config)
        saved = []
        try:
            for layer in spec.moe_layers:
                router = self.router(model, layer)
                if not hasattr(router, self.router_top_k_attr):
                    raise MoesiftError(f"{type(router).__name__} has no {self.router_top_k_attr!r}; cannot change top-k")
                saved.append((router, getattr(router, self.router_top_k_attr)))
                setattr(router, self.router_top_k_attr, k)
            yield
        finally:
            for router, old in saved:
                setattr(router, self.router_top_k_attr, old)

    # routers without a `norm_topk_prob` attribute: do they renormalise the weights of their selection?
    normalise_selection: ClassVar[bool] = True

    def selection_weights(self, router: Any, probs: Any, ids: Any, active: Any) -> Any:
        """Weights the family applies to a selection `ids` [T, K] (slots where `active` is False get 0):
        router probabilities of the selected experts, renormalised over the active ones when the router
        normalises its top-k, times the router's routed scaling factor."""
        w = probs.gather(1, ids) * active.to(probs.dtype)
        norm = getattr(router, "norm_topk_prob", None)
        if norm is None:
            norm = self.normalise_selection
        if norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)

    @contextlib.contextmanager
    def reroute(self, model, choose):
        spec = self.spec(model.config)
        handles = []
        try:
            for m, layer in enumerate(spec.moe_layers):
                router, experts, box = self.router(model, layer), self.experts(model, layer), {}

                def post(mod, args, output, _box=box):
                    _box["probs"] = self.probs_from_router_output(mod, output)

                def pre(mod, args, kwargs, _m=m, _box=box, _router=router):
                    hidden, ids, weights = _expert_args(args, kwargs)
                    probs = _box.pop("probs", None)
                    if probs is None or probs.shape[0] != hidden.numel() // hidden.shape[-1]:  # hidden may be [B, S, H]
                        raise MoesiftError(f"{type(_router).__name__}: router probabilities not seen before the experts ran")
                    new_ids, active = choose(_m, probs)
                    w = self.selection_weights(_router, probs, new_ids, active).to(weights.dtype)
                    rest = {k: v for k, v in kwargs.items() if not any(v is x for x in (hidden, ids, weights))}
                    return (hidden, new_ids.to(ids.dtype), w, *args[3:]), rest

                handles.append(router.register_forward_hook(post))
                handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # ---- offloading ---------------------------------------------------------------------------------
    def replace_experts(self, model, layer, module):
        setattr(self.moe_block(model, layer), self.experts_attr, module)

    def expert_params(self, module):
        n = int(module.num_experts)
        out = []
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dim() == 0 or t.shape[0] != n:
                raise MoesiftError(f"{type(module).__name__}.{name} has no leading expert dimension of {n}; "
                                   "this family's adapter must say how its experts are stored")
            out.append((name, 0, 1))
        return out

    def experts_apply(self, module, hidden, ids, weights):
        import torch

        valid = ids >= 0
        rows = valid.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return torch.zeros_like(hidden)
        whole = rows.numel() == hidden.shape[0]
        h, i, w, v = (hidden, ids, weights, valid) if whole else (hidden[rows], ids[rows], weights[rows], valid[rows])
        # a pair that is not this module's gets the token's first valid expert with weight 0: the module
        # then computes nothing it would not compute anyway, and adds exact zeros
        first = i.gather(1, v.to(torch.long).argmax(dim=1, keepdim=True))
        i = torch.where(v, i, first)
        w = torch.where(v, w, torch.zeros_like(w))
        res = type(module).forward(module, h, i, w).reshape(h.shape)
        if whole:
            return res
        return torch.zeros_like(hidden).index_copy(0, rows, res)

    def pair_reduction(self, module):
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        return "k_sum" if impl in ("grouped_mm", "batched_mm") else "expert_order"

    def experts_result(self, hidden: Any, out: Any) -> Any:
        """The experts module's output for input `hidden` given the flat result [T, H]."""
        return out.reshape(hidden.shape)

    def offload_experts(self, model, layer, run):
        experts = self.experts(model, layer)

        def forward(*args, **kwargs):
            hidden, ids, weights = _expert_args(args, kwargs)
            H = hidden.shape[-1]
            out = run(hidden.reshape(-1, H), ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1]))
            return self.experts_result(hidden, out)

        experts.forward = forward

    # ---- checkpoint ---------------------------------------------------------------------------------
    def classify(self, name: str, config: Mapping[str, Any]) -> TensorRole:
        for kind, rx, dim in self.patterns.compile():
            m = rx.fullmatch(name)
            if not m:
                continue
            layer = int(m.group("layer"))
            if kind == "expert":
                return TensorRole("expert", layer=layer, expert=int(m.group("expert")))
            if kind == "fused":
                return TensorRole("expert", layer=layer, expert_dim=dim)
            if kind in ("router", "router_bias"):
                return TensorRole(kind, layer=layer, expert_dim=self.router_expert_dim(name, kind))
            return TensorRole(kind, layer=layer)
        return OTHER

    def rename_expert(self, name: str, config: Mapping[str, Any], new_id: int) -> str:
        for kind, rx, _ in self.patterns.compile():
            m = rx.fullmatch(name)
            if m and kind == "expert":
                a, b = m.span("expert")
                return f"{name[:a]}{new_id}{name[b:]}"
        raise ValueError(f"{name} is not a per-expert tensor")

    def router_expert_dim(self, name: str, kind: str) -> int:
        """Expert dimension of a router tensor (rows of the weight; the last dim of a [1, E] bias)."""
        return -1 if kind == "router_bias" else 0


def _has_path(obj: Any, path: str) -> bool:
    try:
        _get_path(obj, path)
        return True
    except (AttributeError, IndexError):
        return False


def _expert_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
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
