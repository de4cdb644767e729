"""Commands that prove and measure: verify, eval, sweep, demo."""

from __future__ import annotations

import typer

from ..engines.hf import DEVICE_HELP
from ..evaluation.evaluate import eval_model, print_table
from ..evaluation.sweep import sweep
from ..evaluation.verify import format_verify, format_verify_files, verify, verify_files
from ..surfaces.demo import demo
from .app import app, emit_json, split_values


@app.command("verify")
def verify_cmd(
    model: str = typer.Argument(..., help="Full model directory or hub id, or a GGUF file."),
    trimmed: str = typer.Argument(None, help="Trimmed checkpoint directory, or the trimmed GGUF file (not with "
                                  "--offloaded)."),
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
    hf_model: str = typer.Option(None, "--hf-model", help="GGUF files: the transformers checkpoint BASE.gguf was "
                                 "converted from; also checks that trimming the GGUF equals converting the trimmed "
                                 "checkpoint (needs MOESIFT_LLAMA_CPP naming llama.cpp's converter)."),
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
                   host_compute_max_tokens=host_compute_max_tokens, force_plan=force_plan, engine=engine,
                   hf_model=hf_model)
    if json_out:
        emit_json(r)
    else:
        typer.echo(format_verify_files(r) if files else format_verify(r))
    if not r["ok"]:
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model directory, a hub id in the local Hugging Face cache, or a GGUF file."),
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
    engine: str = typer.Option("auto", "--engine", help="auto (mlx for an mlx-lm model folder, llama.cpp for a GGUF "
                               "file), transformers, mlx (full model, --plan, --top-k and --top-p in mlx-lm, float32, with tokens/s), or "
                               "llama.cpp (a GGUF file in llama-cpp-python: full file, --plan (trimmed here, or a "
                               "trimmed .gguf) and --top-k, with bytes and tokens/s; needs moesift\\[gguf])."),
    hf_model: str = typer.Option(None, "--hf-model", help="GGUF files: tokenize with this transformers "
                                 "checkpoint's tokenizer (default: the GGUF file's own)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Perplexity of the full model, restricted to plans, with fewer experts per token and with dynamic top-p
    routing, each with the mean number of experts active per token."""
    res = eval_model(model, data, plans=plan or (), top_k=split_values(top_k, int, "--top-k"),
                     top_p=split_values(top_p, float, "--top-p"), max_length=max_length, batch_size=batch_size,
                     device=device, dtype=dtype, json=json_out, progress=not json_out, max_samples=max_samples,
                     field=field, trust_remote_code=trust_remote_code, force_plan=force_plan, engine=engine,
                     hf_model=hf_model)
    if json_out:
        emit_json(res)
    else:
        print_table(res)


@app.command("sweep")
def sweep_cmd(
    model: str = typer.Argument(..., help="Model directory, or a hub id in the local Hugging Face cache."),
    trace: list[str] = typer.Option(..., "--trace", help="Trace(s) to plan from (PATH or PATH:WEIGHT); repeatable."),
    data: list[str] = typer.Option(..., "--data", help="Held-out text for perplexity; repeatable."),
    keep: str = typer.Option("0.25,0.5,0.75", "--keep", help="Fractions of experts kept per MoE layer."),
    strategy: str = typer.Option("auto", "--strategy",
                                 help="Selection strategies (see `plan --help`; auto chooses per budget on held-out "
                                 "folds of the calibration prompts); NAME+allocate spreads each budget over layers, "
                                 "e.g. calibrated+allocate."),
    calib: list[str] = typer.Option(None, "--calib", help="Calibration prompts for the calibrated and auto strategies "
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
    hf_model: str = typer.Option(None, "--hf-model", help="GGUF files: tokenize with this transformers "
                                 "checkpoint's tokenizer (default: the GGUF file's own)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    engine: str = typer.Option("auto", "--engine", help="auto (mlx for an mlx-lm model folder, llama.cpp for a GGUF "
                               "file), transformers, mlx (bytes of the MLX trim, perplexity and tokens/s in mlx-lm; no "
                               "resident timings), or llama.cpp (each plan, one count in every layer, trims the GGUF "
                               "file and runs in llama-cpp-python: bytes, perplexity, tokens/s)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Quality against memory and latency: for each strategy and budget, bytes, perplexity (x full), load time
    and time to first token of the resident model, with the Pareto front marked."""
    res = sweep(model, trace, data, keep=keep, strategy=strategy, json=json_out, out=out, max_length=max_length,
                batch_size=batch_size, max_samples=max_samples, field=field, device=device, dtype=dtype, seed=seed,
                uniform=uniform, timing=not no_timing, force=force, progress=not json_out, calib=calib or None,
                calibration=calibration, groups=groups, engine=engine, hf_model=hf_model)
    if json_out:
        emit_json(res)
    elif out:
        typer.echo(f"wrote {out}")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option(None, "--out", help="Output directory (default ./moesift-demo)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller run (fewer prompts and points), for tests."),
    engine: str = typer.Option("transformers", "--engine", help="transformers, or mlx: convert the Qwen3-MoE "
                               "reference model with mlx_lm.convert (4-bit) and run every stage in mlx-lm "
                               "(default --out ./moesift-demo-mlx)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """The whole pipeline on the bundled reference models and workloads: trace, report, compare, plan, trim,
    verify, evaluate and sweep; writes one HTML report."""
    res = demo(out=out, json=json_out, quick=quick, progress=not json_out, engine=engine)
    if json_out:
        emit_json(res)
