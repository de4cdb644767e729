"""The runtime of an offloaded model, per MoE layer: the expert cache (the cache model and eviction rule of
`moesift.cachesim`) and the computation of the chosen (token, expert) pairs where their experts are (see
`moesift.apply.offload`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..analysis.cachesim import ONLINE_POLICIES, OnlineCache
from ..core.errors import MoesiftError

POLICIES = ONLINE_POLICIES


class ExpertCache(OnlineCache):
    """Online cache of one MoE layer: the cache model and eviction rule of `moesift.cachesim`
    (`OnlineCache`), one token at a time, with the device slot each cached expert occupies.

    ``occupant[s]`` is the expert whose weights slot s holds (None: empty); the cache starts empty."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise MoesiftError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
        super().__init__(capacity, policy)
        self.occupant: list[int | None] = [None] * self.capacity
        self.slot_of: dict[int, int] = {}

    def evict(self, expert: int) -> None:
        super().evict(expert)
        self.occupant[self.slot_of.pop(expert)] = None

    def token(self, row: Sequence[int]) -> None:
        """Access the distinct non-pinned experts `row` of one token (column order)."""
        row = list(row)
        if self.capacity == 0:  # no cache: every miss is computed on the host, nothing is loaded
            self.accesses += len(row)
            return
        try:
            super().token(row)
        except ValueError:
            raise MoesiftError(f"a token needs {len(row)} non-resident experts at once; the cache has "
                               f"{self.capacity} slots (raise cache_slots)") from None
        for e in row:
            if e not in self.slot_of:
                s = self.occupant.index(None)
                self.occupant[s] = e
                self.slot_of[e] = s


class OffloadLayer:
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
            return self._run_resident(hidden, ids, weights)
        if self.ready is not None:  # slot copies queued at this layer's previous call
            torch.cuda.current_stream(hidden.device).wait_event(self.ready)
            self.ready = None
        idl = ids.tolist()
        rows, counts = self._token_rows(idl)
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
        return self._run_split(hidden, weights, idl, early, new_dev, on_host, changed, dev_map)

    def _run_resident(self, hidden: Any, ids: Any, weights: Any) -> Any:
        """A layer without non-resident experts: ids renumbered on the device, one call."""
        import torch

        if self.lut is None or self.lut.device != ids.device:
            lut = torch.full((max(self.pinned) + 1,), -1, dtype=torch.long)
            for e, i in self.pinned.items():
                lut[e] = i
            self.lut = lut.to(ids.device)
        self.pending.append(ids.numel())
        return self.ad.experts_apply(self.dev, hidden, self.lut[ids], weights)

    def _token_rows(self, idl: list[list[int]]) -> tuple[list[list[int]], dict[int, int]]:
        """Per token, its distinct non-pinned experts in column order (pinned accesses counted), and how many
        tokens of the call each non-pinned expert has."""
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
        return rows, counts

    def _run_split(self, hidden: Any, weights: Any, idl: list[list[int]], early: dict[int, int],
                   new_dev: dict[int, int], on_host: list[int], changed: list[tuple[int, int]],
                   dev_map: dict[int, int]) -> Any:
        """A call whose experts run in more than one place: each (token, expert) pair's contribution is
        computed where its expert is (one call per place, every pair its own row), then the pairs are summed
        as the experts module sums them."""
        import torch

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
        self._copy_later(hidden, [(s, e) for s, e in changed if e not in new_dev])
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

    def _copy_later(self, hidden: Any, later: list[tuple[int, int]]) -> None:
        """Copy the new occupants not computed from their slot in this call (CUDA: on the side stream, waited
        for at this layer's next call)."""
        import torch

        if not later:
            return
        if self.stream is None:
            for s, e in later:
                self.copy_in(e, s)
            return
        self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(self.stream):
            for s, e in later:
                self.copy_in(e, s)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

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

    def __init__(self, layers: list[OffloadLayer], info: dict[str, Any]):
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
