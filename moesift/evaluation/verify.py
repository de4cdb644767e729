"""Prove that a trimmed model computes what the full model computes under the same restriction."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..apply.offload import HOST_COMPUTE_MAX_TOKENS, load_offloaded
from ..apply.resident import load_trimmed
from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.io import CHECKSUMS, file_checksum
from ..core.values import check_int
from ..engines.choose import check_engine, open_engine, require
from ..engines.hf import hf_progress, resolve_device
from ..engines.mlx_native import check_mlx_model, is_mlx_model, open_mlx, quantization_note, restricted
from ..engines.restrict import restrict
from ..formats.checkpoint import CheckpointIndex, read_header
from ..formats.gguf import is_gguf, read_gguf_record
from ..formats.plan import Plan, as_plan, planned_offload
from ..formats.trimmed import PLAN_FILE, read_trimmed_record
from ..formats.workload import encode_prefix, read_documents
from ..selection.offload_budget import simulate_layer
from .verify_gguf import format_verify_gguf, verify_gguf


def _read_prompts(paths: list[str], field: str | None, max_samples: int, tok: Any, max_length: int) -> list[Any]:
    """Token id tensors [1, T] of the first `max_samples` documents of the workload files."""
    import torch

    out = []
    for d in read_documents(paths, field=field, max_samples=max_samples):
        if d.get("input_ids") is not None:
            ids = torch.as_tensor([list(d["input_ids"])[:max_length]], dtype=torch.long)
        elif tok is None:
            raise MoesiftError("the model has no tokenizer; give --data with input_ids, or no --data (random tokens)")
        elif d.get("messages") is not None:
            ids = tok.apply_chat_template(d["messages"], tokenize=True, return_tensors="pt")
            ids = (ids["input_ids"] if hasattr(ids, "keys") else ids)[:, :max_length]
        else:
            ids = torch.as_tensor([encode_prefix(tok, str(d.get("text", "")), max_length)], dtype=torch.long)
        if ids.shape[-1]:
            out.append(ids)
    return out




class Agreement:
    """Running comparison of a reference model's logits and greedy generations with another model's."""

    def __init__(self, other: str) -> None:
        self.other = other  # the name the other side has in a mismatch record
        self.agree = self.total = 0
        self.max_abs = self.max_rel = 0.0
        self.mismatches: list[dict[str, Any]] = []

    def add(self, i: int, ref_logits: Any, logits: Any, ref_tokens: list[int], tokens: list[int]) -> None:
        self.agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        self.total += ref_logits.shape[1]
        d = (ref_logits - logits).abs().max().item()
        self.max_abs = max(self.max_abs, d)
        self.max_rel = max(self.max_rel, d / max(ref_logits.abs().max().item(), 1e-30))
        if ref_tokens != tokens:
            self.mismatches.append({"prompt": i, "full": ref_tokens, self.other: tokens})

    def result(self) -> dict[str, Any]:
        return {"tokens": self.total, "top1_agreement": self.agree / self.total if self.total else 1.0,
                "max_abs_logit_diff": self.max_abs, "max_rel_logit_diff": self.max_rel,
                "generations_identical": not self.mismatches, "generation_mismatches": self.mismatches[:4]}

def prompt_inputs(vocab: int | None, tok: Any, data: Any, field: str | None, max_samples: int, max_length: int,
                  seed: int) -> tuple[list[Any], dict[str, Any]]:
    """The prompts two models are compared on, token id tensors [1, T] (from `data`, or deterministic random
    token sequences below `vocab`), and what they are (for the result)."""
    import torch

    if data is not None:
        paths = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(x) for x in data]
        prompts = _read_prompts(paths, field, max_samples, tok, max_length)
        if not prompts:
            raise MoesiftError(f"no prompts found in {', '.join(paths)}")
        return prompts, {"kind": "files", "paths": paths, "prompts": len(prompts)}
    g = torch.Generator().manual_seed(seed)
    hi = max(8, min(max_length, 32))
    lengths = torch.randint(8, hi + 1, (max_samples,), generator=g).tolist()
    prompts = [torch.randint(0, int(vocab or 0), (1, n), generator=g) for n in lengths]
    return prompts, {"kind": "random", "note": f"no --data given: {len(prompts)} deterministic random token "
                                               f"sequences (seed {seed})", "prompts": len(prompts)}


def comparison_inputs(full: Any, tok: Any, data: Any, field: str | None, max_samples: int, max_length: int,
                      seed: int, max_new_tokens: int) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The prompts two models are compared on (from `data`, or deterministic random token sequences), what
    they are (for the result), and the greedy-generation arguments for `full.generate`."""
    vocab = None
    if data is None:
        vocab = int(full.config.get_text_config().vocab_size if hasattr(full.config, "get_text_config")
                    else full.config.vocab_size)
    prompts, source = prompt_inputs(vocab, tok, data, field, max_samples, max_length, seed)
    pad = getattr(full.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(full.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gen_kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad,
              "min_new_tokens": max_new_tokens}
    return prompts, source, gen_kw


def _trimmed_plan(trimmed: Any, plan: Any) -> Any:
    """The plan to restrict the full model to: `plan`, or the one recorded in the trimmed checkpoint."""
    if plan is not None:
        return as_plan(plan)
    record = read_trimmed_record(trimmed) if Path(trimmed).is_dir() else None
    if record is None:
        raise MoesiftError(f"{str(trimmed)!r} has no moesift_plan.json; pass --plan PLAN")
    return Plan.from_dict(record["plan"], source=str(Path(trimmed) / "moesift_plan.json"))


def _engine_dtype(engine: str, dtype: str | None, trimmed: Any) -> str | None:
    """The dtype both sides run in; an engine other than transformers compares in float32 and reads a
    trimmed checkpoint directory it supports."""
    if engine == "transformers":
        return dtype
    if dtype not in (None, "float32"):
        raise MoesiftError(f"--engine {engine} compares in float32; drop --dtype {dtype}")
    if not Path(trimmed).is_dir():
        raise MoesiftError(f"{str(trimmed)!r} is not a directory; --engine {engine} reads a trimmed checkpoint directory")
    check_engine(engine, trimmed, read_trimmed_record(trimmed))
    return "float32"


def _compare(full: Any, small: Any, runner: Any, p: Any, prompts: list[Any], gen_kw: dict[str, Any],
             max_new_tokens: int, force_plan: bool) -> Agreement:
    """The full model restricted to `p` against the trimmed model (`small`, or the engine `runner`) on
    every prompt: logits of every position and greedy generations."""
    import torch

    dev = next(full.parameters()).device
    cmp = Agreement("trimmed")
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            ids = ids.to(dev)
            with restrict(full, p, force_plan=force_plan):
                lf = full(ids).logits.float()
                if runner is not None:
                    gf = _greedy(full, ids, max_new_tokens)
                else:
                    gf = full.generate(ids, **gen_kw)[0, ids.shape[-1]:].tolist() if max_new_tokens > 0 else []
            if runner is not None:
                seq = ids[0].tolist()
                logits, gs = runner.run(seq, max(0, max_new_tokens))
                ls = torch.from_numpy(logits).float().unsqueeze(0).to(lf.device)
                if ls.shape != lf.shape:
                    raise MoesiftError(f"{runner.name} gave logits of shape {tuple(ls.shape[1:])}, the full model "
                                       f"{tuple(lf.shape[1:])}; the trimmed checkpoint does not match the model")
            else:
                ls = small(ids.to(next(small.parameters()).device)).logits.float().to(lf.device)
                gs = small.generate(ids, **gen_kw)[0, ids.shape[-1]:].tolist() if max_new_tokens > 0 else []
            cmp.add(i, lf, ls, gf, gs)
    return cmp


def verify(
    model: str | os.PathLike,
    trimmed: str | os.PathLike | None = None,
    plan: Any = None,
    data: str | os.PathLike | list[str] | None = None,
    max_new_tokens: int = 16,
    max_samples: int = 8,
    max_length: int = 64,
    field: str | None = None,
    device: str = "auto",
    dtype: str | None = "float32",
    seed: int = 0,
    progress: bool = True,
    offloaded: Any = None,
    cache_slots: int | None = None,
    policy: str = "lru",
    host_compute_max_tokens: int | None = None,
    force_plan: bool = False,
    engine: str = "transformers",
    hf_model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the full model restricted to `plan` and the trimmed model on held-out prompts; report top-1
    agreement over every prompt position, max absolute and relative logit differences, and whether greedy
    generations of `max_new_tokens` tokens are identical. `plan` defaults to the one recorded in `trimmed`;
    a plan made for another config than `model`'s is refused unless `force_plan`.
    Without `data`, a deterministic set of random token sequences is used (said in the result).

    Both models run in float32 by default: the check is that they compute the same function. In bfloat16,
    router probabilities tie often (8 bits of mantissa), and torch.topk may break a tie differently over E
    experts and over the resident experts alone: the two models then pick different (equally weighted)
    experts for that token, which is not a trimming error.

    With `offloaded` (a plan) and no `trimmed`: the full model against `moesift.load_offloaded(model,
    offloaded, ...)` instead (`moesift.offload.verify_offloaded`).
    `engine`: what runs the trimmed checkpoint. "transformers" (default) loads it like the full model;
    "mlx" loads it with mlx-lm and "llama.cpp" converts it to an F32 GGUF file with llama.cpp's own converter
    and runs it with llama-cpp-python, both in float32 on the CPU (extras `moesift[mlx]`, `moesift[gguf]`).
    Engines need a standard (uniform) trim. With an engine, greedy generations on both sides are plain
    argmax decoding of `max_new_tokens` tokens (end-of-sequence not special), each with its own KV cache.
    When `model` and `trimmed` are mlx-lm model folders (quantized MLX checkpoints and their trims), both run
    in mlx-lm (`verify_mlx`), whatever `engine` says but llama.cpp.
    When `model` and `trimmed` are GGUF files, the trim is checked on the files themselves, link by link
    (`verify_gguf`; `hf_model`: the transformers checkpoint they were converted from, for the converter link)."""
    if _gguf_pair(model, trimmed, engine):
        return verify_gguf(model, trimmed, plan=plan, hf_model=hf_model, force_plan=force_plan, progress=progress)
    device = resolve_device(device)
    max_new_tokens = check_int("--max-new-tokens", max_new_tokens, 1)
    max_samples = check_int("--max-samples", max_samples, 1)
    if offloaded is not None:
        if trimmed is not None:
            raise MoesiftError("give either a TRIMMED checkpoint or --offloaded PLAN, not both")
        return verify_offloaded(model, offloaded, data=data, max_new_tokens=max_new_tokens, max_samples=max_samples,
                                max_length=max_length, field=field, device=device, dtype=dtype,
                                cache_slots=cache_slots, policy=policy, seed=seed, progress=progress,
                                host_compute_max_tokens=HOST_COMPUTE_MAX_TOKENS if host_compute_max_tokens is None
                                else host_compute_max_tokens)
    if trimmed is None:
        raise MoesiftError("give the TRIMMED checkpoint to compare with (or --offloaded PLAN)")
    if _mlx_pair(model, trimmed, engine, dtype):
        return verify_mlx(model, trimmed, plan=plan, data=data, max_new_tokens=max_new_tokens,
                          max_samples=max_samples, max_length=max_length, field=field, seed=seed, force_plan=force_plan)
    if engine != "transformers":
        require(engine)  # a missing extra is said before anything is read
    p = _trimmed_plan(trimmed, plan)
    dtype = _engine_dtype(engine, dtype, trimmed)
    runner = work = small = None
    with hf_progress(progress):
        full, tok = load_trimmed(model, device=device, dtype=dtype)  # any checkpoint; no accelerate needed
        if engine == "transformers":
            small, tok2 = load_trimmed(trimmed, device=device, dtype=dtype)
            tok = tok or tok2
    try:
        prompts, source, gen_kw = comparison_inputs(full, tok, data, field, max_samples, max_length, seed,
                                                    max_new_tokens)
        if engine != "transformers":
            work = tempfile.TemporaryDirectory(prefix="moesift-verify-")
            longest = max(x.shape[-1] for x in prompts) + max(0, max_new_tokens)
            with hf_progress(progress):
                runner = open_engine(engine, trimmed, read_trimmed_record(trimmed), Path(work.name), longest)
    except BaseException:
        _close(runner, work)
        raise
    try:
        cmp = _compare(full, small, runner, p, prompts, gen_kw, max_new_tokens, force_plan)
    finally:
        engine_name = runner.name if runner is not None else "transformers"
        engine_notes = list(getattr(runner, "notes", []) or [])
        _close(runner, work)
    n_full = sum(x.numel() for x in full.parameters())
    n_small = (sum(x.numel() for x in small.parameters()) if runner is None else _header_params(Path(trimmed)))
    result = {
        "model": str(model), "trimmed": str(trimmed), "engine": engine_name,
        "engine_notes": engine_notes,  # e.g. how llama.cpp's converter wrote the tokenizer
        "plan": p.source, "data": source, "prompts": len(prompts), **cmp.result(),
        "max_new_tokens": max_new_tokens, "params_full": n_full, "params_trimmed": n_small,
    }
    result["ok"] = result["top1_agreement"] >= 1.0 and result["generations_identical"]
    return result


def _gguf_pair(model: Any, trimmed: Any, engine: str) -> bool:
    """True when `model` and `trimmed` are GGUF files (checked on their bytes, `verify_gguf`); one error line
    when only one of them is, or when an engine is asked for."""
    if not (is_gguf(model) or (trimmed is not None and is_gguf(trimmed))):
        return False
    if not (is_gguf(model) and trimmed is not None and is_gguf(trimmed)):
        raise MoesiftError("verify compares a GGUF model with its own trim: moesift verify BASE.gguf TRIM.gguf")
    if engine != "transformers":
        raise MoesiftError("GGUF files are verified on their bytes, link by link; drop --engine")
    return True


def _mlx_pair(model: Any, trimmed: Any, engine: str, dtype: str | None) -> bool:
    """True when `model` and `trimmed` are mlx-lm model folders (compared in mlx-lm whatever `engine` says but
    llama.cpp); one error line when only one of them is, or when another engine or dtype is asked for."""
    base, small = is_mlx_model(model), is_mlx_model(trimmed)
    if not (base or small):
        return False
    if not (base and small):
        which, other = (model, trimmed) if base else (trimmed, model)
        raise MoesiftError(f"{str(which)!r} is an mlx-lm model folder and {str(other)!r} is not; verify compares an "
                           "mlx-lm model with its own trim (moesift trim MLX_MODEL --plan P --out OUT)")
    if engine not in ("transformers", "mlx"):
        raise MoesiftError(f"{str(model)!r} and {str(trimmed)!r} are mlx-lm model folders: verify them with "
                           f"--engine mlx, not {engine}")
    if dtype not in (None, "float32"):
        raise MoesiftError(f"mlx-lm model folders are compared in float32; drop --dtype {dtype}")
    return True


def _mlx_tokenizer(model: Any) -> Any:
    """The tokenizer stored in an mlx-lm model folder (transformers reads it), or None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model))
    except Exception:  # noqa: BLE001 - a folder without a readable tokenizer: prompts must be token ids
        return None


