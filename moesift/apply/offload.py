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
host tensors, which is how the tests prove exactness on every family.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..engines.hf import (
    TORCH_DTYPES,
    config_like,
    config_obj,
    hf_progress,
    model_class,
    parse_dtype,
    resolve_device,
)
from ..formats.checkpoint import CheckpointIndex
from ..formats.plan import as_plan, planned_offload
from ..formats.trimmed import plan_layout, sliced_bytes
from ..selection.offload_budget import device_bytes

HOST_COMPUTE_MAX_TOKENS = 4  # a missed expert with at most this many tokens in a call runs on the host
POLICIES = ("lru", "lfu")
OFFLOAD_KINDS = ("cpu",)


class ExpertCache:
    """Online cache of one MoE layer (the cache model of `moesift.cachesim`, one token at a time).

    ``occupant[s]`` is the expert whose weights slot s holds (None: empty); the cache starts empty."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise MoesiftError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.capacity = int(capacity)
        self.policy = policy
        self.occupant: list[int | None] = [None] * self.capacity
        self.slot_of: dict[int, int] = {}
        self.recency: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.clock = 0
        self.hits = self.accesses = self.loads = 0

    def token(self, row: Sequence[int]) -> None:
        """Access the distinct non-pinned experts `row` of one token (column order)."""
        miss = [e for e in row if e not in self.slot_of]
        self.accesses += len(row)
        self.hits += len(row) - len(miss)
        if self.capacity == 0:  # no cache: every miss is computed on the host, nothing is loaded
            return
        self.loads += len(miss)
        over = len(self.slot_of) + len(miss) - self.capacity
        if over > 0:
            cur = set(row)
            if self.policy == "lru":
                victims = [e for e in self.recency if e not in cur][:over]
            else:
                victims = sorted((e for e in self.slot_of if e not in cur),
                                 key=lambda e: (self.freq[e], self.last[e]))[:over]
            if len(victims) < over:
                raise MoesiftError(f"a token needs {len(row)} non-resident experts at once; the cache has "
                                   f"{self.capacity} slots (raise cache_slots)")
            for v in victims:
                self.occupant[self.slot_of.pop(v)] = None
                del self.recency[v]
        for e in row:
            if e not in self.slot_of:
                s = self.occupant.index(None)
                self.occupant[s] = e
                self.slot_of[e] = s
            self.recency[e] = None
            self.recency.move_to_end(e)
            self.freq[e] = self.freq.get(e, 0) + 1
            self.last[e] = self.clock
            self.clock += 1


class _Layer:
    """Runtime of one MoE layer: resident experts + slots on the device, the rest in the host pool."""

    def __init__(self, adapter: Any, moe_index: int, layer: int, dev_module: Any, host_module: Any,
                 pinned: dict[int, int], slot_index: list[int], nonresident: list[int], policy: str,
                 threshold: int):
        """`pinned`: resident expert -> its index in `dev_module`; `slot_index[s]`: index of cache slot s in
        `dev_module`; `nonresident`: the experts of `host_module`, in its order."""
        self.ad, self.moe_index, self.layer = adapter, moe_index, layer
        self.dev, self.host = dev_module, host_module
        self.pinned, self.slot_index, self.nonresident = pinned, slot_index, nonresident
        self.host_local = {e: i for i, e in enumerate(nonresident)}
        self.cache = ExpertCache(len(slot_index), policy)
        self.threshold = threshold
        self.dev_params = adapter.expert_params(dev_module)
        self.host_params = adapter.expert_params(host_module) if host_module is not None else []
        self.pinned_hits = self.pinned_accesses = 0
        self.host_pairs = self.device_pairs = self.copies = 0
        self.copy_bytes = 0
        self.lut: Any = None
        self.stream: Any = None  # CUDA: side stream for slot copies the current call does not wait for
        self.ready: Any = None
        self.pending: list[int] = []  # accesses of fully resident layers (top-k ids of a token are distinct)

    def copy_in(self, expert: int, slot: int) -> None:
        import torch

        j = self.host_local[expert]
        i = self.slot_index[slot]
        with torch.no_grad():
            for (dname, ddim, dblock), (hname, _, hblock) in zip(self.dev_params, self.host_params, strict=True):
                dst = _param(self.dev, dname)
                src = _param(self.host, hname)
                d = dst.narrow(ddim, i * dblock, dblock)
                d.copy_(src.narrow(ddim, j * hblock, hblock), non_blocking=True)
                self.copy_bytes += d.numel() * d.element_size()
        self.copies += 1

    def run(self, hidden: Any, ids: Any, weights: Any) -> Any:
        """Sum over the chosen (token, expert) pairs of the family's expert contribution: [T, H]."""
        import torch

        if not self.nonresident:  # every expert resident: renumber on the device, no host round trip
            if self.lut is None or self.lut.device != ids.device:
                lut = torch.full((max(self.pinned) + 1,), -1, dtype=torch.long)
                for e, i in self.pinned.items():
                    lut[e] = i
                self.lut = lut.to(ids.device)
            self.pending.append(ids.numel())
            return self.ad.experts_apply(self.dev, hidden, self.lut[ids], weights)
        if self.ready is not None:  # slot copies queued at this layer's previous call
            torch.cuda.current_stream(hidden.device).wait_event(self.ready)
            self.ready = None
        idl = ids.tolist()
        rows: list[list[int]] = []
        counts: dict[int, int] = {}
        for r in idl:
            seen: list[int] = []
            for e in r:
                if e >= 0 and e not in seen:
                    seen.append(e)
            np_row = [e for e in seen if e not in self.pinned]
            self.pinned_accesses += len(seen)
            self.pinned_hits += len(seen) - len(np_row)
            for e in np_row:
                counts[e] = counts.get(e, 0) + 1
            rows.append(np_row)
        if not counts:  # every expert of the call is resident: one device call, ids renumbered
            local = [[self.pinned.get(e, -1) for e in r] for r in idl]
            self.device_pairs += sum(len(r) for r in idl)
            return self._apply(self.dev, hidden, local, weights)
        start = list(self.cache.occupant)
        for r in rows:
            self.cache.token(r)
        end = self.cache.occupant
        slot_start = {e: s for s, e in enumerate(start) if e is not None}
        slot_end = {e: s for s, e in enumerate(end) if e is not None}
        si = self.slot_index
        # experts already slotted whose slot changes in this call: compute them before their slot is reused
        early = {e: si[slot_start[e]] for e in counts if e in slot_start and slot_end.get(e) != slot_start[e]}
        kept = {e: si[slot_end[e]] for e in counts if e in slot_start and slot_end.get(e) == slot_start[e]}
        new_dev = {e: si[slot_end[e]] for e in counts
                   if e not in slot_start and e in slot_end and counts[e] > self.threshold}
        on_host = [e for e in counts if e not in early and e not in kept and e not in new_dev]
        # demand paging: the cache's new occupants are copied in; those computed from their slot in this call
        # first, the others after the device computation is queued (on CUDA on a side stream, waited for at
        # this layer's next call), so the host computation does not wait for their transfer
        changed = [(s, e) for s, e in enumerate(end) if e is not None and start[s] != e]
        dev_map = dict(self.pinned)
        dev_map.update(kept)
        dev_map.update(new_dev)
        if not early and not on_host:  # everything on the device: one call, as the full model runs it
            for s, e in changed:
                self.copy_in(e, s)
            local = [[dev_map.get(e, -1) for e in r] for r in idl]
            self.device_pairs += sum(1 for r in local for x in r if x >= 0)
            return self._apply(self.dev, hidden, local, weights)
        # otherwise each (token, expert) pair's contribution is computed where its expert is (one call per
        # place, every pair its own row) and the pairs are summed as the experts module sums them
        pos: dict[int, tuple[list[int], list[int]]] = {}
        for t, r in enumerate(idl):
            for k, e in enumerate(r):
                if e >= 0:
                    tk = pos.setdefault(e, ([], []))
                    tk[0].append(t)
                    tk[1].append(k)
        parts: list[tuple[list[int], list[int], Any]] = []
        if early:  # before their slots are reused
            parts.append(self._pairs(self.dev, hidden, weights, {e: early[e] for e in early if e in pos}, pos))
        for s, e in changed:
            if e in new_dev:
                self.copy_in(e, s)
        dev_now = {e: i for e, i in dev_map.items() if e in pos and e not in early}
        if dev_now:
            parts.append(self._pairs(self.dev, hidden, weights, dev_now, pos))
        self.device_pairs += sum(len(p[0]) for p in parts)
        later = [(s, e) for s, e in changed if e not in new_dev]
        if later:
            if self.stream is None:
                for s, e in later:
                    self.copy_in(e, s)
            else:
                self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
                with torch.cuda.stream(self.stream):
                    for s, e in later:
                        self.copy_in(e, s)
                    self.ready = torch.cuda.Event()
                    self.ready.record(self.stream)
        if on_host:
            hdev = _host_device(self.host)
            ts, ks, c = self._pairs(self.host, hidden.to(hdev), weights.to(hdev),
                                    {e: self.host_local[e] for e in on_host}, pos)
            parts.append((ts, ks, c.to(device=hidden.device, non_blocking=True)))
            self.host_pairs += len(ts)
        T, K, H = hidden.shape[0], weights.shape[1], hidden.shape[1]
        pairs = torch.zeros((T, K, H), dtype=hidden.dtype, device=hidden.device)
        for ts, ks, c in parts:
            pairs[torch.as_tensor(ts, device=hidden.device), torch.as_tensor(ks, device=hidden.device)] = \
                c.to(pairs.dtype)
        if self.ad.pair_reduction(self.dev) == "k_sum":  # grouped / batched mm: rows summed over k
            return pairs.sum(dim=1).to(hidden.dtype)
        out = torch.zeros_like(hidden)  # an expert loop from zeros, in expert-id order
        for e in sorted(pos):
            ts, ks = pos[e]
            t = torch.as_tensor(ts, device=hidden.device)
            out.index_add_(0, t, pairs[t, torch.as_tensor(ks, device=hidden.device)])
        return out

    def _pairs(self, module: Any, hidden: Any, weights: Any, local: Mapping[int, int],
               pos: Mapping[int, tuple[list[int], list[int]]]) -> tuple[list[int], list[int], Any]:
        """(tokens, slots k, contributions [P, H]) of the pairs of the experts `local` ({expert: index in
        `module`}), in one call of `module`: each pair is a row with one expert, so each expert computes
        exactly the tokens the full model gives it, and the rows come back unsummed."""
        import torch

        ts: list[int] = []
        ks: list[int] = []
        ids: list[int] = []
        for e, i in local.items():
            ts += pos[e][0]
            ks += pos[e][1]
            ids += [i] * len(pos[e][0])
        t = torch.as_tensor(ts, device=hidden.device)
        k = torch.as_tensor(ks, device=hidden.device)
        loc = torch.as_tensor(ids, dtype=torch.long, device=hidden.device)[:, None]
        return ts, ks, self.ad.experts_apply(module, hidden[t], loc, weights[t, k][:, None])

    def _apply(self, module: Any, hidden: Any, local: list[list[int]], weights: Any) -> Any:
        import torch

        loc = torch.as_tensor(local, dtype=torch.long, device=hidden.device).reshape(weights.shape)
        return self.ad.experts_apply(module, hidden, loc, weights)

    def stats(self) -> dict[str, Any]:
        if self.pending:
            n = sum(self.pending)
            self.pinned_hits += n
            self.pinned_accesses += n
            self.pending.clear()
        c = self.cache
        hits, acc = c.hits + self.pinned_hits, self.pinned_accesses
        return {"moe_index": self.moe_index, "layer": self.layer, "resident": len(self.pinned),
                "slots": c.capacity, "policy": c.policy, "accesses": acc, "hits": hits, "loads": c.loads,
                "hit_rate": hits / acc if acc else float("nan"), "device_pairs": self.device_pairs,
                "host_pairs": self.host_pairs, "copy_bytes": self.copy_bytes}


