"""Quality against memory and latency: one point per (strategy, budget) plan.

For every strategy and every `keep` fraction, `sweep` builds the plan from the trace(s) (`moesift.plan`),
and measures:

- bytes: the checkpoint size the plan predicts from the safetensors headers (exact, nothing written);
- perplexity of the model restricted to the plan on held-out data, and its ratio to the full model's
  (restriction computes what the trimmed checkpoint computes, so no checkpoint is written);
- load time of the resident-only model (`moesift.load_resident`) and its time to first token: one
  prefill forward of a fixed prompt and the greedy choice of the next token (median of three runs right
  after loading).

An mlx-lm model folder (``engine`` "mlx", or "auto" for such a folder) is measured in mlx-lm instead: bytes
from the folder's own safetensors headers (what `moesift trim` writes for the plan, quantized companions
included), perplexity of the full and the restricted MLX model (`moesift.engines.mlx_eval`), and the tokens
per second of each perplexity run in place of load time and time to first token (resident loading is a
transformers feature).

The full model is one more point (strategy ``full``, keep 1.0). Points on the Pareto front are marked:
``pareto`` over (bytes, perplexity, time to first token), all minimised, and ``pareto_quality`` over
(bytes, perplexity) alone, which timing noise cannot move. ``out`` writes a self-contained HTML page
(plotly.js inlined; opens offline).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..apply.resident import load_resident
from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.html import esc, figure, page, table
from ..core.io import check_output_path, input_paths, write_text
from ..core.progress import progress_bar
from ..engines.hf import hf_progress, resolve_device
from ..engines.mlx_eval import eval_mlx, open_index
from ..formats.checkpoint import CheckpointIndex, resolve_model_dir
from ..formats.plan import STRATEGIES
from ..formats.trace import Trace
from ..formats.workload import batches, encode_documents, read_documents, windows
from ..selection.auto import AUTO, keep_fits
from ..selection.planner import plan as make_plan
from .eval_gguf import uses_llamacpp
from .evaluate import perplexity_runs, prepare, use_mlx
from .plan_grid import plan_grid
from .sweep_gguf import sweep_llamacpp

OBJECTIVES = ("bytes", "ppl", "ttft_s")


# ------------------------------------------------------------------------------------------------
# Pareto front
# ------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """For each point (objectives, all minimised), whether no other point dominates it (at most as large
    in every objective and smaller in one). Points with a NaN objective are never on the front.

    Sort-and-cull: in lexicographic order a dominating point always comes before the points it
    dominates, and a point dominated by anything is dominated by a front member, so each point is
    checked against the front found so far."""
    idx = [i for i, p in enumerate(points) if not any(math.isnan(float(v)) for v in p)]
    idx.sort(key=lambda i: tuple(float(v) for v in points[i]))
    front: list[int] = []
    for i in idx:
        p = [float(v) for v in points[i]]
        dominated = False
        for j in front:
            q = [float(v) for v in points[j]]
            if all(a <= b for a, b in zip(q, p, strict=True)) and any(a < b for a, b in zip(q, p, strict=True)):
                dominated = True
                break
        if not dominated:
            front.append(i)
    on = set(front)
    return [i in on for i in range(len(points))]


# ------------------------------------------------------------------------------------------------
# Timing of the resident model
# ------------------------------------------------------------------------------------------------


TTFT_WARMUP = 2
TTFT_REPEATS = 7
TTFT_METHOD = ("time to first token: one prefill forward of the prompt (no KV cache) and the greedy choice of the "
               "next token, synchronised on the device; {warmup} untimed warm-up runs after loading (first touch of "
               "the weights, allocator growth), then the median of {repeats} timed runs (garbage collection off)")


def measure_ttft(model: Any, prompt: Any, warmup: int = TTFT_WARMUP, repeats: int = TTFT_REPEATS) -> dict[str, Any]:
    """Time to first token of a loaded model on `prompt` ([1, T] token ids), measured the one way the sweep and
    the demo both use (`TTFT_METHOD`): `warmup` untimed runs, then the median of `repeats` timed runs.
    Returns ``ttft_s`` (median), ``ttft_min_s``, ``ttft_max_s``, ``ttft_first_s`` (the first warm-up run:
    one-off costs included), ``ttft_runs`` and ``ttft_warmup``."""
    import torch

    dev = next(model.parameters()).device
    x = prompt.to(dev)

    def once() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits
        int(logits[0, -1].argmax())  # the greedy next token, on the host
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    warmup, repeats = max(0, int(warmup)), max(1, int(repeats))
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            warm = [once() for _ in range(warmup)]
            runs = [once() for _ in range(repeats)]
    finally:
        if was_enabled:
            gc.enable()
    return {"ttft_s": statistics.median(runs), "ttft_min_s": min(runs), "ttft_max_s": max(runs),
            "ttft_first_s": (warm or runs)[0], "ttft_runs": repeats, "ttft_warmup": warmup}


def time_resident(model_dir: Path, plan: Any, prompt: Any, device: str, dtype: str | None,
                  warmup: int = TTFT_WARMUP, repeats: int = TTFT_REPEATS) -> dict[str, Any]:
    """Seconds to load the resident-only model (`plan` None: the full model), and its time to first token
    (`measure_ttft`: warm-up runs, then the median of timed runs)."""
    if plan is None:  # the full model through the same loader, for a like-for-like comparison

        spec = CheckpointIndex.build(model_dir).spec
        plan = {layer: list(range(spec.n_experts)) for layer in spec.moe_layers}
    gc.collect()
    t0 = time.perf_counter()
    with hf_progress(False):  # one load per point: the sweep's own bar shows progress
        m = load_resident(model_dir, plan, device=device, dtype=dtype)
    m.eval()
    t1 = time.perf_counter()
    res: dict[str, Any] = {"load_s": t1 - t0}
    res.update(measure_ttft(m, prompt, warmup, repeats))
    res["params"] = int(sum(p.numel() for p in m.parameters()))
    del m
    gc.collect()
    return res


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------


def _parse_list(v: Any, cast: Any) -> list[Any]:
    if isinstance(v, (str, int, float)):
        v = [v]
    out = []
    for x in v:
        for part in (str(x).split(",") if isinstance(x, str) else [x]):
            if str(part).strip():
                out.append(cast(str(part).strip()) if isinstance(part, str) else cast(part))
    return out


def sweep(
    model: str | os.PathLike,
    trace: Any,
    data: Any,
    keep: Sequence[float] | str = (0.25, 0.5, 0.75),
    strategy: Sequence[str] | str = ("auto",),
    json: bool = False,
    out: str | os.PathLike | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    max_samples: int | None = None,
    field: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    uniform: bool = False,
    timing: bool = True,
    prompt_tokens: int = 64,
    force: bool = False,
    progress: bool = True,
    calib: Any = None,
    calibration: Any = None,
    calib_samples: int | None = 64,
    calib_length: int = 256,
    groups: str = "auto",
    engine: str = "auto",
    hf_model: Any = None,
    auto_folds: int = 4,
    auto_rounds: int = 1,
) -> dict[str, Any]:
    """Plans for every strategy x keep fraction from `trace` (path(s) or Trace objects of `model`), each
    measured for bytes, perplexity on `data` (and its ratio to the full model), load time and time to
    first token of the resident model; Pareto fronts marked. `out`: HTML page. Strategies the trace
    cannot support (saliency without a `--saliency` trace) are skipped and listed under ``skipped``.
    A strategy written ``NAME+allocate`` (e.g. ``calibrated+allocate``) spreads each budget over layers by
    measured marginal loss (`plan --allocate`). ``calibrated`` ranks by `calibration`, or calibrates on
    `calib` (default: the trace's own workload files, when they are on disk; never `data`). ``winners``
    names, per budget, the strategy with the lowest perplexity on `data`. `groups`: how group-limited
    routers keep experts (`plan`'s whole / equal / auto). `engine`: "transformers", "mlx" (an mlx-lm model
    folder, measured in mlx-lm: bytes of its trim, perplexity and tokens per second, no resident timings),
    "llama.cpp" (a GGUF file: each plan is a GGUF trim run in llama.cpp, moesift.evaluation.sweep_gguf;
    `hf_model` tokenizes) or "auto" (mlx for an mlx-lm model folder, llama.cpp for a GGUF file). ``auto`` (the default) chooses per
    budget by perplexity on held-out folds of the calibration prompts (`auto_folds`, `auto_rounds`: see
    `moesift.plan`); its point records the strategy it chose. In mlx-lm and llama.cpp, where no transformers
    model is run for calibration, ``auto`` chooses among the trace-only strategies."""
    keeps, strategies = _check_args(keep, strategy, out, force, input_paths(trace, data, calib, calibration))
    if uses_llamacpp(model, engine, (), device, dtype):
        result = _llamacpp_result(model, trace, data, keeps, strategies, max_length, max_samples, field, seed, groups,
                                  hf_model, progress and not json)
        return _output(result, out, force, json, input_paths(trace, data, calib, calibration))
    mlx = use_mlx(model, engine, device, dtype)
    device = "mlx" if mlx else resolve_device(device)
    if mlx and any(s.startswith("calibrated") for s in strategies):
        raise MoesiftError("the calibrated strategy runs the transformers model; sweep the transformers checkpoint, "
                           "or drop calibrated from --strategy with --engine mlx")
    timing = timing and not mlx
    mdir = resolve_model_dir(model)
    traces = list(trace) if isinstance(trace, (list, tuple)) else [trace]
    if mlx:  # no transformers model runs here: auto picks among the trace-only strategies
        calib = calibration = None
    else:
        calib = _calibration_prompts(strategies, traces, data, calib, calibration)
    # plans first (cheap, and errors surface before any model is loaded)
    with keep_fits():  # auto: one fit, its model held, for every budget
        plans, skipped = _plans(traces, strategies, keeps, mdir, calib, calibration, calib_samples, calib_length,
                                uniform, groups, seed, device, dtype, progress and not json, (auto_folds, auto_rounds))
    if mlx:
        runs, n_windows, engine_name = _mlx_perplexities(mdir, data, plans, field, max_samples, max_length,
                                                         batch_size, progress and not json)
        prompt = None
    else:
        runs, wins = _perplexities(mdir, data, plans, field, max_samples, max_length, batch_size, device, dtype,
                                   progress, json)
        n_windows, engine_name = len(wins), "transformers"
        import torch

        prompt = torch.tensor([max(wins, key=len)[:prompt_tokens]], dtype=torch.long)
    points = _points(mdir, plans, runs, prompt, device, dtype, timing)
    result = {
        "schema": "moesift-sweep/1",
        "model": str(model),
        "traces": [str(t) if isinstance(t, (str, os.PathLike)) else getattr(t, "label", "trace") for t in traces],
        "data": [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])],
        "engine": engine_name,
        "tokens": runs[0]["tokens"],
        "windows": n_windows,
        "keep": keeps,
        "strategies": [s for s in strategies if s not in {x["strategy"] for x in skipped}],
        "skipped": skipped,
        "seed": seed,
        "device": device,
        "timing": bool(timing),
        "prompt_tokens": int(prompt.shape[1]) if prompt is not None else 0,
        "points": points,
        "winners": winners(points),
    }
    if timing:
        result["ttft_method"] = TTFT_METHOD.format(warmup=TTFT_WARMUP, repeats=TTFT_REPEATS)
    return _output(result, out, force, json, input_paths(trace, data, calib, calibration))


def _llamacpp_result(model: Any, trace: Any, data: Any, keeps: list[float], strategies: list[str], max_length: int,
                     max_samples: int | None, field: Any, seed: int, groups: str, hf_model: Any,
                     progress: bool) -> dict[str, Any]:
    """The sweep of a GGUF file in llama.cpp, with its Pareto front and winners marked."""
    traces = list(trace) if isinstance(trace, (list, tuple)) else [trace]
    result = sweep_llamacpp(model, traces, data, keeps, strategies, max_length=max_length, max_samples=max_samples,
                            field=field, seed=seed, groups=groups, hf_model=hf_model, progress=progress)
    for p, on in zip(result["points"], pareto_front([[p["bytes"], p["ppl"]] for p in result["points"]]), strict=True):
        p["pareto"] = p["pareto_quality"] = on
    result["winners"] = winners(result["points"])
    return result


def _output(result: dict[str, Any], out: Any, force: bool, json: bool, inputs: Any) -> dict[str, Any]:
    """Write the HTML page (`out`) and print the table (unless `json`)."""
    if out is not None:
        write_text(out, page("moesift sweep", sweep_sections(result)), force=force, inputs=inputs)
        result["html"] = str(out)
    if not json:
        print_sweep(result)
    return result


def _check_args(keep: Any, strategy: Any, out: Any, force: bool,
                inputs: Sequence[str] = ()) -> tuple[list[float], list[str]]:
    """The keep fractions and strategies asked for, checked (and `out` writable) before any work."""
    keeps = _parse_list(keep, float)
    strategies = _parse_list(strategy, str)
    if not keeps:
        raise MoesiftError("give at least one --keep fraction")
    for k in keeps:
        if not 0 < k <= 1:
            raise MoesiftError(f"--keep fractions must be in (0, 1]; got {k}")
    for s in strategies:
        if s.removesuffix("+allocate") not in (AUTO, *STRATEGIES):
            raise MoesiftError(f"unknown strategy {s!r}; use one of {AUTO}, {', '.join(STRATEGIES)} (NAME+allocate spreads "
                               "the budget over layers)")
    if out is not None:
        check_output_path(out, force, inputs=inputs)
    return keeps, strategies


def _calibration_prompts(strategies: list[str], traces: list[Any], data: Any, calib: Any, calibration: Any) -> Any:
    """The calibration prompts of the calibrated and auto strategies (default: the traces' own workload files),
    never the evaluation data."""
    if calib is None and any(s.startswith(AUTO) or (s.startswith("calibrated") and calibration is None)
                             for s in strategies):
        calib = _trace_sources(traces)
    data_paths = {str(Path(d).resolve()) for d in (data if isinstance(data, (list, tuple)) else [data])}
    if calib is not None and any(str(Path(c).resolve()) in data_paths
                                 for c in ([calib] if isinstance(calib, (str, os.PathLike)) else calib)):
        raise MoesiftError("the calibration prompts are the evaluation data (--data); calibrate on other text "
                           "(--calib), or the held-out figures would be measured on what chose the set")
    return calib


def _plans(traces: list[Any], strategies: list[str], keeps: list[float], mdir: Path, calib: Any, calibration: Any,
           calib_samples: int | None, calib_length: int, uniform: bool, groups: str, seed: int, device: str,
           dtype: str | None, progress: bool,
           auto: tuple[int, int] = (4, 1)) -> tuple[list[tuple[str, float, Any]], list[dict[str, str]]]:
    """(strategy, keep, plan) of every point, and the strategies the traces cannot support (skipped)."""

    def build(s: str, k: float) -> Any:
        base, alloc = s.removesuffix("+allocate"), s.endswith("+allocate")
        return make_plan(traces, keep=k, strategy=base, model=mdir, seed=seed, uniform=uniform and not alloc,
                         allocate=alloc, calib=calib, calibration=calibration, calib_samples=calib_samples,
                         calib_length=calib_length, device=device, dtype=dtype, progress=progress, groups=groups,
                         auto_folds=auto[0], auto_rounds=auto[1])

    def skippable(s: str, e: MoesiftError) -> bool:
        base = s.removesuffix("+allocate")
        return (base in ("saliency", "contribution") and "saliency" in str(e)) or \
            (base == "calibrated" and "calibrat" in str(e) and calib is None and calibration is None)

    return plan_grid(strategies, keeps, build, skippable)


def _perplexities(mdir: Path, data: Any, plans: list[tuple[str, float, Any]], field: str | None,
                  max_samples: int | None, max_length: int, batch_size: int, device: str, dtype: str | None,
                  progress: bool, json: bool) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """(perplexity run of the full model then of every plan, the token windows scored)."""
    docs = read_documents(data if isinstance(data, (list, tuple)) else [data], field=field, max_samples=max_samples)
    with hf_progress(progress):
        m, tok = prepare(mdir, device=device, dtype=dtype)
    adapter = adapter_for(m.config)
    token_lists = encode_documents(docs, tok)
    wins = windows(token_lists, max_length)
    if not wins:
        raise MoesiftError("the data holds no document with at least 2 tokens; nothing to score")
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    batch_list = batches(wins, batch_size, pad_id=int(pad) if pad is not None else 0)
    settings = [{"name": "full", "kind": "full"}]
    settings += [{"name": f"{s} {k:g}", "kind": "plan", "plan": p, "strategy": s, "keep": k} for s, k, p in plans]
    with progress_bar(progress and not json) as bar:
        runs = perplexity_runs(m, adapter, batch_list, settings, bar)
    del m
    return runs, wins


def _mlx_perplexities(mdir: Path, data: Any, plans: list[tuple[str, float, Any]], field: str | None,
                      max_samples: int | None, max_length: int, batch_size: int,
                      progress: bool) -> tuple[list[dict[str, Any]], int, str]:
    """(perplexity run of the full MLX model then of every plan, in mlx-lm; windows scored; the engine)."""
    docs = read_documents(data if isinstance(data, (list, tuple)) else [data], field=field, max_samples=max_samples)
    settings = [{"name": "full", "kind": "full"}]
    settings += [{"name": f"{s} {k:g}", "kind": "plan", "plan": p, "strategy": s, "keep": k} for s, k, p in plans]
    res = eval_mlx(open_index(mdir), docs, settings, max_length=max_length, batch_size=batch_size, progress=progress)
    if not res["windows"]:
        raise MoesiftError("the data holds no document with at least 2 tokens; nothing to score")
    return res["results"], res["windows"], res["engine"]


def _points(mdir: Path, plans: list[tuple[str, float, Any]], runs: list[dict[str, Any]], prompt: Any, device: str,
            dtype: str | None, timing: bool) -> list[dict[str, Any]]:
    """One point per run (the full model first): bytes, perplexity, coverage, timings; Pareto fronts marked."""
    full_bytes = int(CheckpointIndex.build(mdir).total_bytes())
    points: list[dict[str, Any]] = []
    pt = {"strategy": "full", "keep": 1.0, "bytes": full_bytes, "bytes_fraction": 1.0, "ppl": runs[0]["ppl"],
          "ppl_ratio": 1.0, "coverage": 1.0, "heldout_coverage": 1.0}
    if timing:
        pt.update(time_resident(mdir, None, prompt, device, dtype))
    if runs[0].get("tokens_per_s"):
        pt["tokens_per_s"] = runs[0]["tokens_per_s"]
    points.append(pt)
    for (s, k, p), r in zip(plans, runs[1:], strict=True):
        pred = p.predictions
        pt = {"strategy": s, "keep": k, "bytes": int(pred["bytes"]), "bytes_fraction": pred["bytes"] / max(full_bytes, 1),
              "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"], "coverage": pred.get("coverage"),
              "heldout_coverage": pred.get("heldout_coverage"), "experts_resident": pred.get("experts_resident"),
              "plan": {"layers": [{"layer": e["layer"], "resident": e["resident"]} for e in p.layers]}}
        if pred.get("budget_note"):
            pt["budget_note"] = pred["budget_note"]  # the planner kept more than `keep` asks (groups, hash layers)
        if p.provenance.get("groups"):
            pt["groups"] = p.provenance["groups"]  # group-limited routers: whole groups or equal counts
        if p.provenance.get("auto"):
            pt["chosen"] = p.provenance["chosen"]  # auto: the strategy chosen on the calibration folds
            pt["auto"] = p.provenance["auto"]
        if timing:
            pt.update(time_resident(mdir, p, prompt, device, dtype))
        if r.get("tokens_per_s"):
            pt["tokens_per_s"] = r["tokens_per_s"]
        points.append(pt)
    objs = [[p["bytes"], p["ppl"], p.get("ttft_s", float("nan")) if timing else 0.0] for p in points]
    for p, on in zip(points, pareto_front(objs), strict=True):
        p["pareto"] = on
    for p, on in zip(points, pareto_front([[p["bytes"], p["ppl"]] for p in points]), strict=True):
        p["pareto_quality"] = on
    return points


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def _trace_sources(traces: list[Any]) -> list[str] | None:
    """The workload files the traces were recorded on, when all are still on disk (calibration default)."""
    files: list[str] = []
    for t in traces:
        ref = t[0] if isinstance(t, tuple) else t
        if isinstance(ref, (str, os.PathLike)):
            s = str(ref)
            ref = Trace.load(s if Path(s).exists() else s.rsplit(":", 1)[0])
        for src in (getattr(ref, "workload", None) or {}).get("sources", []):
            if not Path(src.get("path", "")).is_file():
                return None
            files.append(src["path"])
    return files or None


def winners(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per keep fraction, the strategy with the lowest perplexity on the held-out data (and the runner-up)."""
    out = []
    for k in sorted({p["keep"] for p in points if p["strategy"] != "full"}):
        pts = sorted((p for p in points if p["strategy"] != "full" and p["keep"] == k), key=lambda p: p["ppl"])
        if not pts:
            continue
        w = {"keep": k, "strategy": pts[0]["strategy"], "ppl_ratio": pts[0]["ppl_ratio"]}
        if len(pts) > 1:
            w["runner_up"] = pts[1]["strategy"]
            w["runner_up_ppl_ratio"] = pts[1]["ppl_ratio"]
        out.append(w)
    return out


EQUAL_NOTE = ("(equal groups): the plan keeps the same number of experts in every expert group of the router "
              "(`plan --groups equal`); the others keep whole groups")


def _label(p: dict[str, Any]) -> str:
    """A point's strategy, marked when a group-limited router keeps the same count in every group."""
    return (p["strategy"] + (f" ({p['chosen']})" if p.get("chosen") else "")
            + (" (equal groups)" if p.get("groups") == "equal" else ""))


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def print_sweep(r: dict[str, Any]) -> None:
    """The sweep's table and notes on stdout."""
    t = Table(title=f"sweep: {r['model']} ({r.get('engine', 'transformers')}) on {r['tokens']} tokens "
                    f"(* = Pareto front: bytes, ppl, ttft; "
                    f"+ = front of bytes, ppl)")
    speed = any(p.get("tokens_per_s") for p in r["points"])
    cols = ["strategy", "keep", "bytes", "ppl", "x full", "held-out cov"]
    if r["timing"]:
        cols += ["load s", "ttft s"]
    if speed:
        cols.append("tokens/s")
    cols.append("front")
    for c in cols:
        t.add_column(c, justify="left" if c == "strategy" else "right")
    for p in r["points"]:
        hc = p.get("heldout_coverage")
        keep = f"{p['keep']:g}" + ("!" if p.get("budget_note") else "")  # ! = the planner kept more
        row = [_label(p), keep, _mb(p["bytes"]), f"{p['ppl']:.3f}", f"{p['ppl_ratio']:.3f}",
               "" if hc is None else f"{hc:.3f}"]
        if r["timing"]:
            row += [f"{p['load_s']:.3f}", f"{p['ttft_s']:.4f}"]
        if speed:
            row.append(f"{p['tokens_per_s']:.0f}" if p.get("tokens_per_s") else "")
        row.append(("*" if p["pareto"] else "") + ("+" if p["pareto_quality"] else ""))
        t.add_row(*row)
    console = Console(stderr=False)
    console.print(t)
    if r.get("ttft_method"):
        console.print(f"ttft: {r['ttft_method']}", highlight=False)
    notes = sorted({p["budget_note"] for p in r["points"] if p.get("budget_note")})
    for n in notes:
        console.print(f"! {n}")
    if any(p.get("groups") == "equal" for p in r["points"]):
        console.print(EQUAL_NOTE, highlight=False)
    for s in r["skipped"]:
        console.print(f"skipped {s['strategy']}: {s['reason']}")
    for w in r.get("winners", []):
        ru = f" (runner-up {w['runner_up']} x{w['runner_up_ppl_ratio']:.3f})" if "runner_up" in w else ""
        console.print(f"keep {w['keep']:g}: best on the held-out data {w['strategy']} x{w['ppl_ratio']:.3f}{ru}")


def sweep_sections(r: dict[str, Any], prefix: str = "sweep") -> list[str]:
    """HTML fragments of a sweep result: quality vs bytes, latency vs bytes, and the table."""
    import plotly.graph_objects as go

    pts = r["points"]
    fig = go.Figure()
    fig2 = go.Figure()
    for s in ["full", *r["strategies"]]:
        sel = [p for p in pts if p["strategy"] == s]
        if not sel:
            continue
        x = [p["bytes"] / 2**20 for p in sel]
        text = [f"{s} keep {p['keep']:g}" for p in sel]
        fig.add_trace(go.Scatter(x=x, y=[p["ppl_ratio"] for p in sel], mode="markers+lines" if len(sel) > 1 else "markers",
                                 name=s, text=text, marker={"size": [14 if p["pareto_quality"] else 8 for p in sel],
                                                            "line": {"width": [2 if p["pareto"] else 0 for p in sel]}}))
        if r["timing"]:
            fig2.add_trace(go.Scatter(x=x, y=[p["ttft_s"] * 1000 for p in sel], mode="markers", name=f"{s} ttft", text=text))
            fig2.add_trace(go.Scatter(x=x, y=[p["load_s"] * 1000 for p in sel], mode="markers", name=f"{s} load",
                                      text=text, marker={"symbol": "square"}))
    fig.update_layout(title="Perplexity (x full model) vs checkpoint bytes; large markers: Pareto front of bytes and "
                            "perplexity, outlined: front of bytes, perplexity and time to first token",
                      xaxis_title="MiB", yaxis_title="perplexity / full", height=480)
    engine = r.get("engine", "transformers")
    run_in = "" if engine == "transformers" else (
        f" Measured in {esc(engine)}: bytes of the trimmed mlx-lm checkpoint (its safetensors headers, quantized "
        "scales and biases included), perplexity of the restricted MLX model, tokens per second of each run.")
    parts = [f"<h2>Quality vs memory</h2><p>{r['tokens']:,} held-out tokens from {esc(', '.join(r['data']))}; traces "
             f"{esc(', '.join(map(str, r['traces'])))}.{run_in}</p>", figure(fig, f"{prefix}-quality")]
    if r["timing"]:
        fig2.update_layout(title=f"Load time and time to first token ({r['prompt_tokens']}-token prompt) of the "
                                 "resident-only model", xaxis_title="MiB", yaxis_title="ms", height=420)
        parts.append(figure(fig2, f"{prefix}-latency"))
        if r.get("ttft_method"):
            parts.append(f"<p>How timings were measured: load = reading the resident experts from the checkpoint "
                         f"into a model; {esc(r['ttft_method'])}, on a {r['prompt_tokens']}-token prompt, device "
                         f"{esc(str(r.get('device')))}. The Pareto marks use these medians.</p>")
    parts.append(_points_table(r))
    for n in sorted({p["budget_note"] for p in pts if p.get("budget_note")}):
        parts.append(f"<p>! {esc(n)}</p>")
    if any(p.get("groups") == "equal" for p in pts):
        parts.append(f"<p>{esc(EQUAL_NOTE)}</p>")
    for s in r["skipped"]:
        parts.append(f"<p>Skipped {esc(s['strategy'])}: {esc(s['reason'])}</p>")
    if r.get("winners"):
        parts.append("<h2>Best strategy per budget (held-out perplexity)</h2><ul>" + "".join(
            f"<li>keep {w['keep']:g}: {esc(w['strategy'])} x{w['ppl_ratio']:.3f}"
            + (f" (runner-up {esc(w['runner_up'])} x{w['runner_up_ppl_ratio']:.3f})" if "runner_up" in w else "")
            + "</li>" for w in r["winners"]) + "</ul>")
    return parts


def _points_table(r: dict[str, Any]) -> str:
    """The points as an HTML table; points on the bytes + perplexity front in bold."""
    speed = any(p.get("tokens_per_s") for p in r["points"])
    head = ["strategy", "keep", "MiB", "ppl", "x full", "held-out coverage"]
    head += ["load s", "ttft s"] if r["timing"] else []
    head += ["tokens/s"] if speed else []
    rows = []
    for p in r["points"]:
        hc = p.get("heldout_coverage")
        row = [esc(_label(p)), f"{p['keep']:g}{'!' if p.get('budget_note') else ''}", f"{p['bytes'] / 2**20:.2f}",
               f"{p['ppl']:.3f}", f"{p['ppl_ratio']:.3f}", "" if hc is None else f"{hc:.3f}"]
        if r["timing"]:
            row += [f"{p['load_s']:.3f}", f"{p['ttft_s']:.4f}"]
        if speed:
            row.append(f"{p['tokens_per_s']:.0f}" if p.get("tokens_per_s") else "")
        row.append(f"{'all three' if p['pareto'] else ''}{' / ' if p['pareto'] and p['pareto_quality'] else ''}"
                   f"{'bytes+ppl' if p['pareto_quality'] else ''}")
        rows.append([f'<span class="front">{c}</span>' for c in row] if p["pareto_quality"] else row)
    return table([*head, "Pareto"], rows, raw=True)
