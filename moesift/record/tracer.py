"""Record which experts a workload selects: `trace`, and the trace-file commands `show`, `merge_traces`,
`export_trace`.

Tracing runs the model on the workload's documents in input order, `batch_size` documents per batch,
padded to the longest document of the batch. Prompts are right-padded for a plain forward; with
``generate=N`` they are left-padded and decoded greedily (``model.generate(do_sample=False,
max_new_tokens=N)``), and routing of generated tokens is recorded apart from the prompt's. Padding and
tokens fed after a sequence has produced its end-of-sequence token are never counted; decode tokens are
the generated tokens fed back through the model (N - 1 per document for N new tokens, fewer once it has
produced end-of-sequence: that token is not fed on its own either). Documents are
dealt round-robin into ``folds`` folds (document i -> fold i % folds). Statistics stay on the device
(moesift.recorder) and are copied to the host once at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import config_hash, loaded_config_dict, model_config_hash
from ..core.io import check_output_path, write_json
from ..core.progress import progress_bar
from ..core.values import check_int, int_or_none
from ..core.version import __version__
from ..engines.hf import hf_progress, load_model, resolve_device
from ..formats.checkpoint import resolve_model_dir
from ..formats.trace import SCHEMA, Trace, merge
from ..formats.wcer import dump_expert_trace
from ..formats.workload import read_documents, source_info
from .documents import log_arrays, model_section, split_log, tokenize_workload, workload_section
from .gguf_trace import trace_gguf, uses_llamacpp
from .mlx_trace import trace_engine, trace_mlx
from .recorder import Recorder


def trace(
    model: Any,
    data: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    label: str | None = None,
    max_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    generate: int = 0,
    folds: int = 8,
    saliency: bool = False,
    log_routing: bool = False,
    device: str | None = "auto",
    dtype: str | None = None,
    field: str | None = None,
    trust_remote_code: bool = False,
    force: bool = False,
    progress: bool = True,
    tokenizer: Any = None,
    engine: str = "auto",
    hf_model: str | os.PathLike | None = None,
) -> Trace:
    """Trace the routing of `model` (directory, hub id in the local cache, or a loaded transformers model
    with `tokenizer=`) on the workload files `data`; save to `out` when given (refuses to overwrite
    unless `force`). `engine`: "transformers", "mlx" (an mlx-lm model folder, traced in mlx-lm; see
    moesift.record.mlx_trace), "llama.cpp" (a GGUF file run in llama-cpp-python; `hf_model`: the
    transformers checkpoint it was converted from, for its identity and tokenizer; see
    moesift.record.gguf_trace) or "auto" (mlx for an mlx-lm model folder, llama.cpp for a GGUF file).
    Returns the Trace."""
    device = resolve_device(device)
    max_length = check_int("max_length", max_length, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    generate = check_int("generate", generate, 0)
    folds = check_int("folds", folds, 1)
    if max_samples is not None:
        max_samples = check_int("max_samples", max_samples, 1)
    engine = "llama.cpp" if uses_llamacpp(model, engine, saliency) else trace_engine(model, engine, generate, saliency)
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if out is not None:
        check_output_path(out, force, inputs=paths)
    docs = read_documents(paths, field=field, max_samples=max_samples)
    sources = source_info(paths)
    if engine == "llama.cpp":
        t = trace_gguf(model, docs, paths, sources, label, max_length, generate, folds, log_routing, progress,
                       hf_model)
    elif engine == "mlx":
        t = trace_mlx(model, docs, paths, sources, label, max_length, batch_size, folds, log_routing, progress,
                      generate, saliency)
    else:
        loaded = _load(model, tokenizer, device, dtype, trust_remote_code, progress)
        ids_list = _tokenize_workload(docs, loaded, max_length, generate, paths)
        run = _Run(loaded, folds, batch_size, generate, saliency, log_routing, progress)
        run.record(ids_list)
        t = _assemble(loaded, run, ids_list, paths, sources, label, max_length, generate, folds)
    if out is not None:
        t.save(out, force=force, inputs=paths)
    return t


# ---- steps ----------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """The model under trace, its tokenizer, and its identity in the trace file."""

    m: Any
    tok: Any
    name: str
    chash: str
    cfg_dict: dict[str, Any]
    adapter: Any
    spec: Any


def _load(model: Any, tokenizer: Any, device: str | None, dtype: str | None, trust_remote_code: bool,
          progress: bool) -> _Loaded:
    """Load `model` (a path or hub id) or take a loaded one; its name, config hash and MoE spec."""
    if isinstance(model, (str, os.PathLike)):
        mdir = resolve_model_dir(model)
        m, tok = _load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                             quiet=not progress)
        if tokenizer is not None:
            tok = tokenizer
        name, chash = str(model), model_config_hash(mdir)
        cfg_dict = json.loads((Path(mdir) / "config.json").read_text())
    else:
        m, tok = model, tokenizer
        name = str(getattr(m, "name_or_path", "") or type(m).__name__)
        cfg_dict = loaded_config_dict(m)
        chash = config_hash(cfg_dict)
    adapter = adapter_for(m.config)
    return _Loaded(m, tok, name, chash, cfg_dict, adapter, adapter.spec(m.config))


def _tokenize_workload(docs: list[dict[str, Any]], loaded: _Loaded, max_length: int, generate: int,
                       paths: list) -> list[list[int]]:
    """Token ids of every document that has any (refuses a workload where none has)."""
    m = loaded.m
    vocab = int(getattr(m.config, "vocab_size", 0) or getattr(m.get_input_embeddings(), "num_embeddings", 0))
    return tokenize_workload(docs, loaded.tok, max_length, vocab, getattr(m.config, "max_position_embeddings", None),
                             generate, paths)


class _Run:
    """Run the model over the documents batch by batch with a Recorder attached."""

    def __init__(self, loaded: _Loaded, folds: int, batch_size: int, generate: int, saliency: bool,
                 log_routing: bool, progress: bool):
        self.loaded, self.folds, self.batch_size, self.generate = loaded, folds, batch_size, generate
        self.log_routing, self.progress = log_routing, progress
        self.dev = _model_device(loaded.m)
        self.rec = Recorder(loaded.spec, self.dev, folds, want_saliency=saliency, log_routing=log_routing)
        self.pad_id = _pad_id(loaded.m, loaded.tok)
        self.eos = _eos_ids(loaded.m)
        self.log_docs: list[tuple[np.ndarray, np.ndarray]] = []
        self.state: dict[str, Any] = {}

    def gen_hook(self, mod: Any, args: Any, kwargs: Any) -> None:
        """Before each forward of `generate`: which rows count (prompt mask, then rows not yet finished)."""
        import torch

        state = self.state
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            return
        B, S = x.shape
        fold = state["fold"]
        if state["step"] == 0:
            valid = state["mask"]
            state["finished"] = torch.zeros(B, dtype=torch.bool, device=x.device)
            phase = 0
        else:
            tokens = x[:, -1]
            fin = state["finished"] | torch.isin(tokens, state["eos"]) if state["eos"] is not None else state["finished"]
            state["finished"] = fin
            valid = (~fin)[:, None].expand(B, S)
            phase = 1
        state["step"] += 1
        self.rec.begin_forward(valid, fold, phase)

    def record(self, ids_list: list[list[int]]) -> None:
        """Every batch through the model; hooks removed afterwards."""
        import torch

        m = self.loaded.m
        handles = self.rec.attach(m, self.loaded.adapter)
        hook = m.register_forward_pre_hook(self.gen_hook, with_kwargs=True) if self.generate else None
        n_docs = len(ids_list)
        n_batches = (n_docs + self.batch_size - 1) // self.batch_size
        try:
            with torch.no_grad(), progress_bar(self.progress, unit="documents") as bar:
                task = bar.add_task("tracing", total=n_docs)
                for bi in range(n_batches):
                    lo, hi = bi * self.batch_size, min(n_docs, (bi + 1) * self.batch_size)
                    self.batch(ids_list[lo:hi], lo, hi)
                    bar.advance(task, hi - lo)
        finally:
            for h in handles:
                h.remove()
            if hook is not None:
                hook.remove()

    def batch(self, batch: list[list[int]], lo: int, hi: int) -> None:
        """One padded batch (right padding, left padding to generate), documents lo..hi of the workload."""
        import torch

        m, rec, generate, dev = self.loaded.m, self.rec, self.generate, self.dev
        S = max(len(x) for x in batch)
        x = torch.full((len(batch), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for r, ids in enumerate(batch):
            if generate:  # left padding
                x[r, S - len(ids) :] = torch.as_tensor(ids)
                mask[r, S - len(ids) :] = 1
            else:
                x[r, : len(ids)] = torch.as_tensor(ids)
                mask[r, : len(ids)] = 1
        fold = torch.arange(lo, hi) % self.folds
        x, mask_d, fold = x.to(dev), mask.to(dev), fold.to(dev)
        if generate:
            self.state.update(step=0, fold=fold, mask=mask_d.bool(),
                              eos=torch.as_tensor(self.eos, device=dev) if self.eos else None)
            m.generate(input_ids=x, attention_mask=mask_d, do_sample=False, max_new_tokens=generate,
                       min_new_tokens=0, pad_token_id=self.pad_id, num_beams=1)
        else:
            rec.begin_forward(mask_d.bool(), fold, 0)
            m(input_ids=x, attention_mask=mask_d, use_cache=False)
        rec.end_forward()
        if self.log_routing:
            self.log_docs.extend(split_log(rec.pop_log(), hi - lo))

    def arrays(self) -> dict[str, np.ndarray]:
        """The recorder's statistics on the host, with the per-document routing log when kept."""
        arrays = self.rec.to_arrays()
        if self.log_routing:
            spec = self.loaded.spec
            arrays.update(log_arrays(self.log_docs, len(spec.moe_layers), spec.top_k))
        return arrays


