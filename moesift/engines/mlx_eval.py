"""Perplexity of an mlx-lm model folder (what `mlx_lm.convert` writes, quantized or not) run in mlx-lm, in
float32: the same token windows as the transformers evaluation (`moesift.formats.workload`), scored for the
full model, for routing restricted to a plan's resident experts (the router logits of every other expert are
-inf before the family's softmax and top-k, as `moesift verify` restricts an mlx-lm model) and for k experts
per token (the MoE block's own top-k attribute; the family's weight normalisation applies to the k chosen) and
for dynamic top-p routing (`moesift.engines.mlx_top_p`).

The mean number of routed experts active per token is derived from the routing rule for the full model,
plans and top-k: k per MoE layer, or the layer's resident count when a plan keeps fewer than k experts (the
experts beyond it get weight exp(-inf) = 0); for top-p it is counted in the forward (the size of each real
token's set, per MoE layer)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..arch.spec import get_path
from ..core.errors import MoesiftError
from ..core.progress import progress_bar
from ..formats.checkpoint import CheckpointIndex
from ..formats.plan import as_plan
from ..formats.workload import batches, token_windows
from .hf import load_tokenizer
from .mlx_native import check_mlx_model, open_mlx, quantization_note, restricted
from .mlx_top_p import TopPState, top_p_routed

TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


def open_index(model: Any) -> CheckpointIndex:
    """The checked index of an mlx-lm model folder that moesift evaluates in mlx-lm; else one error line."""
    index = CheckpointIndex.build(model)
    index.check_consistent()
    check_mlx_model(index)
    return index


def _blocks(model: Any, index: CheckpointIndex) -> list[tuple[Any, str]]:
    """(MoE block, name of its top-k attribute) of every MoE layer of the loaded mlx-lm `model`."""
    router = index.adapter.mlx_router
    out = []
    for layer in index.spec.moe_layers:
        path = router.top_k_path(layer) if router else f"model.layers.{layer}.mlp"
        block = get_path(model, path)
        attr = next((a for a in TOP_K_ATTRS if isinstance(getattr(block, a, None), int)), None)
        if attr is None:
            raise MoesiftError(f"the mlx-lm block {path!r} has no top-k attribute; --top-k is not supported for "
                               f"{index.spec.model_type} with --engine mlx")
        out.append((block, attr))
    return out


@contextlib.contextmanager
def top_k_set(model: Any, index: CheckpointIndex, k: int) -> Iterator[None]:
    """Within the block, every MoE block of the mlx-lm `model` selects `k` experts per token."""
    saved = [(b, a, getattr(b, a)) for b, a in _blocks(model, index)]
    try:
        for b, a, _ in saved:
            setattr(b, a, int(k))
        yield
    finally:
        for b, a, v in saved:
            setattr(b, a, v)


def _routing(model: Any, index: CheckpointIndex, setting: Mapping[str, Any], state: TopPState) -> Any:
    if setting["kind"] == "plan":
        return restricted(model, index, setting["resident"])
    if setting["kind"] == "top_k":
        return top_k_set(model, index, setting["k"])
    if setting["kind"] == "top_p":
        router = index.adapter.mlx_router
        return top_p_routed(_blocks(model, index), router.gate, router.renormalises(index.config), setting["p"],
                            state)
    return contextlib.nullcontext()


def _mean_active(spec: Any, setting: Mapping[str, Any]) -> float:
    k = int(setting.get("k", spec.top_k))
    resident = setting.get("resident") or {}
    per = [min(k, len(resident[layer])) if layer in resident else k for layer in spec.moe_layers]
    return sum(per) / len(per) if per else float(k)


def batch_nll(mx: Any, logits: Any, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, tokens scored) of one batch of mlx logits [B, S, V]."""
    pred = logits[:, :-1, :].astype(mx.float32)
    target = mx.array(ids[:, 1:].astype(np.int32))
    lse = mx.logsumexp(pred, axis=-1)
    picked = mx.take_along_axis(pred, target[..., None], axis=-1)[..., 0]
    nll = np.array(lse - picked).astype(np.float64)
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return float((nll * valid).sum()), int(valid.sum())


