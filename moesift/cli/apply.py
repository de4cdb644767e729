"""Commands that apply a plan: trim, generate."""

from __future__ import annotations

import typer

from ..apply.offload import format_generate, generate, print_stream
from ..apply.trim import format_trim, trim, trim_summary
from ..engines.hf import DEVICE_HELP
from .app import app, emit_json


@app.command("trim")
def trim_cmd(
    model: str = typer.Argument(..., help="Source model directory or hub id (safetensors), or a "
                               "GGUF file (MODEL.gguf, or the first split of a split model)."),
    plan: str = typer.Option(..., "--plan", help="Plan file (moesift-plan/1 or resident-manifest/1)."),
    out: str = typer.Option(..., "--out", "-o", help="Directory of the trimmed checkpoint (for a GGUF "
                             "model: the GGUF file, split like the source)."),
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