def verify_mlx(model: str | os.PathLike, trimmed: str | os.PathLike, plan: Any = None,
               data: str | os.PathLike | list[str] | None = None, max_new_tokens: int = 16, max_samples: int = 8,
               max_length: int = 64, field: str | None = None, seed: int = 0,
               force_plan: bool = False) -> dict[str, Any]:
    """An mlx-lm model folder (`model`, quantized or not) run in mlx-lm with its routing restricted to `plan`
    (default: the plan recorded in `trimmed`), against its trim `trimmed` run in mlx-lm: the same kernels on
    the same stored bytes, both in float32 (quantized weights stay as stored; scales and biases are widened).
    The result has the keys of `verify`; greedy generations are plain argmax decoding with mlx-lm's KV cache."""
    import torch

    require("mlx")
    base, small = CheckpointIndex.build(model), CheckpointIndex.build(trimmed)
    for idx in (base, small):
        idx.check_consistent()
        check_mlx_model(idx)
    p = _trimmed_plan(trimmed, plan)
    resident = p.resolve(base.spec, base.config, str(model), force_plan)
    vocab = base.config.get("vocab_size") or (base.config.get("text_config") or {}).get("vocab_size")
    prompts, source = prompt_inputs(vocab, _mlx_tokenizer(model) if data is not None else None, data, field,
                                    max_samples, max_length, seed)
    cmp = Agreement("trimmed")
    full = runner = None
    try:
        full, runner = open_mlx(base), open_mlx(small)
        for i, ids in enumerate(prompts):
            seq = ids[0].tolist()
            with restricted(full.model, base, resident):
                lf, gf = full.run(seq, max_new_tokens)
            ls, gs = runner.run(seq, max_new_tokens)
            if ls.shape != lf.shape:
                raise MoesiftError(f"{runner.name} gave logits of shape {ls.shape} for the trim, {lf.shape} for the "
                                   "full model; the trimmed model does not match the model")
            cmp.add(i, torch.from_numpy(lf).unsqueeze(0), torch.from_numpy(ls).unsqueeze(0), gf, gs)
        name = runner.name
    finally:
        _close(full, None)
        _close(runner, None)
    result = {
        "model": str(model), "trimmed": str(trimmed), "engine": name,
        "engine_notes": [f"both mlx-lm model folders run in mlx-lm ({quantization_note(base.config)}); the full "
                         "model's router logits of non-resident experts are -inf"],
        "plan": p.source, "data": source, "prompts": len(prompts), **cmp.result(), "max_new_tokens": max_new_tokens,
        "params_full": _header_params(Path(base.directory)), "params_trimmed": _header_params(Path(small.directory)),
    }
    result["ok"] = result["top1_agreement"] >= 1.0 and result["generations_identical"]
    return result


