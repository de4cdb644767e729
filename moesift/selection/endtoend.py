"""End-to-end choice of calibrated sets where the layer-local error misleads (small candidate sets).

A group-limited router (DeepSeek-V3: 2 of 4 groups per token) leaves each layer a choice among a handful
of group sets per kept count, and the set with the least layer-output error is not always the one that
costs the model least. Here each set is scored by the whole model's KL to the full model's next-token
distributions on the calibration tokens, layer by layer with the other layers' sets fixed (coordinate
descent until a sweep changes nothing), per kept count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

from ..engines.restrict import restrict
from ..formats.workload import batches


class _EndToEnd:
    """KL(full model || restricted model) of the next-token distributions on the calibration tokens, mean
    over every real token. The full model's distributions are stored as their `top` most likely tokens plus
    one bucket for the rest (the KL of these coarsened distributions; exact when `top` >= the vocabulary)."""

    def __init__(self, model: Any, token_lists: list[list[int]], batch_size: int, top: int, loss: str = "kl"):
        import torch

        self.model = model
        self.loss = loss
        self.device = next(p for p in model.parameters() if p.device.type != "meta").device
        self.batches = batches(token_lists, batch_size)
        self.ref: list[tuple[Any, Any, Any, Any]] = []
        self.tokens = 0
        self.forwards = 0
        with torch.no_grad():
            for ids, mask in self.batches:
                lp = self._logp(ids, mask)
                k = min(top, lp.shape[-1])
                tp, ti = lp.topk(k, dim=-1)
                rest = self._rest(tp)
                self.ref.append((ti, tp, rest, tp.exp()))
                self.tokens += lp.shape[0]

    def _logp(self, ids: Any, mask: Any) -> Any:
        import torch

        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        keep = mask.reshape(-1).bool().to(out.logits.device)
        return torch.log_softmax(out.logits.float().reshape(-1, out.logits.shape[-1])[keep], dim=-1)

    @staticmethod
    def _rest(top_logp: Any) -> Any:
        import torch

        # log of the probability mass outside the top tokens (log1p(-sum p) is accurate near 0 and 1)
        s = top_logp.exp().sum(-1).clamp(max=1.0)
        return torch.log1p(-s).clamp(min=math.log(1e-30)) if s.numel() else s

    def kl(self, resident: dict[int, list[int]]) -> float:
        """Mean KL per token of the model restricted to `resident` ({decoder layer: ids})."""
        import torch

        total = 0.0
        self.forwards += 1
        with torch.no_grad(), restrict(self.model, resident):
            for (ids, mask), (ti, tp, rest, p) in zip(self.batches, self.ref, strict=True):
                lq = self._logp(ids, mask)
                if self.loss == "nll":  # cross-entropy of the next calibration token
                    nxt = torch.zeros_like(mask)
                    nxt[:, :-1] = mask[:, 1:]
                    tgt = torch.roll(ids, -1, dims=1).reshape(-1)[mask.reshape(-1).bool()]
                    ok = nxt.reshape(-1)[mask.reshape(-1).bool()].bool()
                    total += float(-lq[ok.to(lq.device)].gather(-1, tgt[ok].to(lq.device).unsqueeze(-1)).double().sum())
                    continue
                qt = lq.gather(-1, ti.to(lq.device))
                qrest = self._rest(qt)
                kl = (p * (tp - qt)).sum(-1) + rest.exp() * (rest - qrest)
                total += float(kl.double().sum())
        return total / max(self.tokens, 1)


def choose_end_to_end(
    model: Any, spec: Any, layers_out: list[dict[str, Any]], units: list[list[int]], n_floor: int,
    token_lists: list[list[int]], batch_size: int = 8, top: int = 64, max_candidates: int = 70,
    sweeps: int = 3, tick: Callable[[], None] | None = None, loss: str = "kl",
) -> dict[str, Any] | None:
    """For layers whose choice is among few sets (group-limited routers: C(groups, kept) per count), choose
    the set per kept count by the model's own KL on the calibration tokens instead of the layer-output
    error. Per count k: every layer starts from the greedy's best k units; then coordinate descent, layer by
    layer with the other layers' sets fixed, each layer takes the k-unit set that restricted in the model
    gives the least KL, until a sweep changes nothing (at most `sweeps`). Then per layer and count, the KL of
    that layer alone restricted to its set (the others whole): ``plan --allocate`` spends by its drops.
    Adds ``e2e`` to the entries of `layers_out` in place; returns a summary (None when no layer qualifies).

    Layers with an ``equal`` order (same count in every group) get, per kept number of rounds r, a set
    chosen the same way between two candidates, the greedy's r rounds and each group's r most routed experts
    on the calibration tokens (``equal["sets"]``), the KL with every layer at its set (``equal["kl"]``,
    what ``plan --groups auto`` compares with the whole-group sets of the same size) and with that layer
    alone restricted (``equal["alone"]``, what ``--allocate`` spends by): per count, one forward per
    layer and sweep, plus one per layer."""
    n = len(units)
    cands = {k: [list(c) for c in combinations(range(n), k)] for k in range(n_floor, n)}
    if len(units[0]) == 1 or not cands or max(len(c) for c in cands.values()) > max_candidates:
        return None
    live = [e for e in layers_out if e.get("order") is not None]
    if not live:
        return None
    t0 = time.perf_counter()
    ev = _EndToEnd(model, token_lists, batch_size, top, loss)
    converged = _group_sets(ev, live, units, n_floor, cands, sweeps, tick)
    eq = [e for e in live if e.get("equal")]
    if eq:
        _equal_sets(ev, eq, units, sweeps, tick)
    return {"kl_top": top, "converged": converged, "forwards": ev.forwards, "tokens": ev.tokens,
            "seconds": time.perf_counter() - t0, "sweeps": sweeps}


def _group_sets(ev: _EndToEnd, live: list[dict[str, Any]], units: list[list[int]], n_floor: int,
                cands: dict[int, list[list[int]]], sweeps: int, tick: Callable[[], None] | None) -> bool:
    """Per kept count, each layer's set of units by coordinate descent on the model's KL (``e2e`` of the
    entries); whether every count converged within `sweeps`."""
    n = len(units)
    uid = {tuple(u): i for i, u in enumerate(units)}
    cache: dict[tuple, float] = {}

    def flat(us: Sequence[int]) -> list[int]:
        return sorted(x for u in us for x in units[u])

    def kl(sets: dict[int, tuple[int, ...]]) -> float:
        key = tuple(sorted(sets.items()))
        if key not in cache:
            cache[key] = ev.kl({layer: flat(s) for layer, s in sets.items()})
        return cache[key]

    converged = True
    for e in live:
        e["e2e"] = {"sets": {}, "kl": {}, "alone": {str(n): 0.0}}
    for k in range(n_floor, n):
        cur: dict[int, tuple[int, ...]] = {}
        for e in live:  # the greedy's k units: the floor and the last removed
            last = e["order"][len(e["order"]) - (k - n_floor):] if k > n_floor else []
            keep = [uid[tuple(u)] for u in e["floor"] + last]
            cur[e["layer"]] = tuple(sorted(keep))
        done = False
        for _ in range(sweeps):
            changed = False
            for e in live:
                layer = e["layer"]
                best, best_kl = cur[layer], kl(cur)
                for c in cands[k]:
                    v = kl({**cur, layer: tuple(c)})
                    if v < best_kl - 1e-12:
                        best, best_kl = tuple(c), v
                if best != cur[layer]:
                    cur[layer], changed = best, True
                if tick:
                    tick()
            if not changed:
                done = True
                break
        converged = converged and done
        final = kl(cur)
        for e in live:
            s = cur[e["layer"]]
            e["e2e"]["sets"][str(k)] = flat(s)
            e["e2e"]["kl"][str(k)] = final
            e["e2e"]["alone"][str(k)] = kl({e["layer"]: s})
    return converged


def _equal_sets(ev: _EndToEnd, eq: list[dict[str, Any]], units: list[list[int]], sweeps: int,
                tick: Callable[[], None] | None) -> None:
    """Per kept number of rounds, each layer's equal-count set between the greedy's rounds and each group's
    most routed experts, by coordinate descent on the model's KL (``sets``, ``kl``, ``alone`` of the
    entries' ``equal``)."""
    G = int(eq[0]["equal"]["groups"])
    per = len(units[0])
    r_min = len(eq[0]["equal"]["floor"]) // G

    def kept(q: dict[str, Any], r: int) -> list[int]:  # the floor and the last (r - r_min) rounds removed
        order = [u[0] for u in q["order"]]
        return sorted([u[0] for u in q["floor"]] + (order[len(order) - G * (r - r_min):] if r > r_min else []))

    def most_routed(e: dict[str, Any], r: int) -> list[int]:  # each group's r most routed on these tokens
        used = e.get("routed") or [0] * (G * per)
        return sorted(x for g in range(G) for x in sorted(range(g * per, (g + 1) * per),
                                                           key=lambda i: (-used[i], i))[:r])

    ecache: dict[tuple, float] = {}

    def ekl(sets: dict[int, list[int]]) -> float:
        key = tuple(sorted((k, tuple(v)) for k, v in sets.items()))
        if key not in ecache:
            ecache[key] = ev.kl(sets)
        return ecache[key]

    for e in eq:
        e["equal"]["kl"], e["equal"]["alone"], e["equal"]["sets"] = {str(per): 0.0}, {str(per): 0.0}, {}
    for r in range(r_min, per):
        # per layer two candidates: the greedy's r rounds (layer error) and the r most routed per group
        # (the counts see every token; the layer error of a rarely used expert rests on few); coordinate
        # descent over the layers by the model's KL, as for the group sets
        cands = {e["layer"]: [kept(e["equal"], r), most_routed(e, r)] for e in eq}
        cur = {layer: c[0] for layer, c in cands.items()}
        for _ in range(sweeps):
            changed = False
            for layer, c in cands.items():
                for alt in c:
                    if alt != cur[layer] and ekl({**cur, layer: alt}) < ekl(cur) - 1e-12:
                        cur[layer], changed = alt, True
            if not changed:
                break
        every = ekl(cur)
        for e in eq:
            e["equal"]["kl"][str(r)] = every
            e["equal"]["sets"][str(r)] = cur[e["layer"]]
            e["equal"]["alone"][str(r)] = ekl({e["layer"]: cur[e["layer"]]})
            if tick:
                tick()
