"""`StandardAdapter`: the common transformers 5 layout (`block.gate` router, `block.experts` fused or per-expert
weights) that most families share; a family file overrides only what differs."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..core.errors import MoesiftError
from .base import Adapter
from .spec import (
    OTHER,
    MoESpec,
    Patterns,
    Route,
    TensorRole,
    cfg_get,
    expert_args,
    get_path,
    has_path,
    required_int,
    scores_from_logits,
)


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
            n_experts=required_int(config, self.n_experts_keys, "routed experts per MoE layer"),
            top_k=required_int(config, self.top_k_keys, "experts each token is routed to"),
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
        return getattr(get_path(model, self.layers_path)[layer], self.block_attr)

    def replace_moe_block(self, model: Any, layer: int, block: Any) -> None:
        setattr(get_path(model, self.layers_path)[layer], self.block_attr, block)

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
                hidden, ids, weights = expert_args(args, kwargs)
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
                    b = get_path(router, attr) if has_path(router, attr) else None
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
                    hidden, ids, weights = expert_args(args, kwargs)
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
            hidden, ids, weights = expert_args(args, kwargs)
            H = hidden.shape[-1]
            out = run(hidden.reshape(-1, H), ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1]))
            return self.experts_result(hidden, out)

        experts.forward = forward

    # ---- checkpoint ---------------------------------------------------------------------------------
    def classify(self, name: str, config: Mapping[str, Any]) -> TensorRole:
        for kind, rx, dim in (*self.patterns.compile(), *self.mlx_patterns.compile()):
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
