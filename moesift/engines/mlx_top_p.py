"""Dynamic top-p routing in an mlx-lm model, as `moesift.evaluation.evaluate` defines it for transformers: per
token, the smallest set of experts, most probable first (softmax over all experts), whose router probability
reaches p; the experts of the set are weighted as the family weights its own top-k (renormalised over the set
when the family renormalises, the raw probabilities when it does not).

Each MoE block keeps its own code: its router module is wrapped so that the logits of experts outside a
token's set are -inf (the block's softmax then gives them weight 0), and the block's top-k attribute is set,
per forward, to the largest set of the forward (one host read per MoE layer: the width must be known before
the block selects). A block that does not renormalise would weight the set by its probabilities divided by
the set's mass; its expert module's outputs are multiplied by that mass per token, which restores the raw
probabilities. Softmax routers only."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

from ..core.errors import MoesiftError
from .mlx_capture import expert_module


class TopPState:
    """What the wrapped routers share within one forward: the mask of real tokens (set by the caller before
    each forward), the set mass per token (for a block that does not renormalise) and the active experts
    counted over real tokens (lazy mlx scalars)."""

    def __init__(self) -> None:
        self.mask: Any = None  # mlx float32 [T]: 1 for a real token
        self.scale: Any = None
        self.active: Any = 0.0
        self.count: Any = 0.0

    def mean_active(self) -> float | None:
        import mlx.core as mx

        c = float(mx.array(self.count).item()) if not isinstance(self.count, float) else self.count
        return float(mx.array(self.active).item()) / c if c else None


def _gate(inner: Any, block: Any, attr: str, p: float, renorm: bool, state: TopPState) -> Any:
    import mlx.core as mx
    import mlx.nn as nn

    class TopPGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x: Any) -> Any:
            logits = self.inner(x)
            E = logits.shape[-1]
            q = mx.softmax(logits.reshape(-1, E).astype(mx.float32), axis=-1, precise=True)
            q = q / mx.maximum(mx.sum(q, axis=-1, keepdims=True), 1e-30)
            order = mx.argsort(-q, axis=-1)
            sq = mx.take_along_axis(q, order, axis=-1)
            need = mx.minimum(mx.sum((mx.cumsum(sq, axis=-1) < p).astype(mx.int32), axis=-1) + 1, E)
            rank = mx.argsort(order, axis=-1)
            keep = rank < need[:, None]
            setattr(block, attr, int(mx.max(need).item()))  # the block's top-k for this forward
            if not renorm:
                state.scale = mx.sum(mx.where(keep, q, 0.0), axis=-1)
            mask = state.mask if state.mask is not None and state.mask.shape[0] == need.shape[0] else \
                mx.ones(need.shape[0], mx.float32)
            state.active = state.active + mx.sum(need.astype(mx.float32) * mask)
            state.count = state.count + mx.sum(mask)
            masked = mx.where(keep, logits.reshape(-1, E), mx.array(-math.inf, logits.dtype))
            return masked.reshape(logits.shape)

    return TopPGate()


def _experts(inner: Any, state: TopPState) -> Any:
    import mlx.nn as nn

    class ScaledExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x: Any, indices: Any) -> Any:
            out = self.inner(x, indices)
            if state.scale is not None:
                out = out * state.scale.reshape(*out.shape[:-2], 1, 1).astype(out.dtype)
                state.scale = None
            return out

    return ScaledExperts()


@contextlib.contextmanager
def top_p_routed(blocks: Sequence[tuple[Any, str]], gate: str, renorm: bool, p: float,
                 state: TopPState) -> Iterator[None]:
    """Within the block, the mlx-lm MoE `blocks` ((block, name of its top-k attribute) per MoE layer; `gate`: the
    name of the router module in a block) route by dynamic top-p."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for block, attr in blocks:
            saved.append((block, attr, getattr(block, attr)))
            inner = getattr(block, gate)
            saved.append((block, gate, inner))
            setattr(block, gate, _gate(inner, block, attr, p, renorm, state))
            if not renorm:
                name = expert_module(block)
                if name is None:
                    raise MoesiftError(f"--top-p with --engine mlx: the block {type(block).__name__} runs its experts "
                                       "without mlx-lm's SwitchGLU / SwitchMLP; evaluate the transformers checkpoint")
                saved.append((block, name, getattr(block, name)))
                setattr(block, name, _experts(getattr(block, name), state))
        yield
    finally:
        for obj, name, v in reversed(saved):
            setattr(obj, name, v)
