"""Read what the taps of an mlx-lm model captured in one forward, with one evaluation for every MoE layer.

`moesift.engines.mlx_record.tapped` wraps each MoE block's router; `expert_taps` also wraps the block's
expert module (mlx-lm's `SwitchGLU` / `SwitchMLP`, which returns every selected expert's output before the
block weights and sums them) with a module that returns that output unchanged and keeps the L2 norm of each
(token, selected expert) output. `read_forward` evaluates everything the taps kept for one forward, together
with whatever the caller needs from the same forward (the next token), in a single `mx.eval`: one host
synchronisation per forward, not one per layer.

Saliency is REAP's, as the transformers tracer records it: per routed (token, expert) pair, the routing
weight the block applies times the L2 norm of that expert's output, summed per expert over real tokens,
with the number of pairs beside it. The weight of each expert the block ran is looked up among the router
tap's (ids, weights) of the same tokens, so it holds for any router the tap reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch.spec import MlxRouter, MoESpec, get_path
from ..core.errors import MoesiftError
from .mlx_record import LayerRouting, RouterTaps


def expert_module(block: Any) -> str | None:
    """Name of the child of the mlx-lm MoE `block` that runs the routed experts (mlx-lm's SwitchGLU or
    SwitchMLP: it returns each selected expert's output separately), or None."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    for name, child in block.children().items():
        if isinstance(child, (SwitchGLU, SwitchMLP)):
            return name
    return None


def saliency_problem(model: Any, spec: MoESpec, router: MlxRouter) -> str | None:
    """Why the expert outputs of the mlx-lm `model` cannot be read per expert (no saliency), or None."""
    for layer in spec.moe_layers:
        path = router.gate_path(layer).rsplit(".", 1)[0]
        block = get_path(model, path)
        if expert_module(block) is None:
            return (f"--saliency with --engine mlx reads each expert's output from mlx-lm's SwitchGLU / SwitchMLP; the "
                    f"MoE block {path!r} ({type(block).__name__}) runs its experts otherwise: trace the transformers "
                    "checkpoint for saliency")
    return None


def _expert_tap(inner: Any, sink: list) -> Any:
    """An mlx module that calls the expert module `inner` and appends (indices [T, K], norms [T, K]) to `sink`."""
    import mlx.core as mx
    import mlx.nn as nn

    class ExpertTap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x: Any, indices: Any) -> Any:
            out = self.inner(x, indices)
            k = indices.shape[-1]
            norms = mx.sqrt(mx.sum(mx.square(out.astype(mx.float32)), axis=-1))
            sink.append((indices.reshape(-1, k), norms.reshape(-1, k)))
            return out

    return ExpertTap()


@contextlib.contextmanager
def expert_taps(model: Any, spec: MoESpec, router: MlxRouter) -> Iterator[list[list]]:
    """Within the block, the expert module of every MoE layer is tapped; yields one sink per MoE layer."""
    sinks: list[list] = [[] for _ in spec.moe_layers]
    saved: list[tuple[Any, str, Any]] = []
    try:
        for m, layer in enumerate(spec.moe_layers):
            block = get_path(model, router.gate_path(layer).rsplit(".", 1)[0])
            name = expert_module(block)
            if name is None:
                raise MoesiftError(saliency_problem(model, spec, router) or "no expert module")
            inner = getattr(block, name)
            setattr(block, name, _expert_tap(inner, sinks[m]))
            saved.append((block, name, inner))
        yield sinks
    finally:
        for block, name, inner in reversed(saved):
            setattr(block, name, inner)


@dataclass
class Forward:
    """One forward's capture: per MoE layer the routing (lazy mlx arrays until `read_forward` evaluates them),
    and the saliency sums [L, E] and pair counts [L, E] when expert outputs were tapped."""

    layers: list[tuple[Any, Any, Any]]  # per MoE layer: (logits [T, E], ids [T, K], weights [T, K])
    saliency: tuple[Any, Any] | None = None


def _one(sink: list, m: int) -> Any:
    if len(sink) != 1:
        raise MoesiftError(f"MoE layer {m}: its router ran {len(sink)} times in one forward (expected once)")
    return sink.pop()


def take(taps: RouterTaps, experts: list[list] | None, valid: Any, n_experts: int) -> Forward:
    """What the taps kept in the forward that just ran (lazy), with the saliency sums over the tokens whose
    `valid` (mlx float32 [T], 1 = real) is 1 when `experts` (the expert taps' sinks) is given."""
    import mlx.core as mx

    layers = [_one(sink, m) for m, sink in enumerate(taps.sinks)]
    if experts is None:
        return Forward(layers)
    sums, counts = [], []
    for m, (_, ids, w) in enumerate(layers):
        idx, norms = _one(experts[m], m)
        # the weight the block applies to each expert it ran: looked up among the router tap's selection
        match = (idx[:, None, :] == ids[:, :, None]).astype(mx.float32)  # [T, K(router), K(block)]
        weight = mx.sum(match * w[:, :, None], axis=1)
        flat = idx.reshape(-1)
        vk = mx.broadcast_to(valid[:, None], idx.shape)
        sums.append(mx.zeros(n_experts, mx.float32).at[flat].add((norms * weight * vk).reshape(-1)))
        counts.append(mx.zeros(n_experts, mx.float32).at[flat].add(vk.reshape(-1)))
    return Forward(layers, (mx.stack(sums), mx.stack(counts)))


def evaluate(forwards: Sequence[Forward], extra: Sequence[Any] = ()) -> None:
    """One `mx.eval` of everything the forwards captured, and of `extra`."""
    import mlx.core as mx

    arrays: list[Any] = list(extra)
    for f in forwards:
        for layer in f.layers:
            arrays.extend(layer)
        if f.saliency is not None:
            arrays.extend(f.saliency)
    mx.eval(*arrays)


def routing(forwards: Sequence[Forward]) -> list[LayerRouting]:
    """Per MoE layer the routing of the evaluated `forwards`, their tokens one after the other, on the host;
    ids by descending weight (stable, as `torch.topk` reports them)."""
    import mlx.core as mx

    out = []
    for m in range(len(forwards[0].layers)):
        parts = [f.layers[m] for f in forwards]
        if len(parts) == 1:
            logits, ids, w = parts[0]
        else:
            logits, ids, w = (mx.concatenate([p[i] for p in parts]) for i in range(3))
        ids_np = np.array(ids).astype(np.int64)
        w_np = np.array(w).astype(np.float32)
        order = np.argsort(-w_np, axis=1, kind="stable")
        out.append(LayerRouting(np.take_along_axis(ids_np, order, 1), np.take_along_axis(w_np, order, 1),
                                np.array(logits).astype(np.float32)))
    return out


def saliency_sums(forwards: Sequence[Forward]) -> tuple[np.ndarray, np.ndarray]:
    """(sum of weight x ||expert output|| [L, E] float64, routed pairs [L, E] int64) of the evaluated forwards."""
    s = sum(np.array(f.saliency[0]).astype(np.float64) for f in forwards if f.saliency is not None)
    c = sum(np.array(f.saliency[1]).astype(np.float64) for f in forwards if f.saliency is not None)
    return np.asarray(s, np.float64), np.rint(np.asarray(c)).astype(np.int64)
