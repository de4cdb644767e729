"""`moesift sweep MODEL.gguf --engine llama.cpp`: for every strategy and budget, a plan with the same count in
every layer (a GGUF file has one expert count), the GGUF file trimmed to it (moesift's GGUF trim, in a
temporary directory) and run in llama.cpp: file bytes, perplexity, tokens/s of prefill and decode
(moesift.evaluation.eval_gguf). The full file is the first point. Strategies that need the transformers
checkpoint (calibrated) or differing counts per layer (NAME+allocate) are skipped with the reason."""

from __future__ import annotations

import os
from typing import Any

from ..selection.planner import plan as make_plan
from .eval_gguf import eval_llamacpp
from .plan_grid import plan_grid


def _refused(s: str) -> str | None:
    if s.endswith("+allocate") or s.startswith("calibrated"):
        why = ("spreads the budget unevenly over layers, and a GGUF file has one expert count"
               if s.endswith("+allocate") else "calibrates the transformers checkpoint; plan it there")
        return f"not with --engine llama.cpp: {why}"
    return None


def _plans(traces: list[Any], strategies: list[str], keeps: list[float], seed: int, groups: str,
           progress: bool) -> tuple[list[tuple[str, float, Any]], list[dict[str, str]]]:
    return plan_grid(strategies, keeps,
                     lambda s, k: make_plan(traces, keep=k, strategy=s, seed=seed, uniform=True, groups=groups,
                                            progress=progress),
                     lambda s, e: s in ("saliency", "contribution") and "saliency" in str(e), _refused)


def sweep_llamacpp(model: str | os.PathLike, traces: list[Any], data: Any, keeps: list[float], strategies: list[str],
                   max_length: int = 512, max_samples: int | None = None, field: str | None = None, seed: int = 0,
                   groups: str = "auto", hf_model: Any = None, progress: bool = True) -> dict[str, Any]:
    """The sweep result (the keys of `moesift.evaluation.sweep.sweep` without timings of a resident model; per
    point the GGUF file's bytes and llama.cpp's prefill and decode tokens/s) of the GGUF file `model`. Pareto
    fronts and winners are left to the caller."""
    plans, skipped = _plans(traces, strategies, keeps, seed, groups, progress)
    data_list = list(data) if isinstance(data, (list, tuple)) else [data]
    res = eval_llamacpp(model, data_list, plans=[p for _, _, p in plans], max_length=max_length,
                        max_samples=max_samples, field=field, hf_model=hf_model, progress=progress)
    full, runs = res["results"][0], res["results"][1:]
    speed = ("prefill_tokens_per_s", "decode_tokens_per_s")
    points = [{"strategy": "full", "keep": 1.0, "bytes": full["bytes"], "bytes_fraction": 1.0, "ppl": full["ppl"],
               "ppl_ratio": 1.0, "coverage": 1.0, "heldout_coverage": 1.0, **{k: full[k] for k in speed}}]
    for (s, k, p), r in zip(plans, runs, strict=True):
        pred = p.predictions
        points.append({"strategy": s, "keep": k, "bytes": r["bytes"], "bytes_fraction": r["bytes_ratio"],
                       "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"], "coverage": pred.get("coverage"),
                       "heldout_coverage": pred.get("heldout_coverage"), "experts_resident": r["experts"],
                       **{x: r[x] for x in speed},
                       "plan": {"layers": [{"layer": e["layer"], "resident": e["resident"]} for e in p.layers]}})
    return {
        "schema": "moesift-sweep/1", "model": str(model), "engine": res["engine"], "engine_notes": res["engine_notes"],
        "traces": [str(t) if isinstance(t, (str, os.PathLike)) else getattr(t, "label", "trace") for t in traces],
        "data": [str(d) for d in data_list], "tokens": res["tokens"], "windows": res["windows"], "keep": keeps,
        "strategies": [s for s in strategies if s not in {x["strategy"] for x in skipped}], "skipped": skipped,
        "seed": seed, "device": "cpu", "timing": False, "points": points,
    }
