"""Lossless residency: a plan's resident experts on the device, every other expert in host memory.

`load_offloaded(MODEL, plan, device="auto")` builds the model from the checkpoint headers, tensor by tensor
(nothing else is loaded first): the non-expert weights, the routers (whole: routing is never changed) and,
in every MoE layer, one device experts module holding the plan's resident experts and ``cache_slots``
cache slots; a second experts module per layer, in host memory (pinned when the device is
CUDA), holds every non-resident expert. The model computes what the full model computes.

Per MoE layer and forward, for the (token, expert) pairs the router chose:

- resident experts and experts already in a cache slot run on the device (hits);
- the cache is updated token by token, tokens in order, exactly as `moesift.cachesim` models it (demand
  paging: every miss is loaded into a slot, LRU or LFU victims among the slotted experts the current token
  does not use), so the measured hit rate of a run equals `cachesim.simulate` on the same routing;
- a missed expert is computed for this call where the rule says: **on the host** when at most
  ``host_compute_max_tokens`` tokens of the call are routed to it (decode: one token, one small matmul
  chain on the host; its copy into the slot does not hold the computation up), else **on the device** from
  its slot after the copy (prefill: many tokens per expert). An expert loaded and evicted again within one
  call (a prefill whose working set exceeds the slots) is computed on the host.

When a call runs experts in more than one place, each (token, expert) pair is computed as its own row (so
every expert computes exactly the tokens the full model gives it) and the pairs are summed the way the
family's experts module sums them (adapter `pair_reduction`), which keeps the logits equal to the full
model's, bit for bit where both run on the same kind of processor.

Without a GPU the same code runs with ``device="cpu"``: the device modules and the host pool are separate
host tensors, which is how the tests prove exactness on every family. The per-layer runtime (the cache
and the computation of the pairs) is `moesift.apply.offload_runtime`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.progress import progress_bar
from ..core.values import check_int
from ..engines.assemble import meta_model
from ..engines.hf import (
    config_like,
    config_obj,
    from_pretrained_checked,
    hf_progress,
    load_tokenizer,
    model_class,
    parse_dtype,
    resolve_device,
)
from ..engines.tensors import layout_sources, read_layout, read_sources
from ..formats.checkpoint import CheckpointIndex
from ..formats.plan import as_plan, planned_offload
from ..formats.trimmed import plan_layout
from ..selection.offload_budget import device_bytes
from .offload_runtime import POLICIES, OffloadLayer, OffloadState

HOST_COMPUTE_MAX_TOKENS = 4  # a missed expert with at most this many tokens in a call runs on the host
OFFLOAD_KINDS = ("cpu",)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _experts_variant_class(source_cfg: Mapping[str, Any], counts: Mapping[int, int]) -> tuple[Any, Any]:
    """(model class, config) of the family whose MoE layer `l` has an experts module for `counts[l]`
    experts; routers and everything else are built for the full model."""
    ad = adapter_for(source_cfg)
    spec = ad.spec(source_cfg)
    base_cfg = config_obj(dict(source_cfg))
    cls = model_class(base_cfg)
    per = {layer: n for layer, n in counts.items() if n != spec.n_experts}
    if not per:
        return cls, base_cfg

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        built: dict[int, Any] = {}
        for layer, n in per.items():
            if n not in built:
                d = ad.rewrite_config(dict(source_cfg), {m: list(range(n)) for m in spec.moe_layers})
                built[n] = cls(config_like(d, config))
            ad.replace_experts(self, layer, ad.experts(built[n], layer))
        built.clear()

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    return sub, base_cfg


def _check_options(offload: str, policy: str, prefetch: bool, host_compute_max_tokens: int) -> None:
    if offload not in OFFLOAD_KINDS:
        raise MoesiftError(f"unknown --offload {offload!r}; use one of {', '.join(OFFLOAD_KINDS)}")
    if policy not in POLICIES:
        raise MoesiftError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
    if prefetch:
        raise MoesiftError("prefetch is not available in this version; run without --prefetch")
    if int(host_compute_max_tokens) < 0:
        raise MoesiftError("host_compute_max_tokens must be >= 0")


class _Placement:
    """Where every expert of every MoE layer lives: `full` (resident ids), `nonres` (the others, in the host
    pool), `slots` (cache slots per layer), `dev_keep` / `host_keep` (experts of the device and host
    modules), and the cache slots asked for."""

    def __init__(self, idx: Any, p: Any, cache_slots: int | None):
        spec = idx.spec
        resident = p.resolve(spec)
        full = {layer: sorted(resident.get(layer, range(spec.n_experts))) for layer in spec.moe_layers}
        # routing is never changed, so any resident set can be served (no top-k or group rules)
        for layer, ids in full.items():
            if len(set(ids)) != len(ids):
                raise MoesiftError(f"plan {p.source or ''}: decoder layer {layer} names an expert twice")
        nonres = {layer: [e for e in range(spec.n_experts) if e not in set(ids)] for layer, ids in full.items()}
        most = max(len(v) for v in nonres.values())
        if cache_slots is None:
            planned = (planned_offload(p) or {}).get("cache_slots")
            cache_slots = min(int(planned) if planned is not None else 2 * spec.top_k, most)
        cache_slots = int(cache_slots)
        if cache_slots < 0 or cache_slots > most:
            raise MoesiftError(f"cache_slots {cache_slots} is larger than the {most} non-resident experts of any "
                               f"MoE layer under plan {p.source or ''}; use at most {most}")
        slots = {layer: min(cache_slots, len(nonres[layer])) for layer in spec.moe_layers}
        for layer in spec.moe_layers:
            need = min(spec.top_k, len(nonres[layer]))
            if 0 < slots[layer] < need:
                raise MoesiftError(f"cache_slots {cache_slots} is below the {need} non-resident experts one token "
                                   f"may need at once in decoder layer {layer}; use at least {need}")
        self.full, self.nonres, self.slots, self.cache_slots = full, nonres, slots, cache_slots
        # device experts: resident ids, then slots (filled with non-resident experts; they start empty)
        # (a layer with neither resident experts nor slots holds one unused expert: modules need one)
        self.dev_keep = {layer: sorted(full[layer] + nonres[layer][: slots[layer]]) or nonres[layer][:1]
                         for layer in spec.moe_layers}
        self.host_keep = {layer: nonres[layer] or full[layer][:1] for layer in spec.moe_layers}


def _build_models(idx: Any, where: _Placement, dev: Any, dtype: str | None, progress: bool) -> tuple[Any, Any]:
    """(device model, host model): one module set at a time: tensors without experts (read once), then the
    device experts, model built and moved to the device, then the host pool (built beside the same
    non-expert tensors; only its experts modules are kept)."""
    kw = {"dtype": parse_dtype(dtype)}

    def is_expert(t: Any) -> bool:
        return t.role is not None and t.role.kind == "expert"

    with progress_bar(progress, transfer=True) as bar:
        task = bar.add_task("reading experts", total=idx.total_bytes())  # every byte once (slots: twice)

        def step(n: int) -> None:
            bar.advance(task, n)

        def read(layout: Sequence[Any], model: Any = None, shared: dict[str, Any] | None = None) -> dict[str, Any]:
            specs, ready = layout_sources(idx, layout, step)
            return read_sources(idx.directory, specs, ready, "cpu", model, step, before=shared)

        shared = read_layout(idx, [t for t in plan_layout(idx, {}) if not is_expert(t)], "cpu", advance=step)
        with hf_progress(progress):
            cls, cfg = _experts_variant_class(idx.config, {layer: len(v) for layer, v in where.dev_keep.items()})
            state = read([t for t in plan_layout(idx, where.dev_keep) if is_expert(t)], meta_model(cls, cfg), shared)
            m = from_pretrained_checked(cls, None, idx.directory, config=cfg, state_dict=state, **kw)
            del state
            m.eval()
            if dev.type != "cpu":
                m.to(dev)
            hcls, hcfg = _experts_variant_class(idx.config, {layer: len(v) for layer, v in where.host_keep.items()})
            state = read([t for t in plan_layout(idx, where.host_keep) if is_expert(t)], meta_model(hcls, hcfg),
                         shared)
            hm = from_pretrained_checked(hcls, None, idx.directory, config=hcfg, state_dict=state, **kw)
        del shared, state
    return m, hm


def _attach_layers(m: Any, hm: Any, idx: Any, where: _Placement, dev: Any, policy: str,
                   threshold: int) -> list[OffloadLayer]:
    """One `OffloadLayer` per MoE layer, installed as the layer's experts computation (host pool pinned on CUDA;
    one side stream for the slot copies)."""
    import torch

    ad = idx.adapter
    layers: list[OffloadLayer] = []
    copy_stream: Any = None
    for mi, layer in enumerate(idx.spec.moe_layers):
        nonres = where.nonres[layer]
        hmod = ad.experts(hm, layer) if nonres else None
        if hmod is not None:
            hmod.eval()
            if dev.type == "cuda":
                with torch.no_grad():
                    for prm in hmod.parameters():
                        prm.data = prm.data.pin_memory()
        ids = where.dev_keep[layer]
        rt = OffloadLayer(ad, mi, layer, ad.experts(m, layer), hmod, {e: ids.index(e) for e in where.full[layer]},
                    [ids.index(e) for e in nonres[: where.slots[layer]]], nonres, policy, threshold)
        if dev.type == "cuda":
            copy_stream = copy_stream if mi else torch.cuda.Stream(device=dev)
            rt.stream = copy_stream
        layers.append(rt)
        ad.offload_experts(m, layer, rt.run)
    return layers


def load_offloaded(
    model: str | os.PathLike,
    plan: Any,
    device: str = "auto",
    offload: str = "cpu",
    cache_slots: int | None = None,
    policy: str = "lru",
    host_compute_max_tokens: int = HOST_COMPUTE_MAX_TOKENS,
    prefetch: bool = False,
    dtype: str | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """(model, tokenizer or None): `plan`'s resident experts and the non-expert weights on `device`, every
    other expert in host memory (pinned when `device` is CUDA), `cache_slots` device slots per MoE layer
    (default: the plan's own when made with `--offload`, else 2 x top-k; at most the layer's non-resident
    experts; 0: no cache, every miss is computed on the host, like llama.cpp's --cpu-moe for the layers with
    no resident expert) managed by `policy` ("lru" | "lfu").
    Outputs equal the full model's. A missed expert routed by at most `host_compute_max_tokens` tokens of a
    call is computed on the host, else copied into its slot and computed on the device.
    ``model.moesift_offload.stats()`` gives the measured hit rate per layer."""
    device = resolve_device(device)
    import torch

    _check_options(offload, policy, prefetch, host_compute_max_tokens)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoesiftError(f"--device {device}: no CUDA device is available here; use --device cpu")
    idx = CheckpointIndex.build(model)
    idx.check_consistent()
    p = as_plan(plan)
    where = _Placement(idx, p, cache_slots)
    m, hm = _build_models(idx, where, dev, dtype, progress)
    layers = _attach_layers(m, hm, idx, where, dev, policy, int(host_compute_max_tokens))
    del hm
    info = {"model": str(model), "plan": p.source, "device": str(dev), "offload": offload, "policy": policy,
            "cache_slots": where.cache_slots, "host_compute_max_tokens": int(host_compute_max_tokens),
            "device_bytes": device_bytes(idx, where.full, where.slots)}
    m.moesift_offload = OffloadState(layers, info)
    m.moesift_resident = {int(k): list(v) for k, v in where.full.items()}
    return m, load_tokenizer(idx.directory)


# ------------------------------------------------------------------------------------------------
# generation and proof
# ------------------------------------------------------------------------------------------------


class _Clock:
    """A transformers streamer that timestamps the prompt and every generated token (optionally printing
    the text as it comes)."""

    def __init__(self, tok: Any = None, echo: Any = None):
        self.tok, self.echo = tok, echo
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._printed = ""

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            return  # the prompt
        self.tokens += [int(x) for x in value.reshape(-1).tolist()]
        if self.echo is not None and self.tok is not None:
            text = self.tok.decode(self.tokens, skip_special_tokens=True)
            self.echo(text[len(self._printed):])
            self._printed = text

    def end(self) -> None:
        pass


def generate(
    model: str | os.PathLike,
    plan: Any,
    prompt: str | None = None,
    device: str = "auto",
    offload: str = "cpu",
    cache_slots: int | None = None,
    policy: str = "lru",
    host_compute_max_tokens: int = HOST_COMPUTE_MAX_TOKENS,
    max_new_tokens: int = 64,
    dtype: str | None = None,
    echo: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy generation with `load_offloaded(model, plan, ...)`: the generated text, prefill and decode
    tokens/s, the measured hit rate overall and per MoE layer and, when the plan was made with
    `--offload`, the hit rate it predicted. `echo(text)` receives the text as it is generated."""
    max_new_tokens = check_int("--max-new-tokens", max_new_tokens, 1)
    device = resolve_device(device)
    import torch

    m, tok = load_offloaded(model, plan, device=device, offload=offload, cache_slots=cache_slots, policy=policy,
                            host_compute_max_tokens=host_compute_max_tokens, dtype=dtype, progress=progress)
    if tok is None:
        raise MoesiftError(f"{str(model)!r} has no tokenizer; moesift generate needs one to read --prompt")
    if prompt is None or not str(prompt).strip():
        raise MoesiftError("give a non-empty --prompt")
    dev = next(m.parameters()).device
    ids = tok(str(prompt), return_tensors="pt")["input_ids"].to(dev)
    if ids.shape[-1] == 0:
        raise MoesiftError(f"--prompt {str(prompt)[:40]!r} encodes to no tokens with this model's tokenizer")
    clock = _Clock(tok, echo)
    pad = getattr(m.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(m.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=int(max_new_tokens), do_sample=False, pad_token_id=pad,
                         streamer=clock)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    new = out[0, ids.shape[-1]:].tolist()
    times = clock.times
    prefill_s = (times[1] - t0) if len(times) > 1 else t1 - t0
    decode_s = (times[-1] - times[1]) if len(times) > 2 else 0.0
    stats = m.moesift_offload.stats()
    res = {
        "model": str(model), "device": str(dev), "plan": stats["plan"], "prompt_tokens": int(ids.shape[-1]),
        "new_tokens": len(new),
        "text": tok.decode(new, skip_special_tokens=True), "token_ids": new,
        "prefill_s": prefill_s, "prefill_tokens_per_s": ids.shape[-1] / prefill_s if prefill_s > 0 else None,
        "decode_s": decode_s, "decode_tokens_per_s": (len(new) - 1) / decode_s if decode_s > 0 else None,
        "tokens_per_s": len(new) / (t1 - t0) if t1 > t0 else None, "offload": stats,
        "predicted": planned_offload(as_plan(plan)),
    }
    return res


def print_stream(text: str) -> None:
    """Write generated text to stdout as it comes (the `echo` of `generate` for a terminal)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def format_generate(r: dict[str, Any]) -> str:
    """What `moesift generate` prints after the streamed text: tokens/s, the measured hit rate (beside the
    plan's prediction) and the hit rate per MoE layer."""
    o = r["offload"]
    dec = r["decode_tokens_per_s"]
    pre = r["prefill_tokens_per_s"]
    speed = (f"{r['new_tokens']} tokens: decode {dec:.2f} tokens/s" if dec else f"{r['new_tokens']} tokens") + (
        f", prefill {pre:.1f} tokens/s ({r['prompt_tokens']} prompt tokens)" if pre else "")
    pred = r.get("predicted") or {}
    ph = pred.get("heldout_hit_rate")
    hits = (f"hit rate {o['hit_rate']:.4f} measured ({o['cache_slots']} {o['policy']} slots per layer, "
            f"{o['loads']} expert loads, {o['host_pairs']} token-expert pairs computed on the host)"
            + (f"; the plan predicted {ph:.4f} held out ({pred.get('cache_slots')} {pred.get('policy')} slots, "
               f"over its whole trace, so with fewer cold misses)" if ph is not None else ""))
    layers = [f"  layer {e['layer']:>3}: hit rate {e['hit_rate']:.4f}  ({e['hits']}/{e['accesses']}, "
              f"{e['loads']} loads)" for e in o["layers"]]
    return "\n".join(["", speed, hits, *layers])