def _param(module: Any, name: str) -> Any:
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _host_device(module: Any) -> Any:
    return next(iter(module.parameters())).device


class OffloadState:
    """What `load_offloaded` attaches to the model as ``model.moesift_offload``."""

    def __init__(self, layers: list[_Layer], info: dict[str, Any]):
        self.layers = layers
        self.info = info

    def stats(self) -> dict[str, Any]:
        per = [layer.stats() for layer in self.layers]
        hits = sum(p["hits"] for p in per)
        acc = sum(p["accesses"] for p in per)
        return {**self.info, "hit_rate": hits / acc if acc else float("nan"), "accesses": acc, "hits": hits,
                "loads": sum(p["loads"] for p in per), "copy_bytes": sum(p["copy_bytes"] for p in per),
                "host_pairs": sum(p["host_pairs"] for p in per), "layers": per}

    def set_threshold(self, host_compute_max_tokens: int) -> None:
        for layer in self.layers:
            layer.threshold = int(host_compute_max_tokens)

    def reset(self) -> None:
        """Empty the caches and zero the counters (a fresh run starts cold, like the simulation)."""
        for layer in self.layers:
            layer.cache = ExpertCache(layer.cache.capacity, layer.cache.policy)
            layer.pinned_hits = layer.pinned_accesses = layer.host_pairs = layer.device_pairs = 0
            layer.pending.clear()
            layer.copies = layer.copy_bytes = 0


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


