"""Trace an mlx-lm model folder (what `mlx_lm.convert` writes, quantized or not) in mlx-lm.

The folder is loaded with mlx-lm's own loader (in float32 on mlx's default device, as verify runs it) and
tokenized with its tokenizer (pre-tokenized ``input_ids`` work too). Documents run `batch_size` at a time,
right-padded to the longest of the batch: mlx-lm's causal mask keeps a real token from seeing the padding
after it, and padding is never counted. Each MoE block's router is tapped (moesift.engines.mlx_record) and
the selected ids, routing weights and router logits of every forward go through the same Recorder as the
transformers tracer, so the statistics have one definition; everything a forward captured is evaluated at
once with the forward (moesift.engines.mlx_capture), one host synchronisation per forward.

With ``generate=N`` each document runs on its own with mlx-lm's KV cache: the prompt (prefill), then greedy
decoding, the generated tokens fed back one at a time (N - 1 decode tokens for N new tokens, fewer once the
model produces an end-of-sequence token, which is not fed), as the transformers tracer counts them; the
decode steps of a document are recorded as one run of decode tokens. ``saliency`` taps each block's expert
module (mlx-lm's SwitchGLU / SwitchMLP, which returns every selected expert's output) and records REAP
saliency as the transformers tracer defines it.

The trace's ``config_hash`` is that of config.json without mlx-lm's "quantization" /
"quantization_config" entries (how the weights are stored, not what the model is), so an MLX trace merges
and compares with a transformers trace of the same model, and with no other."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.spec import Route
from ..core.errors import MoesiftError
from ..core.identity import config_hash
from ..core.progress import progress_bar
from ..core.version import __version__
from ..engines.hf import load_tokenizer
from ..engines.mlx import mlx_version
from ..engines.mlx_capture import (
    Forward,
    evaluate,
    expert_taps,
    routing,
    saliency_problem,
    saliency_sums,
    take,
)
from ..engines.mlx_native import check_runnable, is_mlx_model, open_mlx, quantization_note
from ..engines.mlx_record import recordable_problem, tapped
from ..formats.checkpoint import CheckpointIndex
from ..formats.trace import Trace
from .documents import log_arrays, model_section, split_log, tokenize_workload, workload_section
from .recorder import Recorder

ENGINES = ("auto", "transformers", "mlx")
# config.json entries with which mlx-lm records how it stored the weights
MLX_STORAGE_KEYS = ("quantization", "quantization_config")
QUANT_MODES = ("affine",)  # mlx-lm quantization modes whose folders moesift traces (4-bit affine tested)


def trace_engine(model: Any, engine: str, generate: int, saliency: bool) -> str:
    """"mlx" or "transformers": the engine that traces `model` (`engine` "auto": mlx for an mlx-lm model
    folder). One error line for an unknown engine and for what mlx tracing does not do."""
    if engine not in ENGINES:
        raise MoesiftError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "transformers":
        return engine
    folder = isinstance(model, (str, os.PathLike)) and Path(model).is_dir() and is_mlx_model(model)
    if not folder:
        if engine == "mlx":
            raise MoesiftError(f"--engine mlx traces an mlx-lm model folder (mlx_lm.convert output); {str(model)!r} "
                               "is not one: trace it with --engine transformers")
        return "transformers"
    return "mlx"


def trace_mlx(model: str | os.PathLike, docs: list[dict[str, Any]], paths: list, sources: list, label: str | None,
              max_length: int, batch_size: int, folds: int, log_routing: bool, progress: bool, generate: int = 0,
              saliency: bool = False) -> Trace:
    """The Trace of the mlx-lm model folder `model` on the documents `docs` (read from `paths`)."""
    index = _check_folder(Path(model))
    cfg, spec = index.config, index.spec
    ids_list = tokenize_workload(docs, load_tokenizer(index.directory), max_length, int(cfg.get("vocab_size") or 0),
                                 cfg.get("max_position_embeddings"), generate, paths)
    runner = open_mlx(index)
    try:
        if saliency:
            problem = saliency_problem(runner.model, spec, index.adapter.mlx_router)
            if problem:
                raise MoesiftError(problem)
        run = MlxRun(runner.model, index, folds, log_routing, saliency)
        run.record(ids_list, batch_size, generate, progress)
    finally:
        runner.close()
    arrays = run.rec.to_arrays()
    if log_routing:
        arrays.update(log_arrays(run.log_docs, len(spec.moe_layers), spec.top_k))
    return _assemble(model, index, run.rec, arrays, ids_list, paths, sources, label, max_length, generate, folds)


def _check_folder(d: Path) -> CheckpointIndex:
    """The folder's checkpoint index when moesift records its routing in mlx-lm; else one error line."""
    index = CheckpointIndex.build(d)
    cfg, spec = index.config, index.spec
    check_runnable(index)
    problem = recordable_problem(spec.model_type, index.adapter.mlx_router, spec)
    if problem:
        raise MoesiftError(problem)
    q = cfg.get("quantization")
    if isinstance(q, Mapping) and q.get("mode", "affine") not in QUANT_MODES:
        raise MoesiftError(f"{str(d)!r} holds {quantization_note(cfg)}; moesift traces mlx-lm folders that are "
                           f"unquantized or quantized in {', '.join(QUANT_MODES)} mode")
    return index


