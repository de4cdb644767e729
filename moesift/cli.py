"""`moesift` command line: a thin layer over the public functions (each command = one function)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from .analysis.cachesim import cache, format_cache
from .apply.offload import format_generate, generate, print_stream
from .apply.trim import format_trim, trim, trim_summary
from .arch import supported_model_types
from .core.errors import MoesiftError
from .core.io import json_default
from .engines.hf import DEVICE_HELP
from .evaluation.evaluate import eval_model, print_table
from .evaluation.sweep import sweep
from .evaluation.verify import format_verify, format_verify_files, verify, verify_files
from .formats.plan import plan_diff
from .record.importers import format_import, import_summary, import_trace
from .record.tracer import (
    export_trace,
    format_export,
    format_merge,
    format_trace,
    merge_summary,
    merge_traces,
    show,
    trace,
    trace_summary,
)
from .selection.calibrate import calibrate, format_calibration
from .selection.place import place, print_placement
from .selection.planner import format_plan, format_plan_diff, plan
from .surfaces.demo import demo
from .surfaces.entry import run_app
from .surfaces.report import compare, report

app = typer.Typer(
    name="moesift",
    help="Shrink a Mixture-of-Experts model to the experts a workload uses, and prove the result matches "
    "the full model restricted the same way.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (for --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")


# ---- commands: one section per area, each a thin wrapper over its public function ----

# [foundation: trace, show, merge, export]


@app.command("trace")
def trace_cmd(
    model: str = typer.Argument(..., help="Model directory, or a hub id in the local Hugging Face cache."),
    data: list[str] = typer.Option(..., "--data", help="Workload file (text, JSONL, parquet, saved dataset); repeatable."),
    out: str = typer.Option(None, "--out", help="Write the trace (moesift-trace/1 safetensors) here."),
    label: str = typer.Option(None, "--label", help="Workload name (default: first file's stem)."),
    max_samples: int = typer.Option(None, "--max-samples", help="Trace only the first N documents."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate each document to L tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Documents per forward (padded, padding not counted)."),
    generate: int = typer.Option(0, "--generate", help="Also decode N tokens greedily; decode routing kept apart."),
    folds: int = typer.Option(8, "--folds", help="Deal documents round-robin into F folds (held-out coverage)."),
    saliency: bool = typer.Option(False, "--saliency", help="Record REAP saliency (gate weight x ||expert output||)."),
    log_routing: bool = typer.Option(False, "--log-routing", help="Keep every token's selected experts (int16)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
    field: str = typer.Option(None, "--field", help="JSONL key / parquet or dataset column holding the documents."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the trace summary as JSON."),
    engine: str = typer.Option("auto", "--engine", help="transformers, mlx (an mlx-lm model folder, prefill "
                               "only), or auto (mlx for an mlx-lm model folder)."),
) -> None:
    """Record which experts a workload selects, per MoE layer, with statistics kept on the device."""
    t = trace(model, data, out=out, label=label, max_samples=max_samples, max_length=max_length,
              batch_size=batch_size, generate=generate, folds=folds, saliency=saliency, log_routing=log_routing,
              device=device, dtype=dtype, field=field, trust_remote_code=trust_remote_code, force=force,
              progress=not json_out, engine=engine)
    if json_out:
        emit_json(trace_summary(t, out))
    else:
        typer.echo(format_trace(t, out))


@app.command("show")
def show_cmd(
    trace: str = typer.Argument(..., help="A moesift trace or a WCER expert-trace/1 JSON file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Summarise a trace: model, workload, and per-layer routing concentration."""
    info = show(trace, json=json_out)
    if json_out:
        emit_json(info)


