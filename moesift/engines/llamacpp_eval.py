"""Perplexity and speed of GGUF files run in llama.cpp (llama-cpp-python, CPU, float32 KV cache): the same
token windows as the transformers evaluation (`moesift.formats.workload.token_windows`), each window one
sequence scored on its own (position t predicts token t + 1; negative log-likelihoods summed in float64 from
llama.cpp's float32 logits), perplexity = exp(sum / tokens scored).

Each run is one GGUF file (the full model, or a trimmed one) at its own top-k or at k experts per token
through llama.cpp's `{arch}.expert_used_count` override (the family's weight normalisation then applies to the
k chosen, as llama.cpp builds it). Beside the perplexity: the file's bytes, and tokens per second of prefill
(the longest window, only its last token's logits computed) and of greedy decode (`decode_tokens` tokens one
at a time after it), each the median of `repeats` runs (5 by default) after one warm-up run. The mean number
of routed experts per token and MoE layer is derived from the rule: k, or the file's expert count when it holds fewer."""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.progress import progress_bar
from ..formats.gguf import GGUFIndex, read_gguf
from ..formats.workload import token_windows
from .llamacpp_session import GGUFSession, GGUFTokenizer, llama_cpp_version


def file_bytes(idx: GGUFIndex) -> int:
    """Bytes of the GGUF model's files on disk (every split)."""
    return sum(f.path.stat().st_size for f in idx.files)


def windows_for(idx: GGUFIndex, docs: list[dict[str, Any]], tokenizer: Any, max_length: int,
                work: Path) -> list[list[int]]:
    """The token windows of `docs`: `tokenizer` (a transformers tokenizer) when given, else the GGUF file's own."""
    if tokenizer is not None:
        return token_windows(docs, tokenizer, 0, max_length)[0]
    with GGUFSession(idx, work, n_ctx=64) as s:
        return token_windows(docs, GGUFTokenizer(s), s.n_vocab, max_length)[0]


def _median_speed(s: GGUFSession, prompt: list[int], n: int, repeats: int) -> dict[str, float]:
    s.speed(prompt, n)  # warm-up: the first run of a shape allocates llama.cpp's compute graph
    runs = [s.speed(prompt, n) for _ in range(max(1, repeats))]
    pre = statistics.median(r["prefill_tokens"] / r["prefill_s"] for r in runs)
    dec = statistics.median(r["decode_tokens"] / r["decode_s"] for r in runs) if n else float("nan")
    return {"prefill_tokens_per_s": pre, "decode_tokens_per_s": dec}


def score_file(idx: GGUFIndex, wins: list[list[int]], k: int | None, work: Path, decode_tokens: int = 32,
               repeats: int = 5, bar: Any = None, task: Any = None, name: str = "") -> dict[str, Any]:
    """Perplexity of the GGUF model `idx` on `wins` (at k experts per token when `k`), its bytes and speed."""
    longest = max(wins, key=len)
    n_ctx = max(64, len(longest) + decode_tokens + 8)
    with GGUFSession(idx, work, n_ctx=n_ctx, top_k=k) as s:
        total, n = 0.0, 0
        for w in wins:
            r = s.nll(w)
            total, n = total + r["nll"], n + r["n"]
            if bar is not None:
                bar.update(task, advance=1, description=f"evaluating {name}")
        speed = _median_speed(s, longest, decode_tokens, repeats)
    mean = total / n if n else float("nan")
    used = min(int(k or idx.spec.top_k), idx.spec.n_experts)
    return {"nll": mean, "ppl": math.exp(mean) if n else float("nan"), "tokens": n, "mean_active": float(used),
            "bytes": file_bytes(idx), "experts": idx.spec.n_experts, "file": str(idx.directory), **speed}


def eval_files(runs: Sequence[dict[str, Any]], docs: list[dict[str, Any]], tokenizer: Any = None,
               max_length: int = 512, decode_tokens: int = 32, repeats: int = 5, progress: bool = True) -> dict[str, Any]:
    """Score every run (a dict with "name", "kind", "path": a GGUF file, optionally "k") on the windows of
    `docs`; the first run's file tokenizes when no `tokenizer` is given. Returns the windows count, engine name
    and one result per run (the run's keys, the scores, `ppl_ratio` against the first "full" run)."""
    idxs = [r["index"] if "index" in r else read_gguf(r["path"]) for r in runs]
    with tempfile.TemporaryDirectory(prefix="moesift-gguf-") as tmp:
        work = Path(tmp)
        wins = windows_for(idxs[0], docs, tokenizer, max_length, work)
        results = []
        with progress_bar(progress) as bar:
            task = bar.add_task("evaluating", total=len(runs) * len(wins))
            for r, idx in zip(runs, idxs, strict=True):
                res = {k: v for k, v in r.items() if k not in ("plan", "index", "path")}
                res.update(score_file(idx, wins, r.get("k"), work, decode_tokens, repeats, bar, task, r["name"]))
                results.append(res)
    full = next((r for r in results if r["kind"] == "full"), None)
    for r in results:
        r["ppl_ratio"] = r["ppl"] / full["ppl"] if full and full["ppl"] else None
        r["bytes_ratio"] = r["bytes"] / full["bytes"] if full and full["bytes"] else None
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp_version()})", "windows": len(wins),
            "tokens": results[0]["tokens"], "results": results}