def _read_tensor(idx: Any, t: Any, files: dict[str, Any]) -> Any:
    from pathlib import Path

    import torch

    if t.slice_keep is not None:
        raw = bytearray(sliced_bytes(idx.directory, t, idx.adapter, idx.config))
    else:
        f = files.get(t.src_file)
        if f is None:
            f = files[t.src_file] = open(Path(idx.directory) / t.src_file, "rb")
        raw = bytearray(t.nbytes)
        mv, pos = memoryview(raw), 0
        for off, n in t.ranges:
            f.seek(off)
            if f.readinto(mv[pos: pos + n]) != n:
                raise MoesiftError(f"{t.src_file!r} ended early; the checkpoint is damaged")
            pos += n
    tdt = TORCH_DTYPES.get(t.dtype)
    if tdt is None or not hasattr(torch, tdt):
        raise MoesiftError(f"tensor {t.src_name} has dtype {t.dtype}, which torch cannot hold")
    x = torch.frombuffer(raw, dtype=getattr(torch, tdt)) if raw else torch.empty(0, dtype=getattr(torch, tdt))
    return x.reshape(t.shape)


def _bar(enabled: bool, total: int) -> Any:
    """A rich progress bar over checkpoint bytes read (stderr, only on a terminal)."""
    import sys

    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    p = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                 console=Console(stderr=True), transient=True)
    p.start()
    p.add_task("reading experts", total=total)
    return p


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

    if offload not in OFFLOAD_KINDS:
        raise MoesiftError(f"unknown --offload {offload!r}; use one of {', '.join(OFFLOAD_KINDS)}")
    if policy not in POLICIES:
        raise MoesiftError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
    if prefetch:
        raise MoesiftError("prefetch is not available in this version; run without --prefetch")
    if int(host_compute_max_tokens) < 0:
        raise MoesiftError("host_compute_max_tokens must be >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoesiftError(f"--device {device}: no CUDA device is available here; use --device cpu")
    idx = CheckpointIndex.build(model)
    spec, ad = idx.spec, idx.adapter
    p = as_plan(plan)
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
    # device experts: resident ids, then slots (filled with non-resident experts; they start empty)
    # (a layer with neither resident experts nor slots holds one unused expert: modules need one)
    dev_keep = {layer: sorted(full[layer] + nonres[layer][: slots[layer]]) or nonres[layer][:1]
                for layer in spec.moe_layers}
    host_keep = {layer: nonres[layer] or full[layer][:1] for layer in spec.moe_layers}

    files: dict[str, Any] = {}
    kw = {"dtype": parse_dtype(dtype)}
    bar = _bar(progress, idx.total_bytes())  # every byte once (the slots' first contents a second time)

    def read(t: Any) -> Any:
        x = _read_tensor(idx, t, files)
        if bar is not None:
            bar.advance(bar.task_ids[0], t.nbytes)
        return x

    def experts_state(keep: Mapping[int, Sequence[int]]) -> dict[str, Any]:
        return {t.name: read(t) for t in plan_layout(idx, keep) if t.role is not None and t.role.kind == "expert"}

    # one module set at a time: tensors without experts (read once), then the device experts, model built and
    # moved to the device, then the host pool (built beside the same non-expert tensors, then dropped)
    try:
        shared = {t.name: read(t) for t in plan_layout(idx, {}) if t.role is None or t.role.kind != "expert"}
        with hf_progress(progress):
            cls, cfg = _experts_variant_class(idx.config, {layer: len(v) for layer, v in dev_keep.items()})
            m = cls.from_pretrained(None, config=cfg, state_dict={**shared, **experts_state(dev_keep)}, **kw)
            m.eval()
            if dev.type != "cpu":
                m.to(dev)
            hcls, hcfg = _experts_variant_class(idx.config, {layer: len(v) for layer, v in host_keep.items()})
            hm = hcls.from_pretrained(None, config=hcfg, state_dict={**shared, **experts_state(host_keep)}, **kw)
        del shared
    finally:
        for f in files.values():
            f.close()
        if bar is not None:
            bar.stop()
    layers: list[_Layer] = []
    copy_stream: Any = None
    for mi, layer in enumerate(spec.moe_layers):
        hmod = ad.experts(hm, layer) if nonres[layer] else None
        if hmod is not None:
            hmod.eval()
            if dev.type == "cuda":
                with torch.no_grad():
                    for prm in hmod.parameters():
                        prm.data = prm.data.pin_memory()
        ids = dev_keep[layer]
        rt = _Layer(ad, mi, layer, ad.experts(m, layer), hmod,
                    {e: ids.index(e) for e in full[layer]},
                    [ids.index(e) for e in nonres[layer][: slots[layer]]],
                    nonres[layer], policy, int(host_compute_max_tokens))
        if dev.type == "cuda":
            copy_stream = copy_stream if mi else torch.cuda.Stream(device=dev)
            rt.stream = copy_stream
        layers.append(rt)
        ad.offload_experts(m, layer, rt.run)
    del hm
    info = {"model": str(model), "plan": p.source, "device": str(dev), "offload": offload, "policy": policy,
            "cache_slots": cache_slots, "host_compute_max_tokens": int(host_compute_max_tokens),
            "device_bytes": device_bytes(idx, full, slots)}
    m.moesift_offload = OffloadState(layers, info)
    m.moesift_resident = {int(k): list(v) for k, v in full.items()}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(idx.directory)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still usable from token ids
        tok = None
    return m, tok


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


# ------------------------------------------------------------------------------------------------
# planning for this runtime (moesift plan --offload)
# ------------------------------------------------------------------------------------------------