def _greedy(model: Any, ids: Any, n: int) -> list[int]:
    """Plain greedy decoding with the model's KV cache: n argmax tokens, end-of-sequence not special."""
    import torch

    # the KV cache argument is `cache` from transformers 5.24 on, `past_key_values` before
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    past = None
    x = ids
    for _ in range(n):
        o = model(x, **{key: past}, use_cache=True)
        past = o.get(key)
        tok = int(o.logits[0, -1].argmax())
        out.append(tok)
        x = torch.tensor([[tok]], dtype=ids.dtype, device=ids.device)
    return out


def _header_params(directory: Path) -> int:
    """Number of weights in a checkpoint's safetensors files, from their headers."""
    n = 0
    for f in sorted(directory.glob("*.safetensors")):
        header = read_header(f)[0]
        for name, t in header.items():
            if name != "__metadata__":
                k = 1
                for s in t["shape"]:
                    k *= int(s)
                n += k
    return n


def _close(runner: Any, work: Any) -> None:
    """Stop an engine runner and remove its temporary directory."""
    if runner is not None:
        runner.close()
    if work is not None:
        work.cleanup()


def verify_offloaded(
    model: str | os.PathLike,
    plan: Any,
    data: str | os.PathLike | list[str] | None = None,
    max_new_tokens: int = 16,
    max_samples: int = 8,
    max_length: int = 64,
    field: str | None = None,
    device: str = "auto",
    dtype: str | None = "float32",
    cache_slots: int | None = None,
    policy: str = "lru",
    host_compute_max_tokens: int = HOST_COMPUTE_MAX_TOKENS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The offloaded model against the FULL model (not restricted): top-1 agreement over every prompt
    position, max absolute / relative logit differences, identical greedy generations; and the measured
    hit rate per layer against `cachesim.simulate` on the full model's routing of the same calls."""
    device = resolve_device(device)
    max_new_tokens = check_int("--max-new-tokens", max_new_tokens, 1)
    max_samples = check_int("--max-samples", max_samples, 1)
    import torch

    off, tok2 = load_offloaded(model, plan, device=device, cache_slots=cache_slots, policy=policy,
                               host_compute_max_tokens=host_compute_max_tokens, dtype=dtype, progress=progress)
    with hf_progress(progress):
        full, tok = load_trimmed(model, device=device, dtype=dtype)
    tok = tok or tok2
    dev = next(full.parameters()).device
    prompts, source, gen_kw = comparison_inputs(full, tok, data, field, max_samples, max_length, seed, max_new_tokens)
    ad = adapter_for(full.config)
    logs: dict[int, list[Any]] = {}

    def on_route(mi: int, r: Any) -> None:
        logs.setdefault(mi, []).append(r.ids.reshape(-1, r.ids.shape[-1]).detach().to("cpu"))

    cmp = Agreement("offloaded")
    handles = ad.attach_recorder(full, on_route)
    try:
        with torch.no_grad():
            for i, ids in enumerate(prompts):
                ids = ids.to(dev)
                lf = full(ids).logits.float()
                gf = full.generate(ids, **gen_kw)[0, ids.shape[-1]:].tolist() if max_new_tokens > 0 else []
                lo = off(ids).logits.float()
                go = off.generate(ids, **gen_kw)[0, ids.shape[-1]:].tolist() if max_new_tokens > 0 else []
                cmp.add(i, lf, lo, gf, go)
    finally:
        for h in handles:
            h.remove()
    stats = off.moesift_offload.stats()
    sim_layers = []
    same = True
    for rt, st in zip(off.moesift_offload.layers, stats["layers"], strict=True):
        log = torch.cat(logs.get(rt.moe_index, [torch.empty(0, 1, dtype=torch.long)])).numpy().astype(np.int64)
        s = simulate_layer(log, rt.cache.capacity, policy, list(rt.pinned))
        same &= s["hits"] == st["hits"] and s["accesses"] == st["accesses"]
        sim_layers.append({"layer": rt.layer, "measured": st["hit_rate"], "simulated": s["hit_rate"],
                           "measured_hits": st["hits"], "simulated_hits": s["hits"], "accesses": st["accesses"]})
    result = {
        "model": str(model), "plan": stats["plan"], "data": source, "prompts": len(prompts), **cmp.result(),
        "max_new_tokens": max_new_tokens, "dtype": dtype, "cache_slots": stats["cache_slots"],
        "policy": policy, "hit_rate": stats["hit_rate"], "hit_rate_equals_simulation": same,
        "hit_rate_layers": sim_layers, "host_pairs": stats["host_pairs"], "loads": stats["loads"],
        "device_bytes": stats["device_bytes"],
    }

    pred = planned_offload(as_plan(plan))
    if pred is not None:  # the plan was made with --offload: its prediction beside the measured figure
        result["predicted"] = {k: pred.get(k) for k in ("hit_rate", "heldout_hit_rate", "cache_slots", "policy")}
    result["ok"] = (result["top1_agreement"] >= 1.0 and result["generations_identical"] and same
                    and (dtype not in ("float32", "fp32") or cmp.max_rel <= 1e-6))
    return result


def format_verify(r: dict[str, Any]) -> str:
    """What `moesift verify` prints of a `verify` result (trimmed, offloaded or GGUF)."""
    if "links" in r:
        return format_verify_gguf(r)
    lines = []
    if r["data"]["kind"] == "random":
        lines.append(r["data"]["note"])
    if r.get("engine", "transformers") != "transformers":
        lines.append(f"trimmed model run by {r['engine']}")
    lines.append(f"{r['prompts']} prompts, {r['tokens']} positions: top-1 agreement {r['top1_agreement']:.4f}, "
                 f"max |logit diff| {r['max_abs_logit_diff']:.3g} (relative {r['max_rel_logit_diff']:.3g}), "
                 f"greedy generations {'identical' if r['generations_identical'] else 'DIFFER'}")
    if "hit_rate_equals_simulation" not in r:
        lines.append("OK: the trimmed model matches the restricted full model" if r["ok"] else
                     "MISMATCH: the trimmed model does not match the restricted full model")
        return "\n".join(lines)
    lines.append(f"cache: {r['cache_slots']} {r['policy']} slots per layer, measured hit rate "
                 f"{r['hit_rate']:.4f}; equal to the cache simulation on the same routing: "
                 f"{'yes' if r['hit_rate_equals_simulation'] else 'NO'}")
    pr = r.get("predicted") or {}
    if pr.get("heldout_hit_rate") is not None:
        lines.append(f"the plan predicted {pr['heldout_hit_rate']:.4f} held out ({pr['cache_slots']} "
                     f"{pr['policy']} slots)")
    lines.append("OK: the offloaded model matches the full model" if r["ok"] else
                 "MISMATCH: the offloaded model does not match the full model")
    return "\n".join(lines)



def verify_files(trimmed: str | os.PathLike) -> dict[str, Any]:
    """Re-compute the checksum of every file a trim recorded in `trimmed`'s moesift_plan.json, with the
    recorded algorithm (records written before it was named hold sha256). Each file is "ok", "mismatch" or
    "missing"; `ok` when all are "ok". A folder without a record, or a trim made without checksums, is refused."""
    shown = str(trimmed)
    gguf = is_gguf(trimmed)
    rec = read_gguf_record(trimmed) if gguf else read_trimmed_record(trimmed)
    folder = Path(trimmed).parent if gguf else Path(trimmed)
    if rec is None and gguf:
        raise MoesiftError(f"{shown!r} has no record beside it (NAME.gguf.moesift.json): it was not written by "
                           "moesift trim")
    if rec is None:
        raise MoesiftError(f"{shown!r} has no {PLAN_FILE}: it is not a checkpoint written by moesift trim")
    algorithm = rec.get("checksum", "sha256")
    recorded = rec.get("files") or {}
    if algorithm is None or not any(recorded.values()):
        raise MoesiftError(f"{shown!r} was trimmed without checksums (--no-checksums): there is nothing to verify")
    if algorithm not in CHECKSUMS:
        raise MoesiftError(f"{shown!r} records checksums of an unknown algorithm {algorithm!r}")
    files = []
    for name, want in sorted(recorded.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            files.append({"file": name, "status": "missing", "expected": want, "actual": None})
            continue
        got = file_checksum(path, algorithm)
        files.append({"file": name, "status": "ok" if got == want else "mismatch", "expected": want, "actual": got})
    return {"trimmed": shown, "checksum": algorithm, "files": files,
            "ok": all(f["status"] == "ok" for f in files)}


def format_verify_files(r: dict[str, Any]) -> str:
    """What `moesift verify --files` prints of a `verify_files` result: one line per file, then the verdict."""
    lines = [f"{f['status'].upper() if f['status'] != 'ok' else 'ok':8} {f['file']}" for f in r["files"]]
    bad = [f["file"] for f in r["files"] if f["status"] != "ok"]
    n = len(r["files"])
    lines.append(f"OK: all {n} files of {r['trimmed']} match their recorded {r['checksum']}" if not bad else
                 f"MISMATCH: {len(bad)} of {n} files of {r['trimmed']} do not match their recorded "
                 f"{r['checksum']}: {', '.join(bad)}")
    return "\n".join(lines)
