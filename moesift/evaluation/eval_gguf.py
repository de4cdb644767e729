"""`moesift eval MODEL.gguf --engine llama.cpp`: perplexity, bytes and speed of a GGUF file in llama.cpp, of
the file trimmed to each plan (moesift's GGUF trim, written to a temporary directory; or a trimmed GGUF file
given in the plan's place) and with fewer experts per token (llama.cpp's `{arch}.expert_used_count`
override). Scoring: moesift.engines.llamacpp_eval. Tokenization: the transformers checkpoint's tokenizer when
`hf_model` (or `tokenizer`) is given, else the GGUF file's own (llama.cpp's)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..apply.trim_gguf import trim_gguf
from ..core.errors import MoesiftError
from ..engines.choose import require, runs_in_llamacpp
from ..engines.hf import load_tokenizer
from ..engines.llamacpp_eval import eval_files
from ..formats.checkpoint import resolve_model_dir
from ..formats.gguf import is_gguf, read_gguf, read_gguf_record
from ..formats.workload import read_documents


def uses_llamacpp(model: Any, engine: str, top_p: Sequence[float], device: str, dtype: str | None) -> bool:
    """Whether `model` is evaluated in llama.cpp (`engine` "llama.cpp", or "auto" and a GGUF file); one error
    line for an option llama.cpp evaluation does not take."""
    if not runs_in_llamacpp(model, engine, "evaluates"):
        return False
    if top_p:
        raise MoesiftError("--top-p is not supported with --engine llama.cpp; use --plan or --top-k")
    if dtype not in (None, "float32"):
        raise MoesiftError(f"a GGUF file runs in its own tensor types; drop --dtype {dtype}")
    if device not in ("auto", "cpu"):
        raise MoesiftError(f"--engine llama.cpp runs on the CPU; drop --device {device}")
    require("llama.cpp")
    return True


def _runs(idx: Any, plans: Sequence[Any], top_k: Sequence[int], work: Path, force_plan: bool,
          progress: bool) -> list[dict[str, Any]]:
    """The full file, each plan's trimmed file (trimmed here, or given), each top-k: what eval_files scores."""
    runs: list[dict[str, Any]] = [{"name": "full", "kind": "full", "index": idx}]
    E = idx.spec.n_experts
    for i, pl in enumerate(plans):
        src = str(pl) if isinstance(pl, (str, os.PathLike)) else getattr(pl, "source", None)
        name = f"plan {Path(src).name}" if src else f"plan {i + 1}"
        if isinstance(pl, (str, os.PathLike)) and is_gguf(pl):
            t = read_gguf(pl)
            if read_gguf_record(pl) is None or t.arch != idx.arch:
                raise MoesiftError(f"{str(pl)!r} is not a moesift trim of a {idx.arch} GGUF model (no "
                                   f"{Path(pl).name}.moesift.json beside it); give a plan or a trimmed GGUF file")
            runs.append({"name": name, "kind": "plan", "source": src, "index": t, "trimmed": "given"})
            continue
        out = trim_gguf(idx.directory, pl, work / f"plan-{i + 1}.gguf", progress=progress, checksum=None,
                        force_plan=force_plan)
        runs.append({"name": name, "kind": "plan", "source": src, "index": read_gguf(out), "trimmed": "here"})
    for k in top_k:
        k = int(k)
        if not 1 <= k <= E:
            raise MoesiftError(f"--top-k {k} is out of range 1..{E}")
        runs.append({"name": f"top-k {k}", "kind": "top_k", "k": k, "index": idx})
    return runs


def eval_llamacpp(model: str | os.PathLike, data: Sequence[Any], plans: Sequence[Any] = (), top_k: Sequence[int] = (),
                  max_length: int = 512, max_samples: int | None = None, field: str | None = None,
                  hf_model: Any = None, tokenizer: Any = None, force_plan: bool = False, progress: bool = True,
                  decode_tokens: int = 32, repeats: int = 5) -> dict[str, Any]:
    """The eval result (the keys of `moesift.evaluation.evaluate.eval_model`, plus `engine`, and per setting
    `bytes`, `bytes_ratio`, `prefill_tokens_per_s`, `decode_tokens_per_s`) of the GGUF file `model`."""
    idx = read_gguf(model)
    docs = read_documents(list(data), field=field, max_samples=max_samples)
    if tokenizer is None and hf_model is not None:
        tokenizer = load_tokenizer(resolve_model_dir(hf_model))
        if tokenizer is None:
            raise MoesiftError(f"--hf-model {str(hf_model)!r} has no tokenizer files")
    with tempfile.TemporaryDirectory(prefix="moesift-eval-gguf-") as tmp:
        runs = _runs(idx, plans, top_k, Path(tmp), force_plan, progress)
        res = eval_files(runs, docs, tokenizer=tokenizer, max_length=max_length, decode_tokens=decode_tokens,
                         repeats=repeats, progress=progress)
    spec = idx.spec
    for r in res["results"]:
        if r.get("trimmed") == "here":
            r["file"] = None  # written to a temporary directory, gone
    return {
        "model": str(model), "data": [str(d) for d in data], "engine": res["engine"],
        "engine_notes": ["llama.cpp on the CPU, the file's own tensor types, float32 KV cache; tokenized by "
                         + ("the transformers tokenizer" if tokenizer is not None else "the GGUF file's tokenizer")],
        "documents": len(docs), "windows": res["windows"], "tokens": res["tokens"], "max_length": max_length,
        "model_spec": {"n_experts": spec.n_experts, "top_k": spec.top_k, "n_shared": spec.n_shared,
                       "moe_layers": len(spec.moe_layers), "scoring": spec.scoring},
        "results": res["results"],
    }
