"""Trace an mlx-lm model folder (what `mlx_lm.convert` writes, quantized or not) in mlx-lm.

The folder is loaded with mlx-lm's own loader (in float32 on mlx's default device, as verify runs it) and
tokenized with its tokenizer (pre-tokenized ``input_ids`` work too). Documents run `batch_size` at a time,
right-padded to the longest of the batch: mlx-lm's causal mask keeps a real token from seeing the padding
after it, and padding is never counted. Each MoE block's router is tapped (moesift.engines.mlx_record) and
the selected ids, routing weights and router logits of every forward go through the same Recorder as the
transformers tracer, so the statistics have one definition. Prefill only: ``generate`` and ``saliency``
are refused.

The trace's ``config_hash`` is that of config.json without mlx-lm's "quantization" /
"quantization_config" entries (how the weights are stored, not what the model is), so an MLX trace merges
and compares with a transformers trace of the same model, and with no other."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    if generate:
        raise MoesiftError("--generate is not supported with --engine mlx (mlx-lm traces record prefill only); "
                           "trace the transformers checkpoint to record decode routing")
    if saliency:
        raise MoesiftError("--saliency is not supported with --engine mlx; trace the transformers checkpoint for "
                           "saliency")
    return "mlx"


def trace_mlx(model: str | os.PathLike, docs: list[dict[str, Any]], paths: list, sources: list, label: str | None,
              max_length: int, batch_size: int, folds: int, log_routing: bool, progress: bool) -> Trace:
    """The Trace of the mlx-lm model folder `model` on the documents `docs` (read from `paths`)."""
    index = _check_folder(Path(model))
    cfg, spec = index.config, index.spec
    ids_list = tokenize_workload(docs, load_tokenizer(index.directory), max_length, int(cfg.get("vocab_size") or 0),
                                 cfg.get("max_position_embeddings"), 0, paths)
    runner = open_mlx(index)
    try:
        rec, log_docs = _record(runner.model, index, ids_list, batch_size, folds, log_routing, progress)
    finally:
        runner.close()
    arrays = rec.to_arrays()
    if log_routing:
        arrays.update(log_arrays(log_docs, len(spec.moe_layers), spec.top_k))
    return _assemble(model, index, rec, arrays, ids_list, paths, sources, label, max_length, folds)


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


def _record(model: Any, index: CheckpointIndex, ids_list: list[list[int]], batch_size: int, folds: int,
            log_routing: bool, progress: bool) -> tuple[Recorder, list]:
    """Every batch through the mlx-lm `model` with its routers tapped; the Recorder (on the CPU) and the
    per-document routing log (when `log_routing`)."""
    import mlx.core as mx
    import torch

    spec = index.spec
    rec = Recorder(spec, "cpu", folds, log_routing=log_routing)
    log_docs: list = []
    n = len(ids_list)
    with tapped(model, spec, index.adapter.mlx_router, index.config) as taps, \
            progress_bar(progress, unit="documents") as bar:
        task = bar.add_task("tracing", total=n)
        for lo in range(0, n, batch_size):
            batch = ids_list[lo : lo + batch_size]
            S = max(len(x) for x in batch)
            x = np.zeros((len(batch), S), dtype=np.int32)  # right padding (id 0): never seen by real tokens
            valid = np.zeros((len(batch), S), dtype=bool)
            for r, ids in enumerate(batch):
                x[r, : len(ids)] = ids
                valid[r, : len(ids)] = True
            rec.begin_forward(torch.from_numpy(valid), torch.arange(lo, lo + len(batch)) % folds, 0)
            model(mx.array(x))  # lazy: the taps evaluate what the routers need
            for m, r in enumerate(taps.pop()):
                rec.on_route(m, Route(torch.from_numpy(r.ids), torch.from_numpy(r.weights)))
                rec.on_logits(m, torch.from_numpy(r.logits))
            rec.end_forward()
            if log_routing:
                log_docs.extend(split_log(rec.pop_log(), len(batch)))
            bar.advance(task, len(batch))
    return rec, log_docs


def _assemble(model: Any, index: CheckpointIndex, rec: Recorder, arrays: dict[str, np.ndarray],
              ids_list: list[list[int]], paths: list, sources: list, label: str | None, max_length: int,
              folds: int) -> Trace:
    """The Trace: model identity (config hash without mlx-lm's storage entries), workload, arrays, tool."""
    import mlx.core as mx

    spec, cfg = index.spec, index.config
    chash = config_hash({k: v for k, v in cfg.items() if k not in MLX_STORAGE_KEYS})
    return Trace(
        model=model_section(str(model), spec, chash, dict(cfg), index.adapter.model_shape(cfg)),
        workload=workload_section(label, paths, sources, ids_list, rec.token_counts(), max_length, 0, folds),
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, "engine": f"mlx-lm {mlx_version()}",
              "device": str(mx.default_device()), "weights": quantization_note(cfg)},
    )
