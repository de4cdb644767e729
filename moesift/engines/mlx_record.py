"""Read the routing of an mlx-lm model: each MoE block's router module (`gate`) is wrapped by a module that
returns the router's output unchanged (the model's output does not change) and keeps, per forward, the router
logits and the selected expert ids and their routing weights (see `moesift.arch.spec.MlxRouter`). A router
module that returns logits: the selection is what the family's block computes from them (softmax over all
experts, top-k, renormalisation as the family does). A router module that selects itself (DeepSeek-style
gates): its own ids and weights, and the logits ``x @ gate.weight.T`` it selected from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch.registry import adapter_for, supported_model_types
from ..arch.spec import MlxRouter, MoESpec, get_path
from ..core.errors import MoesiftError


@dataclass
class LayerRouting:
    """One MoE layer's routing for the T = batch x sequence tokens of a forward (row-major)."""

    ids: np.ndarray  # int64 [T, K], by descending weight
    weights: np.ndarray  # float32 [T, K]
    logits: np.ndarray  # float32 [T, E]


def _tap(gate: Any, k: int, renorm: bool, sink: list, pick: Any = None) -> Any:
    """An mlx module that calls the logits router `gate` and appends (logits, ids, weights) of the call to
    `sink`; `pick()` (when given) selects from the logits instead of softmax top-k."""
    import mlx.core as mx
    import mlx.nn as nn

    class RouterTap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = gate

        def __call__(self, x: Any) -> Any:
            logits = self.inner(x)
            flat = logits.reshape(-1, logits.shape[-1]).astype(mx.float32)
            if pick is not None:
                ids, w = pick(logits)
                sink.append((flat, ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1]).astype(mx.float32)))
                return logits
            probs = mx.softmax(flat, axis=-1, precise=True)
            ids = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, ids, axis=-1)
            if renorm:
                w = w / mx.sum(w, axis=-1, keepdims=True)
            sink.append((flat, ids, w))
            return logits

    return RouterTap()


def router_logits(gate: Any, x: Any) -> Any:
    """The logits a selecting router `gate` selects from: ``x @ gate.weight.T``, or what a wrapper of it (a
    restriction) says they are."""
    own = getattr(type(gate), "router_logits", None)
    return own(gate, x) if own is not None else x @ gate.weight.T


def _select_tap(gate: Any, sink: list) -> Any:
    """An mlx module that calls the selecting router `gate` and appends (its logits ``x @ gate.weight.T``, its
    ids, its weights) of the call to `sink`."""
    import mlx.core as mx
    import mlx.nn as nn

    class SelectTap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = gate

        def __call__(self, x: Any) -> Any:
            ids, w = self.inner(x)
            logits = router_logits(self.inner, x)
            E = logits.shape[-1]
            sink.append((logits.reshape(-1, E).astype(mx.float32), ids.reshape(-1, ids.shape[-1]),
                         w.reshape(-1, w.shape[-1]).astype(mx.float32)))
            return ids, w

    return SelectTap()


class RouterTaps:
    """The taps of every MoE layer of an mlx-lm model; `pop()` after each forward."""

    def __init__(self, n_layers: int) -> None:
        self.sinks: list[list] = [[] for _ in range(n_layers)]

    def pop(self) -> list[LayerRouting]:
        """Per MoE layer (in `spec.moe_layers` order) the routing of the forward since the last call."""
        import mlx.core as mx

        out = []
        for m, sink in enumerate(self.sinks):
            if len(sink) != 1:
                raise MoesiftError(f"MoE layer {m}: its router ran {len(sink)} times in one forward (expected once)")
            logits, ids, w = sink.pop()
            mx.eval(logits, ids, w)
            ids_np = np.array(ids).astype(np.int64)
            w_np = np.array(w).astype(np.float32)
            order = np.argsort(-w_np, axis=1, kind="stable")  # descending weight, as torch.topk reports
            out.append(LayerRouting(np.take_along_axis(ids_np, order, 1), np.take_along_axis(w_np, order, 1),
                                    np.array(logits).astype(np.float32)))
        return out


def recordable_problem(model_type: str, router: MlxRouter | None, spec: MoESpec) -> str | None:
    """Why moesift does not record the routing of this family in mlx-lm, or None."""
    if router is None:
        return (f"moesift records routing in mlx-lm for {', '.join(recordable_model_types())} only, not "
                f"{model_type}; trace the transformers checkpoint")
    return None


def recordable_model_types() -> list[str]:
    """The model_types whose adapter says where mlx-lm keeps the family's router (`Adapter.mlx_router`)."""
    return [mt for mt in supported_model_types() if adapter_for({"model_type": mt}).mlx_router is not None]


@contextlib.contextmanager
def tapped(model: Any, spec: MoESpec, router: MlxRouter, config: Mapping[str, Any]) -> Iterator[RouterTaps]:
    """Within the block, the router of every MoE layer of the mlx-lm `model` is tapped; yields the taps."""
    taps = RouterTaps(len(spec.moe_layers))
    renorm = router.renormalises(config)
    saved: list[tuple[Any, str, Any]] = []
    try:
        for m, layer in enumerate(spec.moe_layers):
            parent_path, attr = router.gate_path(layer).rsplit(".", 1)
            try:
                parent = get_path(model, parent_path)
                gate = getattr(parent, attr)
            except (AttributeError, IndexError, KeyError, TypeError):
                raise MoesiftError(f"the mlx-lm model has no router module {router.gate_path(layer)!r} "
                                   f"(decoder layer {layer})") from None
            sink = taps.sinks[m]
            if router.select:
                tap = _select_tap(gate, sink)
            else:
                block = get_path(model, router.block_path(layer))
                pick = (lambda lg, _b=block: router.pick(_b, lg)) if router.pick else None
                tap = _tap(gate, spec.top_k, renorm, sink, pick)
            setattr(parent, attr, tap)
            saved.append((parent, attr, gate))
        yield taps
    finally:
        for parent, attr, gate in reversed(saved):
            setattr(parent, attr, gate)
