"""Trace a GGUF file (llama.cpp) in llama.cpp: `moesift trace MODEL.gguf --engine llama.cpp`.

The file runs in llama-cpp-python in a child process (moesift.engines.llamacpp_session), one document at a
time; llama.cpp's graph evaluation callback copies, per MoE layer and token, the selected expert ids (the
first `expert_used_count` of the router's descending order), the routing weights and the router logits
(moesift.engines.llamacpp_worker names the tensors). They go through the same Recorder as the transformers
tracer: counts with prefill and decode apart, folds, co-activation, transitions, router and weight masses, the
optional routing log. With ``generate=N`` each document's greedy continuation is decoded (plain argmax, as
transformers' greedy generate) and the generated tokens fed back are counted as decode tokens (N - 1, fewer
once an end-of-sequence token is produced).

Identity: the model type, MoE layers, experts and top-k come from the GGUF metadata (moesift.arch.gguf).
With ``hf_model`` (the transformers checkpoint the file was converted from) the trace carries that
checkpoint's config and config hash, so it merges and compares with transformers traces of it; its tokenizer
and end-of-sequence ids are used. Without it the workload is tokenized by the file's own tokenizer
(llama.cpp's) and the config is the file's `{arch}.*` metadata (its hash identifies the model among GGUF
traces: an F32 file and its quantizations share it, a trim does not)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..arch import gguf as gguf_names
from ..arch.registry import adapter_for
from ..arch.spec import Route
from ..core.errors import MoesiftError
from ..core.identity import config_hash, model_config_hash
from ..core.progress import progress_bar
from ..core.version import __version__
from ..engines.choose import require, runs_in_llamacpp
from ..engines.hf import load_tokenizer
from ..engines.llamacpp_session import GGUFSession, GGUFTokenizer, llama_cpp_version
from ..formats.checkpoint import load_config_dict, resolve_model_dir
from ..formats.gguf import GGUFIndex, read_gguf
from ..formats.trace import Trace
from .documents import log_arrays, model_section, split_log, tokenize_workload, workload_section
from .recorder import Recorder


def uses_llamacpp(model: Any, engine: str, saliency: bool) -> bool:
    """Whether `model` is traced in llama.cpp (`engine` "llama.cpp", or "auto" and a GGUF file); one error line
    for what llama.cpp tracing does not do."""
    if not runs_in_llamacpp(model, engine, "traces"):
        return False
    if saliency:
        raise MoesiftError("--saliency is not supported with --engine llama.cpp; trace the transformers checkpoint "
                           "for saliency")
    require("llama.cpp")
    return True


def gguf_identity(idx: GGUFIndex, hf_model: Any) -> dict[str, Any]:
    """name, spec, config, config hash, shape and HF directory (or None) of the model a GGUF trace describes."""
    if hf_model is None:
        cfg = {k: v for k, v in idx.metadata.items()
               if k == "general.architecture" or k.startswith(f"{idx.arch}.")}
        shape = idx.model_shape()
        return {"spec": idx.spec, "config": cfg, "chash": config_hash(cfg), "dir": None,
                "shape": {"hidden_size": shape["hidden_size"], "num_hidden_layers": shape["num_hidden_layers"]}}
    d = resolve_model_dir(hf_model)
    cfg = load_config_dict(d)
    adapter = adapter_for(cfg)
    spec = adapter.spec(cfg)
    diffs = [f"{k}: {a} vs {b}" for k, a, b in (
        ("model_type", spec.model_type, "/".join(idx.family.model_types)),
        ("n_experts", spec.n_experts, idx.spec.n_experts), ("top_k", spec.top_k, idx.spec.top_k),
        ("moe_layers", list(spec.moe_layers)[:8], list(idx.spec.moe_layers)[:8]))
        if (a not in idx.family.model_types if k == "model_type" else a != b)]
    if diffs:
        raise MoesiftError(f"--hf-model {str(hf_model)!r} is not the model of {str(idx.directory)!r}: "
                           f"{'; '.join(diffs)} (checkpoint vs GGUF file)")
    return {"spec": spec, "config": cfg, "chash": model_config_hash(d), "dir": d, "shape": adapter.model_shape(cfg)}


def _eos(d: Path | None) -> list[int] | None:
    """End-of-sequence ids of the transformers checkpoint (generation_config.json, else config.json)."""
    if d is None:
        return None
    for name in ("generation_config.json", "config.json"):
        p = d / name
        if p.is_file():
            v = json.loads(p.read_text()).get("eos_token_id")
            if v is not None:
                return [int(x) for x in (v if isinstance(v, list) else [v])]
    return []


def trace_gguf(model: str | os.PathLike, docs: list[dict[str, Any]], paths: list, sources: list,
               label: str | None, max_length: int, generate: int, folds: int, log_routing: bool, progress: bool,
               hf_model: Any = None) -> Trace:
    """The Trace of the GGUF model `model` on the documents `docs` (read from `paths`), run in llama.cpp."""
    idx = read_gguf(model)
    ident = gguf_identity(idx, hf_model)
    spec = ident["spec"]
    longest = idx.meta("context_length")
    with tempfile.TemporaryDirectory(prefix="moesift-gguf-") as tmp:
        tok = load_tokenizer(ident["dir"]) if ident["dir"] is not None else None
        if tok is None:
            with GGUFSession(idx, Path(tmp), n_ctx=64) as s:
                ids_list = tokenize_workload(docs, GGUFTokenizer(s), max_length, s.n_vocab, longest, generate, paths)
        else:
            vocab = int(ident["config"].get("vocab_size") or 0)
            ids_list = tokenize_workload(docs, tok, max_length, vocab, longest, generate, paths)
        n_ctx = max(64, max(len(x) for x in ids_list) + generate + 8)
        with GGUFSession(idx, Path(tmp), n_ctx=n_ctx, route=True) as s:
            rec, log_docs = _record(s, spec, ids_list, generate, folds, log_routing, _eos(ident["dir"]), progress)
    arrays = rec.to_arrays()
    if log_routing:
        arrays.update(log_arrays(log_docs, len(spec.moe_layers), spec.top_k))
    types = sorted({t.dtype for t in idx.tensors if t.kind == gguf_names.EXPERT})
    return Trace(
        model=model_section(str(model), spec, ident["chash"], dict(ident["config"]), ident["shape"]),
        workload=workload_section(label, paths, sources, ids_list, rec.token_counts(), max_length, generate, folds),
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, "engine": f"llama.cpp (llama-cpp-python "
              f"{llama_cpp_version()})", "device": "cpu", "weights": f"GGUF, experts in {'/'.join(types)}",
              "config_from": "transformers checkpoint" if ident["dir"] is not None else "GGUF metadata"},
    )


def _record(s: GGUFSession, spec: Any, ids_list: list[list[int]], generate: int, folds: int, log_routing: bool,
            eos: list[int] | None, progress: bool) -> tuple[Recorder, list]:
    """Every document through llama.cpp, its routing into a Recorder (prompt tokens as prefill, generated
    tokens fed back as decode); the Recorder and the per-document routing log (when `log_routing`)."""
    import torch

    rec = Recorder(spec, "cpu", folds, log_routing=log_routing)
    log_docs: list = []
    with progress_bar(progress, unit="documents") as bar:
        task = bar.add_task("tracing", total=len(ids_list))
        for i, ids in enumerate(ids_list):
            r = s.route(ids, generate, eos)
            fold = torch.tensor([i % folds])
            n_prompt, n_all = r["prompt"], len(r["ids"])
            for phase, lo, hi in ((0, 0, n_prompt), (1, n_prompt, n_all)):
                if hi <= lo:
                    continue
                rec.begin_forward(torch.ones(1, hi - lo, dtype=torch.bool), fold, phase)
                for m in range(len(spec.moe_layers)):
                    w = r.get("weights")
                    rec.on_route(m, Route(torch.from_numpy(np.ascontiguousarray(r["ids"][lo:hi, m])).long(),
                                          None if w is None else torch.from_numpy(np.ascontiguousarray(w[lo:hi, m]))))
                    if "logits" in r:
                        rec.on_logits(m, torch.from_numpy(np.ascontiguousarray(r["logits"][lo:hi, m])))
            rec.end_forward()
            if log_routing:
                log_docs.extend(split_log(rec.pop_log(), 1))
            bar.advance(task, 1)
    return rec, log_docs
