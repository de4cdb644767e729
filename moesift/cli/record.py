"""Commands that record and inspect traces: trace, show, merge, export, families, import."""

from __future__ import annotations

import typer

from ..arch import supported_model_types
from ..engines.hf import DEVICE_HELP
from ..record.importers import format_import, import_summary, import_trace
from ..record.tracer import (
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
from .app import app, emit_json


@app.command("trace")
def trace_cmd(
    model: str = typer.Argument(..., help="Model directory, a hub id in the local Hugging Face cache, an mlx-lm folder or a GGUF file."),
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
    engine: str = typer.Option("auto", "--engine", help="transformers, mlx (an mlx-lm model folder, run in "
                               "mlx-lm), llama.cpp (a GGUF file, run in llama-cpp-python: needs moesift\\[gguf]), or "
                               "auto (mlx for an mlx-lm model folder, llama.cpp for a GGUF file)."),
    hf_model: str = typer.Option(None, "--hf-model", help="GGUF files: the transformers checkpoint MODEL was "
                                 "converted from; its tokenizer tokenizes the workload and its config identifies "
                                 "the trace, so it merges and compares with transformers traces."),
) -> None:
    """Record which experts a workload selects, per MoE layer, with statistics kept on the device."""
    t = trace(model, data, out=out, label=label, max_samples=max_samples, max_length=max_length,
              batch_size=batch_size, generate=generate, folds=folds, saliency=saliency, log_routing=log_routing,
              device=device, dtype=dtype, field=field, trust_remote_code=trust_remote_code, force=force,
              progress=not json_out, engine=engine, hf_model=hf_model)
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