@app.command("merge")
def merge_cmd(
    traces: list[str] = typer.Argument(..., help="Traces of the same model."),
    out: str = typer.Option(..., "--out", help="Write the merged trace here."),
    label: str = typer.Option(None, "--label", help="Workload name of the merged trace."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Add traces of the same model (counts add, folds add, routing logs concatenate)."""
    res = merge_summary(merge_traces(traces, out, label=label, force=force), out)
    if json_out:
        emit_json(res)
    else:
        typer.echo(format_merge(res, len(traces)))


@app.command("export")
def export_cmd(
    trace: str = typer.Argument(..., help="A moesift trace (or expert-trace/1 JSON)."),
    out: str = typer.Option(..., "--out", help="Output file."),
    format: str = typer.Option("expert-trace/1", "--format", help="expert-trace/1 (WCER JSON) or moesift-trace/1."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a trace in another format."""
    p = export_trace(trace, out, format=format, force=force)
    if json_out:
        emit_json({"out": str(p), "format": format})
    else:
        typer.echo(format_export(p, format))


@app.command("families")
def families_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the supported MoE families (transformers model_type values)."""
    names = supported_model_types()
    if json_out:
        emit_json({"model_types": names})
    else:
        for n in names:
            typer.echo(n)

# [analysis: report, compare]


@app.command("report")
def report_cmd(
    traces: list[str] = typer.Argument(..., help="Trace files (moesift traces or expert-trace/1 JSON) of one model."),
    model: str = typer.Option(None, "--model", help="Model directory or hub id (local cache): bytes from its headers."),
    out: str = typer.Option(None, "--out", help="Write a self-contained HTML report here."),
    locality_tokens: int = typer.Option(8192, "--locality-tokens", help="Logged tokens (whole documents) used for SRP."),
    cache_tokens: int = typer.Option(2048, "--cache-tokens", help="Logged tokens (whole documents, taken from the SRP sample) replayed through SCH and the LRU/LFU/Belady caches."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with every figure."),
) -> None:
    """How concentrated routing is, what a resident set saves, and how far the trace can be trusted."""
    res = report(traces, model=model, out=out, json=json_out, locality_tokens=locality_tokens, cache_tokens=cache_tokens,
                 force=force)
    if json_out:
        emit_json(res)


@app.command("compare")
def compare_cmd(
    traces: list[str] = typer.Argument(..., help="Two or more trace files of one model."),
    keep: float = typer.Option(0.5, "--keep", help="Fraction of experts in each workload's resident set."),
    target: float = typer.Option(0.9, "--target", help="Coverage every workload must reach in the smallest union."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Cross-coverage, Jaccard of resident sets, and the smallest union that serves every workload."""
    res = compare(traces, keep=keep, json=json_out, target=target)
    if json_out:
        emit_json(res)

# [plan / trim / verify: plan, plan diff, trim, verify]


@app.command("plan")
def plan_cmd(
    traces: list[str] = typer.Argument(..., help="TRACE[:WEIGHT] ... (weights mix several workloads into one "
                                       "bank), or `diff PLAN_A PLAN_B`."),
    out: str = typer.Option(None, "--out", "-o", help="Plan file to write (moesift-plan/1 JSON)."),
    keep: float = typer.Option(None, "--keep", help="Fraction of experts kept per MoE layer."),
    keep_experts: int = typer.Option(None, "--keep-experts", help="Experts kept per MoE layer."),
    coverage: float = typer.Option(None, "--coverage", help="Smallest set per layer covering this share of routes."),
    memory: str = typer.Option(None, "--memory", help="Target checkpoint size, e.g. 20GiB (needs --model)."),
    model: str = typer.Option(None, "--model", help="Model directory or hub id (bytes from its headers)."),
    strategy: str = typer.Option(
        "frequency", "--strategy",
        help="frequency (selection counts) | weighted (router-weight mass) | contribution (summed gate x expert "
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
                                    "(for --strategy calibrated)."),
    calib: list[str] = typer.Option(None, "--calib", help="Calibration prompts (workload file, repeatable) to "
                                    "calibrate --model on for --strategy calibrated; never the evaluation data."),
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
    seed: int = typer.Option(0, "--seed", help="Seed of the random strategy."),
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
             **({"offload": True, "cache_slots": cache_slots, "policy": policy} if offload else {}))
    if json_out:
        emit_json(p.to_dict())
    else:
        typer.echo(format_plan(p, out))


@app.command("trim")
def trim_cmd(
    model: str = typer.Argument(..., help="Source model directory or hub id (safetensors)."),
    plan: str = typer.Option(..., "--plan", help="Plan file (moesift-plan/1 or resident-manifest/1)."),
    out: str = typer.Option(..., "--out", "-o", help="Directory of the trimmed checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB."),
    checksum: str = typer.Option("blake3", "--checksum", help="Checksum of every output file recorded in "
                                 "moesift_plan.json: blake3, sha256 or none."),
    no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip the checksums of output files "
                                      "(--checksum none)."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Use a plan made for another config of the "
                                    "family (its config_hash differs) anyway."),
    engine_config: bool = typer.Option(False, "--engine-config", help="Write the config keys mlx-lm and "
                                       "llama.cpp read (top-level rope_theta, the family's hub key names) and store "
                                       "a tied model's output projection as lm_head.weight."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a smaller checkpoint holding only the plan's resident experts (streamed, source untouched)."""
    d = trim(model, plan, out, force=force, max_shard_size=max_shard_size, progress=not json_out,
             checksums=not no_checksums, force_plan=force_plan, engine_config=engine_config, checksum=checksum)
    summary = trim_summary(d)
    if json_out:
        emit_json(summary)
    else:
        typer.echo(format_trim(summary))


@app.command("verify")
def verify_cmd(
    model: str = typer.Argument(..., help="Full model directory or hub id."),
    trimmed: str = typer.Argument(None, help="Trimmed checkpoint directory (not with --offloaded)."),
    plan: str = typer.Option(None, "--plan", help="Plan (default: the one recorded in TRIMMED)."),
    offloaded: str = typer.Option(None, "--offloaded", help="Plan: compare the full model with itself loaded by "
                                  "load_offloaded (resident experts on --device, the rest in host memory)."),
    cache_slots: int = typer.Option(None, "--cache-slots", help="With --offloaded: cache slots per MoE layer."),
    policy: str = typer.Option("lru", "--policy", help="With --offloaded: cache policy, lru | lfu."),
    host_compute_max_tokens: int = typer.Option(4, "--host-compute-max-tokens", help="With --offloaded: a missed "
                                                "expert with at most this many tokens in a call runs on the host."),
    data: list[str] = typer.Option(None, "--data", help="Held-out prompts (JSONL / text); default: random tokens."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Greedy tokens generated per prompt."),
    max_samples: int = typer.Option(8, "--max-samples", help="Prompts used."),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per prompt at most."),
    field: str = typer.Option(None, "--field", help="Text field of JSONL / datasets."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (exact comparison), bfloat16, float16, "
                              "auto (the checkpoint's dtype; in bfloat16 top-k may break ties differently)."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Use a plan made for another config of the "
                                    "family (its config_hash differs) anyway."),
    engine: str = typer.Option("transformers", "--engine", help="What runs TRIMMED: transformers, mlx (mlx-lm, "
                               "needs moesift\\[mlx]) or llama.cpp (F32 GGUF made by llama.cpp's converter, needs "
                               "moesift\\[gguf] and MOESIFT_LLAMA_CPP naming a llama.cpp tree with "
                               "convert_hf_to_gguf.py); engines need a uniform trim and compare in float32 on the CPU."),
    files: bool = typer.Option(False, "--files", help="Only re-compute the checksums a trim recorded of its "
                               "files (`moesift verify TRIMMED --files`) and name the files that differ."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Restricted full model vs trimmed model (or, with --offloaded, full model vs offloaded model): top-1
    agreement, logit differences, greedy generations. Exit code 1 when they disagree. With --files: the
    recorded checksums of a trimmed checkpoint's files, exit code 1 when one differs."""
    if files:
        r = verify_files(trimmed or model)
    else:
        r = verify(model, trimmed, plan=plan, data=data or None, max_new_tokens=max_new_tokens,
                   max_samples=max_samples, max_length=max_length, field=field, device=device, dtype=dtype,
                   progress=not json_out, offloaded=offloaded, cache_slots=cache_slots, policy=policy,
                   host_compute_max_tokens=host_compute_max_tokens, force_plan=force_plan, engine=engine)
    if json_out:
        emit_json(r)
    else:
        typer.echo(format_verify_files(r) if files else format_verify(r))
    if not r["ok"]:
        raise typer.Exit(1)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="Full model directory or hub id."),
    plan: str = typer.Option(..., "--plan", help="Plan whose resident experts stay on the device."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offload: str = typer.Option("cpu", "--offload", help="Where the other experts live: cpu (host memory, "
                                "pinned for CUDA)."),
    cache_slots: int = typer.Option(None, "--cache-slots", help="Device cache slots per MoE layer (default: the "
                                    "plan's when made with --offload, else 2 x top-k)."),
    policy: str = typer.Option("lru", "--policy", help="Cache policy: lru | lfu."),
    host_compute_max_tokens: int = typer.Option(4, "--host-compute-max-tokens", help="A missed expert with at most "
                                                "this many tokens in a call runs on the host; more: copied to a "
                                                "slot and run on the device."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens generated (greedy)."),
    dtype: str = typer.Option(None, "--dtype", help="auto (checkpoint dtype), float32, bfloat16, float16."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (no streaming)."),
) -> None:
    """Generate with the full model's outputs: resident experts on the device, the others in host memory.
    Streams the text, then prints tokens/s and the measured cache hit rate per MoE layer."""
    r = generate(model, plan, prompt=prompt, device=device, offload=offload, cache_slots=cache_slots, policy=policy,
                 host_compute_max_tokens=host_compute_max_tokens, max_new_tokens=max_new_tokens, dtype=dtype,
                 echo=None if json_out else print_stream, progress=not json_out)
    if json_out:
        emit_json(r)
    else:
        typer.echo(format_generate(r))


# [quality: eval, sweep, demo]


def _split_values(values: list[str] | None, cast: Any, flag: str) -> list[Any]:
    """Values of a repeatable option that also takes comma-separated lists ("--top-k 4,2 --top-k 1")."""
    out = []
    for v in values or []:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise MoesiftError(f"{flag}: cannot read {part.strip()!r} as a number") from None
    return out


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model directory, or a hub id in the local Hugging Face cache."),
    data: list[str] = typer.Option(..., "--data", help="Held-out text (text, JSONL, parquet); repeatable."),
    plan: list[str] = typer.Option(None, "--plan", help="Also evaluate routing restricted to this plan; repeatable."),
    top_k: list[str] = typer.Option(None, "--top-k", help="Also evaluate with K experts per token (e.g. 4,2,1)."),
    top_p: list[str] = typer.Option(None, "--top-p", help="Also evaluate dynamic top-p routing (e.g. 0.5,0.8)."),
    max_length: int = typer.Option(512, "--max-length", help="Window length in tokens (longer texts are cut)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward."),
    max_samples: int = typer.Option(None, "--max-samples", help="Use only the first N documents."),
    field: str = typer.Option(None, "--field", help="JSONL key / parquet column holding the documents."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Use a plan made for another config of the "
                                    "family (its config_hash differs) anyway."),
    engine: str = typer.Option("auto", "--engine", help="auto (mlx for an mlx-lm model folder), transformers, or "
                               "mlx (full model, --plan and --top-k in mlx-lm, float32)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Perplexity of the full model, restricted to plans, with fewer experts per token and with dynamic top-p
    routing, each with the mean number of experts active per token."""
    res = eval_model(model, data, plans=plan or (), top_k=_split_values(top_k, int, "--top-k"),
                     top_p=_split_values(top_p, float, "--top-p"), max_length=max_length, batch_size=batch_size,
                     device=device, dtype=dtype, json=json_out, progress=not json_out, max_samples=max_samples,
                     field=field, trust_remote_code=trust_remote_code, force_plan=force_plan, engine=engine)
    if json_out:
        emit_json(res)
    else:
        print_table(res)


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


@app.command("sweep")
def sweep_cmd(
    model: str = typer.Argument(..., help="Model directory, or a hub id in the local Hugging Face cache."),
    trace: list[str] = typer.Option(..., "--trace", help="Trace(s) to plan from (PATH or PATH:WEIGHT); repeatable."),
    data: list[str] = typer.Option(..., "--data", help="Held-out text for perplexity; repeatable."),
    keep: str = typer.Option("0.25,0.5,0.75", "--keep", help="Fractions of experts kept per MoE layer."),
    strategy: str = typer.Option("frequency,weighted,contribution,saliency,random", "--strategy",
                                 help="Selection strategies (see `plan --help`); NAME+allocate spreads each budget "
                                 "over layers, e.g. calibrated+allocate."),
    calib: list[str] = typer.Option(None, "--calib", help="Calibration prompts for the calibrated strategy "
                                    "(default: the trace's own workload files; never --data)."),
    calibration: str = typer.Option(None, "--calibration", help="Calibration file from `moesift calibrate`."),
    out: str = typer.Option(None, "--out", help="Write a self-contained HTML page here."),
    max_length: int = typer.Option(512, "--max-length", help="Window length in tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward."),
    max_samples: int = typer.Option(None, "--max-samples", help="Use only the first N documents of --data."),
    field: str = typer.Option(None, "--field", help="JSONL key / parquet column holding the documents."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random strategy."),
    uniform: bool = typer.Option(False, "--uniform", help="Equal expert counts in every layer."),
    groups: str = typer.Option("auto", "--groups", help="Group-limited routers: whole | equal | auto (see "
                               "`plan --help`)."),
    no_timing: bool = typer.Option(False, "--no-timing", help="Skip loading each resident model for timings."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Quality against memory and latency: for each strategy and budget, bytes, perplexity (x full), load time
    and time to first token of the resident model, with the Pareto front marked."""
    res = sweep(model, trace, data, keep=keep, strategy=strategy, json=json_out, out=out, max_length=max_length,
                batch_size=batch_size, max_samples=max_samples, field=field, device=device, dtype=dtype, seed=seed,
                uniform=uniform, timing=not no_timing, force=force, progress=not json_out, calib=calib or None,
                calibration=calibration, groups=groups)
    if json_out:
        emit_json(res)
    elif out:
        typer.echo(f"wrote {out}")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option(None, "--out", help="Output directory (default ./moesift-demo)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller run (fewer prompts and points), for tests."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """The whole pipeline on the bundled reference models and workloads: trace, report, compare, plan, trim,
    verify, evaluate and sweep; writes one HTML report."""
    res = demo(out=out, json=json_out, quick=quick, progress=not json_out)
    if json_out:
        emit_json(res)

# [scale-out: place, cache, import]


@app.command("place")
def place_cmd(
    trace: str = typer.Argument(..., help="Trace file (with a routing log or transitions for --method affinity)."),
    gpus: int = typer.Option(..., "--gpus", help="GPUs of the expert-parallel group."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes the GPUs are spread over (balance: experts packed per node)."),
    replicas: int = typer.Option(0, "--replicas", help="Redundant expert slots per layer (balance)."),
    method: str = typer.Option("balance", "--method", help="balance (EPLB-style) or affinity (ExFlow-style)."),
    out: str = typer.Option(None, "--out", help="Write the placement JSON here (and PLACEMENT.sglang.json)."),
    hidden: int = typer.Option(None, "--hidden", help="Hidden size for all-to-all bytes (default: the trace's "
                               "hidden_size, recorded by `trace` and by `import --model`)."),
    dtype_bytes: int = typer.Option(2, "--dtype-bytes", help="Bytes per activation element sent (2 for bf16)."),
    time_limit: float = typer.Option(30.0, "--time-limit", help="Seconds the integer program may run."),
    max_load_ratio: float = typer.Option(None, "--max-load-ratio", help="Affinity: cap busiest/mean GPU load."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Place experts on GPUs from a trace and simulate load, cross-GPU hops and all-to-all bytes."""
    res = place(trace, gpus=gpus, nodes=nodes, replicas=replicas, method=method, out=out, json=json_out,
                hidden=hidden, dtype_bytes=dtype_bytes, time_limit=time_limit, max_load_ratio=max_load_ratio,
                force=force)
    if json_out:
        emit_json(res)
    else:
        print_placement(res, method, gpus, echo=typer.echo)


@app.command("cache")
def cache_cmd(
    trace: str = typer.Argument(..., help="Trace file with a routing log (trace with --log-routing)."),
    capacity: int = typer.Option(None, "--capacity", help="Cached experts per MoE layer."),
    memory: float = typer.Option(None, "--memory", help="GiB of expert weights to cache (needs --model)."),
    model: str = typer.Option(None, "--model", help="Model directory or hub id: expert bytes from its headers."),
    resident: str = typer.Option(None, "--resident", help="Plan file whose resident experts stay pinned."),
    target: float = typer.Option(0.9, "--target", help="Hit rate for the cache size per layer."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Simulate only the first N logged tokens."),
    force_plan: bool = typer.Option(False, "--force-plan", help="With --model: use a --resident plan made for "
                                    "another config of the family anyway."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Expert offloading per layer: LRU, LFU and Belady hit rates, loads and bytes per token."""
    res = cache(trace, capacity=capacity, memory=memory, model=model, resident=resident, json=json_out,
                target=target, max_tokens=max_tokens, progress=not json_out, force_plan=force_plan)
    if json_out:
        emit_json(res)
    else:
        typer.echo(format_cache(res))


@app.command("import")
def import_cmd(
    files: list[str] = typer.Argument(..., help="Engine routing records (several files are read into one trace). "
                                      "sglang per_token: a forward pass several ranks recorded (same "
                                      "forward_pass_id and tokens) is counted once, ranks that disagree are refused; "
                                      "per_pass: the ranks' files are summed (their records hold no tokens), "
                                      "identical files once; stat: rank 0's all-reduced counts, as written."),
    format: str = typer.Option(..., "--format", help="vllm: responses of --enable-return-routed-experts (0.22+ "
                               "base64 .npy per choice, or 0.21 JSON lists; completion or chat-completion JSON, "
                               "JSONL, or offline routed_experts arrays saved as .npy). sglang: expert "
                               "distribution recorder dumps (.pt)."),
    out: str = typer.Option(..., "--out", help="Trace file to write."),
    model: str = typer.Option(None, "--model", help="Model directory or hub id the records were made with (MoE "
                              "layers, experts, top-k, hidden size; maps decoder-layer rows to MoE layers)."),
    n_experts: int = typer.Option(None, "--experts", help="Experts per layer (without --model)."),
    top_k: int = typer.Option(None, "--top-k", help="Experts per token (without --model)."),
    moe_layers: str = typer.Option(None, "--moe-layers", help="Comma-separated decoder layer ids of MoE layers."),
    label: str = typer.Option(None, "--label", help="Workload label."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Import vLLM or SGLang routing records into a moesift trace (merge several with `moesift merge`)."""
    t = import_trace(files, format, model=model, out=out, n_experts=n_experts, top_k=top_k, moe_layers=moe_layers,
                     label=label, force=force, json=json_out)
    info = import_summary(t, out, format)
    if json_out:
        emit_json(info)
    else:
        typer.echo(format_import(info))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    run_app(app)


if __name__ == "__main__":
    main()
