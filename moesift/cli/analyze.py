"""Commands that analyse traces: report, compare, place, cache."""

from __future__ import annotations

import typer

from ..analysis.cachesim import cache, format_cache
from ..selection.place import place, print_placement
from ..surfaces.report import compare, report
from .app import app, emit_json


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