def score(model: Any, index: CheckpointIndex, batch_list: list[tuple[np.ndarray, np.ndarray]],
          settings: list[dict[str, Any]], progress: Any = None) -> list[dict[str, Any]]:
    """Score every batch under every setting; one result dict per setting (the keys of the transformers
    evaluation, plus tokens_per_s)."""
    import mlx.core as mx

    results = []
    task = progress.add_task("evaluating", total=len(settings) * len(batch_list)) if progress else None
    for st in settings:
        nll_sum, n_tok, n_run = 0.0, 0, 0
        state = TopPState()
        start = time.perf_counter()
        with _routing(model, index, st, state):
            for ids, mask in batch_list:
                state.mask = mx.array((mask.reshape(-1) > 0).astype(np.float32))
                logits = model(mx.array(ids.astype(np.int32)))
                s, n = batch_nll(mx, logits, ids, mask)
                mx.eval(state.active, state.count)
                nll_sum, n_tok, n_run = nll_sum + s, n_tok + n, n_run + int(mask.sum())
                if progress:
                    progress.update(task, advance=1, description=f"evaluating {st['name']}")
        seconds = time.perf_counter() - start
        mean_nll = nll_sum / n_tok if n_tok else float("nan")
        r = {k: v for k, v in st.items() if k not in ("plan", "resident")}
        r.update({"nll": mean_nll, "ppl": math.exp(mean_nll) if n_tok else float("nan"), "tokens": n_tok,
                  "mean_active": state.mean_active() if st["kind"] == "top_p" else _mean_active(index.spec, st), "tokens_per_s": n_run / seconds if seconds else None})
        results.append(r)
    full = next((r for r in results if r["kind"] == "full"), None)
    for r in results:
        r["ppl_ratio"] = r["ppl"] / full["ppl"] if full and full["ppl"] else None
    return results


def _token_windows(index: CheckpointIndex, docs: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list, int]:
    tok = tokenizer if tokenizer is not None else load_tokenizer(index.directory)
    return token_windows(docs, tok, int(index.config.get("vocab_size") or 0), max_length)


def eval_mlx(index: CheckpointIndex, docs: list[dict[str, Any]], settings: Sequence[dict[str, Any]],
             max_length: int = 512, batch_size: int = 8, progress: bool = True, force_plan: bool = False,
             tokenizer: Any = None) -> dict[str, Any]:
    """Token-weighted perplexity of the mlx-lm model folder `index` on `docs` under each setting ("full",
    "plan" with its plan, "top_k" with its k, "top_p" with its p: the settings of
    `moesift.evaluation.evaluate`), in mlx-lm in
    float32. The result has the keys of the transformers evaluation, plus `engine` and, per setting,
    `tokens_per_s` (tokens run through the model per second, padding included)."""
    spec = index.spec
    settings = [dict(st) for st in settings]
    for st in settings:
        if st["kind"] == "plan":  # checked before any scoring: a wrong plan fails fast
            st["resident"] = as_plan(st["plan"]).resolve(spec, index.config, str(index.directory), force_plan)
        elif st["kind"] == "top_p" and spec.scoring != "softmax":
            raise MoesiftError(f"--top-p with --engine mlx masks softmax routers only; {spec.model_type} routes with "
                               f"{spec.scoring} scores: evaluate the transformers checkpoint for top-p")
        elif st["kind"] not in ("full", "top_k", "top_p"):
            raise MoesiftError(f"--engine mlx evaluates the full model, --plan, --top-k and --top-p, not {st['name']}")
    wins, pad = _token_windows(index, docs, tokenizer, max_length)
    batch_list = [(ids.numpy(), mask.numpy()) for ids, mask in batches(wins, batch_size, pad_id=pad)]
    runner = open_mlx(index)
    try:
        with progress_bar(progress) as bar:
            results = score(runner.model, index, batch_list, settings, bar)
        name = runner.name
    finally:
        runner.close()
    return {
        "model": str(index.directory), "engine": name,
        "engine_notes": [f"mlx-lm in float32 ({quantization_note(index.config)}); a plan sets the router logits of "
                         "non-resident experts to -inf; top-p sets those of experts outside each token's set to -inf"],
        "documents": len(docs), "windows": len(wins), "tokens": results[0]["tokens"], "max_length": max_length,
        "model_spec": {"n_experts": spec.n_experts, "top_k": spec.top_k, "n_shared": spec.n_shared,
                       "moe_layers": len(spec.moe_layers), "scoring": spec.scoring},
        "results": results,
    }
