"""Commands that choose resident sets: plan, calibrate."""

from __future__ import annotations

import typer

from ..core.errors import MoesiftError
from ..engines.hf import DEVICE_HELP
from ..formats.plan import plan_diff
from ..selection.calibrate import calibrate, format_calibration
from ..selection.planner import format_plan, format_plan_diff, plan
from .app import app, emit_json


@app.command("plan")
def plan_cmd(
    traces: list[str] = typer.Argument(..., help="TRACE[:WEIGHT] ... (weights mix several workloads into one "
                                       "bank), or `diff PLAN_A PLAN_B`."),
    out: str = typer.Option(None, "--out", "-o", help="Plan file to write (moesift-plan/1 JSON)."),
    keep: float = typer.Option(None, "--keep", help="Fraction of experts kept per MoE layer."),
    keep_experts: int = typer.Option(None, "--keep-experts", help="Experts kept per MoE layer."),
    coverage: float = typer.Option(None, "--coverage", help="Smallest set per layer covering this share of routes."),
    memory: str = typer.Option(None, "--memory", help="Target checkpoint size, e.g. 20GiB (needs --model)."),
    model: str = typer.Option(None, "--model", help="Model directory, hub id or GGUF file (bytes from its headers)."),
    strategy: str = typer.Option(
        "auto", "--strategy",
        help="auto (the default: per budget, the strategy below, with or without --allocate, whose sets score the "
        "lowest perplexity on held-out folds of --calib, then planned on all of it, with --model; without them contribution for a --saliency "
        "trace, else weighted) | frequency (selection counts) | weighted (router-weight mass) | contribution (summed gate x expert "
        "output norm over this workload's routed tokens; needs a --saliency trace: the score for a workload's "
        "resident set) | saliency (REAP's mean of gate x output norm per routed token: pruning for all traffic, "
        "blind to how often an expert is used) | calibrated (greedy removal by measured layer-output error on "
        "calibration prompts: --calibration or --calib with --model) | random (ablation). weighted uses the routing weights the model applied (after top-k renormalisation)."),
    uniform: bool = typer.Option(False, "--uniform", help="Same number of experts in every MoE layer."),
    allocate: bool = typer.Option(
        False, "--allocate", help="Spread the --keep / --keep-experts / --memory total over layers by measured "
        "marginal loss (calibrated error, or the strategy's score share: coverage for frequency) per byte, "
        "instead of the same count in every layer."),
    calibration: str = typer.Option(None, "--calibration", help="Calibration file from `moesift calibrate` "
                                    "(for --strategy calibrated; with auto, what a calibrated choice ranks by "
                                    "instead of auto's own calibration of its fit folds)."),
    calib: list[str] = typer.Option(None, "--calib", help="Calibration prompts (workload file, repeatable) to "
                                    "calibrate --model on for --strategy calibrated or auto; never the evaluation data."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration documents used."),
    calib_length: int = typer.Option(256, "--calib-length", help="Tokens per calibration document."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help="Calibration dtype: auto, float32, bfloat16, float16."),
    groups: str = typer.Option(
        "auto", "--groups", help="Group-limited routers (DeepSeek-V2 and V3 style): whole (keep whole expert "
        "groups) | equal (the same number of experts in every group) | auto (whole groups unless the budget "
        "is below the whole-group floor, or only equal counts fit --memory; for --strategy calibrated, where "
        "both keep the same count, the layout the calibration measured at the lower KL). Both give standard "
        "checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random strategy and of auto's folds."),
    auto_folds: int = typer.Option(4, "--auto-folds", help="auto: folds of the calibration documents; one is "
                                   "held out for validation, the others fit every candidate."),
    auto_rounds: int = typer.Option(1, "--auto-rounds", help="auto: how many folds are held out in turn (up to "
                                    "--auto-folds: full cross-validation); one calibration pass serves every round."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
    offload: bool = typer.Option(False, "--offload", help="Plan for `moesift generate` / load_offloaded: --memory "
                                 "is device memory for non-expert weights + resident experts + cache slots; "
                                 "prints the cache hit rate the simulation predicts."),
    cache_slots: int = typer.Option(None, "--cache-slots", help="With --offload: cache slots per MoE layer "
                                    "(default 2 x top-k)."),
    policy: str = typer.Option("lru", "--policy", help="With --offload: cache policy, lru | lfu."),
    force_plan: bool = typer.Option(False, "--force-plan", help="With --model: use traces (or, in `plan diff`, "
                                    "plans) made for another config of the family anyway."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Choose resident experts per MoE layer from traces under one budget; `plan diff A B` compares banks."""
    if traces and traces[0] == "diff":
        if len(traces) != 3:
            raise MoesiftError("usage: moesift plan diff PLAN_A PLAN_B [--model MODEL] [--json]")
        d = plan_diff(traces[1], traces[2], model=model, force_plan=force_plan)
        if json_out:
            emit_json(d)
        else:
            typer.echo(format_plan_diff(d))
        return
    p = plan(traces, out=out, keep=keep, keep_experts=keep_experts, coverage=coverage, memory=memory, model=model,
             strategy=strategy, uniform=uniform, seed=seed, force=force, force_plan=force_plan,
             allocate=allocate, calibration=calibration, calib=calib or None, calib_samples=calib_samples,
             calib_length=calib_length, device=device, dtype=dtype, progress=not json_out, groups=groups,
             auto_folds=auto_folds, auto_rounds=auto_rounds,
             **({"offload": True, "cache_slots": cache_slots, "policy": policy} if offload else {}))
    if json_out:
        emit_json(p.to_dict())
    else:
        typer.echo(format_plan(p, out))


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Model directory, or a hub id in the local Hugging Face cache."),
    data: list[str] = typer.Option(..., "--data", help="Calibration prompts (workload file); repeatable. Never "
                                   "the evaluation data."),
    out: str = typer.Option(..., "--out", "-o", help="Calibration file to write (moesift-calibration/1 JSON)."),
    max_samples: int = typer.Option(64, "--max-samples", help="Calibration documents used."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens per document."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward while capturing."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
    field: str = typer.Option(None, "--field", help="JSONL key / parquet column holding the documents."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--layer-only", help="Group-limited routers (a layer "
                                    "chooses among few group sets): choose each layer's set per kept count by the "
                                    "whole model's KL to the full model on the calibration tokens, layer by layer "
                                    "with the others fixed, and measure the KL of the sets that keep the same "
                                    "number in every group (what `plan --groups auto` and --allocate use); needs "
                                    "the model through the run (offloaded with --device spread). --layer-only: the "
                                    "layer output error alone."),
    kl_top: int = typer.Option(64, "--kl-top", help="Most likely tokens of the full model kept per position for "
                               "the end-to-end KL (the rest is one bucket)."),
    end_to_end_samples: int = typer.Option(None, "--end-to-end-samples", help="Calibration documents the "
                                           "end-to-end choice runs on (default: all of them)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure per MoE layer what removing experts does to the layer's output on calibration prompts (greedy,
    least damage first), one MoE block at a time from the checkpoint; `plan --strategy calibrated
    --calibration FILE` ranks by it and `--allocate` spends budgets by it."""
    c = calibrate(model, data, out=out, max_samples=max_samples, max_length=max_length, batch_size=batch_size,
                  device=device, dtype=dtype, field=field, force=force, progress=not json_out,
                  end_to_end=end_to_end, kl_top=kl_top, end_to_end_samples=end_to_end_samples)
    if json_out:
        emit_json(c.to_dict())
    else:
        typer.echo(format_calibration(c, out))