class MlxRun:
    """The documents through the mlx-lm `model` with its routers (and, for saliency, its experts) tapped, into
    a Recorder on the CPU. `evaluate_logits`: also evaluate a prefill forward's logits (which routing does not
    need; bench/mlx_trace_overhead.py sets it so that a traced forward computes what a plain one computes)."""

    def __init__(self, model: Any, index: CheckpointIndex, folds: int, log_routing: bool, saliency: bool) -> None:
        self.model, self.index, self.folds, self.log_routing = model, index, folds, log_routing
        self.spec = index.spec
        self.rec = Recorder(self.spec, "cpu", folds, want_saliency=saliency, log_routing=log_routing)
        self.saliency = saliency
        self.eos = set(eos_ids(index.directory))
        self.log_docs: list = []
        self.evaluate_logits = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, the model's routers (and, for saliency, its expert modules) are tapped."""
        router = self.index.adapter.mlx_router
        experts = expert_taps(self.model, self.spec, router) if self.saliency else contextlib.nullcontext(None)
        with tapped(self.model, self.spec, router, self.index.config) as taps, experts as sinks:
            self.taps, self.sinks = taps, sinks
            yield

    def record(self, ids_list: list[list[int]], batch_size: int, generate: int, progress: bool) -> None:
        """Every document, `batch_size` at a time (one padded forward, or one after the other to generate)."""
        n = len(ids_list)
        with self.installed(), progress_bar(progress, unit="documents") as bar:
            task = bar.add_task("tracing", total=n)
            for lo in range(0, n, batch_size):
                batch = ids_list[lo : lo + batch_size]
                if generate:
                    for i, ids in enumerate(batch):
                        self.document(ids, lo + i, generate)
                else:
                    self.prefill_batch(batch, lo)
                self.rec.end_forward()
                bar.advance(task, len(batch))

    def prefill_batch(self, batch: list[list[int]], lo: int) -> None:
        """One forward of the documents lo.. of the workload, right-padded (id 0, never seen by real tokens)."""
        import mlx.core as mx

        S = max(len(x) for x in batch)
        x = np.zeros((len(batch), S), dtype=np.int32)
        valid = np.zeros((len(batch), S), dtype=bool)
        for r, ids in enumerate(batch):
            x[r, : len(ids)] = ids
            valid[r, : len(ids)] = True
        out = self.model(mx.array(x))  # lazy: only what the taps need is evaluated, unless evaluate_logits
        self._add([self._take(valid.reshape(-1))], valid, np.arange(lo, lo + len(batch)) % self.folds, 0,
                  [out] if self.evaluate_logits else [])
        if self.log_routing:
            self.log_docs.extend(split_log(self.rec.pop_log(), len(batch)))

    def document(self, ids: list[int], doc: int, generate: int) -> None:
        """Prefill, then greedy decoding of `generate` new tokens with mlx-lm's KV cache."""
        fold = np.array([doc % self.folds])
        cache, t = self.prompt(ids, fold)
        if generate > 1 and t not in self.eos:
            self.decode(cache, t, generate - 1, fold)
        if self.log_routing:
            self.log_docs.extend(split_log(self.rec.pop_log(), 1))

    def prompt(self, ids: list[int], fold: np.ndarray) -> tuple[Any, int]:
        """The prompt through the model with a new KV cache, recorded as prefill; (the cache, greedy next token)."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array([ids], dtype=mx.int32), cache=cache)
        tok = mx.argmax(logits[0, -1])
        self._add([self._take(np.ones(len(ids), dtype=bool))], np.ones((1, len(ids)), dtype=bool), fold, 0, [tok])
        return cache, int(tok.item())

    def decode(self, cache: Any, t: int, steps: int, fold: np.ndarray) -> None:
        """Feed the generated token `t` and greedily decode: `steps` one-token forwards at most, stopping before
        an end-of-sequence token would be fed. The steps' routing is kept on the device (evaluated with each
        step's token, no extra synchronisation) and recorded once, as one run of decode tokens."""
        import mlx.core as mx

        fws: list[Forward] = []
        one = np.ones(1, dtype=bool)
        for step in range(steps):
            logits = self.model(mx.array([[t]], dtype=mx.int32), cache=cache)
            tok = mx.argmax(logits[0, -1])
            fw = self._take(one)
            evaluate([fw], [tok])
            fws.append(fw)
            t = int(tok.item())
            if step == steps - 1 or t in self.eos:
                break
        self._add(fws, np.ones((1, len(fws)), dtype=bool), fold, 1)

    def _take(self, valid: np.ndarray) -> Forward:
        import mlx.core as mx

        vf = mx.array(valid.astype(np.float32)) if self.saliency else None
        return take(self.taps, self.sinks, vf, self.spec.n_experts)

    def _add(self, fws: list[Forward], valid: np.ndarray, fold: np.ndarray, phase: int, extra: list = ()) -> None:
        """The evaluated forwards `fws` (their tokens one after the other: `valid` [B, S]) into the Recorder."""
        import torch

        evaluate(fws, extra)
        self.rec.begin_forward(torch.from_numpy(valid), torch.from_numpy(fold), phase)
        for m, r in enumerate(routing(fws)):
            self.rec.on_route(m, Route(torch.from_numpy(r.ids), torch.from_numpy(r.weights)))
            self.rec.on_logits(m, torch.from_numpy(r.logits))
        if self.saliency:
            s, c = saliency_sums(fws)
            self.rec.sal_sum += torch.from_numpy(s)
            self.rec.sal_count += torch.from_numpy(c)


def eos_ids(folder: Path) -> list[int]:
    """The end-of-sequence token ids of an mlx-lm model folder: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            v = json.loads(f.read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            continue
        if v is not None:
            return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, int)]
    return []


def _assemble(model: Any, index: CheckpointIndex, rec: Recorder, arrays: dict[str, np.ndarray],
              ids_list: list[list[int]], paths: list, sources: list, label: str | None, max_length: int,
              generate: int, folds: int) -> Trace:
    """The Trace: model identity (config hash without mlx-lm's storage entries), workload, arrays, tool."""
    import mlx.core as mx

    spec, cfg = index.spec, index.config
    chash = config_hash({k: v for k, v in cfg.items() if k not in MLX_STORAGE_KEYS})
    return Trace(
        model=model_section(str(model), spec, chash, dict(cfg), index.adapter.model_shape(cfg)),
        workload=workload_section(label, paths, sources, ids_list, rec.token_counts(), max_length, generate, folds),
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, "engine": f"mlx-lm {mlx_version()}",
              "device": str(mx.default_device()), "weights": quantization_note(cfg)},
    )