def _assemble(loaded: _Loaded, run: _Run, ids_list: list[list[int]], paths: list, sources: list,
              label: str | None, max_length: int, generate: int, folds: int) -> Trace:
    """The Trace: model identity and shape, workload description, arrays, and the tool that made it."""
    import torch

    spec, m = loaded.spec, loaded.m
    arrays = run.arrays()
    return Trace(
        model=model_section(loaded.name, spec, loaded.chash, loaded.cfg_dict, loaded.adapter.model_shape(m.config)),
        workload=workload_section(label, paths, sources, ids_list, run.rec.token_counts(), max_length, generate,
                                  folds),
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, "torch": torch.__version__, "device": str(run.dev)},
    )


# ---- helpers --------------------------------------------------------------------------------------


def _load_model(model: Any, device: str | None, dtype: str | None, trust_remote_code: bool,
                quiet: bool = False) -> tuple[Any, Any]:
    """moesift.loading.load_model (without transformers' progress bars when `quiet`)."""
    with hf_progress(not quiet):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _model_device(m: Any) -> Any:
    import torch

    emb = m.get_input_embeddings()
    w = getattr(emb, "weight", None)
    return w.device if w is not None else torch.device("cpu")


def _pad_id(m: Any, tok: Any) -> int:
    for v in (getattr(tok, "pad_token_id", None), getattr(m.config, "pad_token_id", None),
              getattr(tok, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _eos_ids(m: Any) -> list[int]:
    gc = getattr(m, "generation_config", None)
    v = getattr(gc, "eos_token_id", None) if gc is not None else None
    if v is None:
        v = getattr(m.config, "eos_token_id", None)
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


# ---- show / merge / export ------------------------------------------------------------------------


def show(trace_path: str | os.PathLike, json: bool = False) -> dict[str, Any]:
    """Summary of one trace (a moesift trace or a WCER expert-trace/1 JSON file). Prints a table unless
    `json` (the CLI prints the dict as JSON then)."""
    t = Trace.load(trace_path)
    counts = t.counts
    L, E = counts.shape
    totals = counts.sum(axis=1)
    hot = [[int(e), int(c)] for e, c in zip(np.argmax(counts, axis=1), counts.max(axis=1), strict=True)]
    info: dict[str, Any] = {
        "schema": t.extra.get("imported_from", SCHEMA),
        "path": str(trace_path),
        "model": {
            "name": t.model.get("name"),
            "model_type": t.model.get("model_type"),
            "config_hash": t.model.get("config_hash"),
            "n_layers": L,
            "moe_layers": t.model.get("moe_layers"),
            "n_experts": int(t.model["n_experts"]),
            "top_k": int(t.model["top_k"]),
            "n_shared": t.model.get("n_shared"),
            "hash_layers": t.model.get("hash_layers") or [],
        },
        "workload": {
            "label": t.label,
            "documents": int_or_none(t.workload.get("documents", 0)),
            "prefill_tokens": int_or_none(t.workload.get("prefill_tokens", 0)),
            "decode_tokens": int_or_none(t.workload.get("decode_tokens", 0)),
            "token_sha256": t.workload.get("token_sha256"),
            "sources": t.workload.get("sources", []),
        },
        "arrays": {k: list(v.shape) for k, v in t.arrays.items()},
        "folds": t.n_folds,
        "tool": t.tool,
        "routes_per_layer": [int(x) for x in totals],
        "experts_used_per_layer": [int(x) for x in (counts > 0).sum(axis=1)],
        "hottest_per_layer": hot,
        "counts": counts.tolist(),
    }
    if not json:
        _print_summary(info, counts)
    return info


def _print_summary(info: dict[str, Any], counts: np.ndarray) -> None:
    c = Console()
    m, w = info["model"], info["workload"]
    c.print(f"[bold]{info['path']}[/bold]  ({info['schema']})")
    c.print(f"model    {m['name']}  type={m['model_type']}  MoE layers={m['n_layers']}  experts={m['n_experts']}  "
            f"top-k={m['top_k']}  shared={m['n_shared']}")
    c.print(f"workload {w['label']!r}: {w['documents']} documents, {w['prefill_tokens']} prompt tokens, "
            f"{w['decode_tokens']} generated tokens; folds={info['folds']}")
    c.print("arrays   " + ", ".join(f"{k}{v}" for k, v in info["arrays"].items()))
    tab = Table(title="per MoE layer")
    for col in ("#", "layer", "routes", "experts used", "hottest (count)", "max/mean", "experts for 90%"):
        tab.add_column(col, justify="right")
    moe = m.get("moe_layers") or list(range(len(counts)))
    for i, row in enumerate(counts):
        total = int(row.sum())
        mean = total / len(row) if len(row) else 0
        srt = np.sort(row)[::-1]
        cum = np.cumsum(srt) / max(total, 1)
        need = int(np.searchsorted(cum, 0.9) + 1) if total else 0
        tab.add_row(str(i), str(moe[i] if i < len(moe) else i), str(total), str(int((row > 0).sum())),
                    f"{int(np.argmax(row))} ({int(row.max())})", f"{(row.max() / mean) if mean else 0:.2f}", str(need))
    c.print(tab)


def merge_traces(
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    label: str | None = None,
    force: bool = False,
) -> Trace:
    """Add traces of the same model (refuses different models) and save the sum to `out`."""
    if not paths:
        raise MoesiftError("merge needs at least one trace")
    check_output_path(out, force, inputs=paths)
    traces = [Trace.load(p) for p in paths]
    t = merge(traces, label=label)
    t.tool = {"name": "moesift", "version": __version__, "merged": [str(p) for p in paths]}
    t.save(out, force=force, inputs=paths)
    return t


EXPORT_FORMATS = ("expert-trace/1", SCHEMA)


def export_trace(
    trace: str | os.PathLike | Trace,
    out: str | os.PathLike,
    format: str = "expert-trace/1",
    force: bool = False,
) -> Path:
    """Write `trace` in another format: ``expert-trace/1`` (WCER JSON) or ``moesift-trace/1``."""
    if format not in EXPORT_FORMATS:
        raise MoesiftError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    t = trace if isinstance(trace, Trace) else Trace.load(trace)
    inputs = [] if isinstance(trace, Trace) else [trace]
    if format == SCHEMA:
        return t.save(out, force=force, inputs=inputs)
    return write_json(out, dump_expert_trace(t), force=force, inputs=inputs)


# ---- command-line summaries -----------------------------------------------------------------------


def trace_summary(t: Trace, out: str | os.PathLike | None) -> dict[str, Any]:
    """What `moesift trace --json` prints about a trace written to `out`."""
    return {"out": out, "model": t.model, "workload": t.workload,
            "arrays": {k: list(v.shape) for k, v in t.arrays.items()},
            "routes_per_layer": t.counts.sum(axis=1).tolist()}


def format_trace(t: Trace, out: str | os.PathLike | None) -> str:
    """One line about a trace written to `out` (None: nothing written)."""
    w = t.workload
    return (f"traced {w['documents']} documents, {w['prefill_tokens']} prompt + {w['decode_tokens']} "
            f"generated tokens over {t.n_layers} MoE layers x {t.n_experts} experts (top-{t.top_k})"
            + (f"; wrote {out}" if out else " (no --out: nothing written)"))


def merge_summary(t: Trace, out: str | os.PathLike) -> dict[str, Any]:
    """What `moesift merge --json` prints about the merged trace written to `out`."""
    return {"out": out, "label": t.label, "documents": t.workload["documents"],
            "prefill_tokens": t.workload["prefill_tokens"], "decode_tokens": t.workload["decode_tokens"]}


def format_merge(res: dict[str, Any], n_traces: int) -> str:
    """One line about `n_traces` traces merged (`res`: merge_summary)."""
    return f"merged {n_traces} traces ({res['documents']} documents) into {res['out']}"


def format_export(p: str | os.PathLike, format: str) -> str:
    """One line about a trace exported to `p`."""
    return f"wrote {p} ({format})"
