"""The greedy removal of calibrated selection on one MoE layer.

`greedy_layer` removes selection units one at a time, least damage first to the layer's output on the
calibration tokens (see `moesift.selection.calibrate`). How a candidate restriction is scored is a scorer
(`moesift.selection.calib_cache`): `CachedScorer` (the default: every expert run on every token once, the
restriction re-routed over the router's logits) or `BlockScorer` (the block itself run under the family's
restriction for every candidate; the reference, and what a layer the cached scorer does not reproduce
gets). Both feed the same lazy greedy, so the two give the same removal order wherever their scores agree
beyond rounding.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .calib_cache import BlockRunner, make_scorer

# damages below this fraction of the layer's output energy (sum_t ||y_full||^2) are rounding, not damage
# (float32 outputs differ by ~1e-7 of their size, so such scores are ~1e-14 of it): they tie
TIE = 1e-12
# score the other tokens of a removal in closed form where the router allows it (`_Rescaled`); False measures
# every token for every candidate (`bench/calibrate_rescaled.py` compares the two)
RESCALE = True


def greedy_layer(blk: BlockRunner, x: Any, units: list[list[int]], n_floor: int,
                 tick: Callable[[], None] | None = None, balance: Sequence[int] | None = None,
                 scorer: Any = "cache") -> dict[str, Any]:
    """Greedy removal on one layer (see `moesift.selection.calibrate`). Returns order (units removed, first
    first), floor (units left), error (relative error after each removal, error[0] = 0), local (candidates
    measured on their own tokens), forwards (block calls), evaluations (candidate restrictions scored) and
    scorer ("cache" or "block").

    `balance` (group of each unit): removal goes in rounds that take one unit from every group, so after
    every round each group holds the same number (the "equal" group mode; measured on every token, since
    a group's score depends on all of its experts).

    `scorer`: "cache" (`moesift.selection.calib_cache.CachedScorer`, falling back to the block where it does
    not reproduce it), "block" (`BlockScorer`), or a scorer already built for this layer and `x`."""
    import torch

    sc = make_scorer(blk, x, scorer)
    ids_full = sc.full_ids
    norm2 = sc.norm2
    N = ids_full.shape[0]
    remaining = list(range(len(units)))
    resident = set(range(blk.E))
    cur_ids = ids_full.clone()
    err_tok = torch.zeros(N, dtype=torch.float64, device=ids_full.device)
    # tie-break (unused experts): lower routed count first
    used = torch.bincount(ids_full.reshape(-1).long(), minlength=blk.E).cpu().numpy()
    grouped = len(units[0]) > 1 or balance is not None
    forwards0 = sc.forwards
    evaluations = 0
    local, fast = not grouped, None  # fast: the others' outputs rescaled, not measured (see `_Rescaled`)
    if local and len(units) > n_floor:
        evaluations += 1
        local, fast = _how_others_move(sc, cur_ids, used)

    def measure(u: int) -> float:
        nonlocal evaluations
        R = sorted(resident - set(units[u]))
        if fast is not None:
            evaluations += 1
            return fast.damage(sc, resident, units[u][0], R)
        if local:
            idx = _served(cur_ids, units[u])
            if idx.numel() == 0:
                return 0.0
            evaluations += 1
            err, _ = sc.rows(idx, R)
            return float(err.sum() - err_tok[idx].sum())
        evaluations += 1
        err, _ = sc.rows(None, R)
        return float(err.sum()) - total

    tie = TIE * norm2

    def key(u: int, d: float) -> tuple[float, int, int, float]:
        # a damage below rounding is no damage: such candidates go by routed count, then id, whatever
        # the last bits of their (noise) scores say
        return (d if d > tie else 0.0, int(sum(used[e] for e in units[u])), u, d)

    # lazy greedy: every candidate is measured on the first step; afterwards only candidates whose tokens
    # changed are stale, and a stale candidate is re-measured only when it reaches the top of the heap
    order, errors, total = [], [0.0], 0.0
    heap = [key(u, measure(u)) for u in remaining]
    heapq.heapify(heap)
    stale: set[int] = set()
    n_groups = len(set(balance)) if balance is not None else 0
    taken: set[int] = set()  # groups that gave a unit in this round
    while len(remaining) > n_floor:
        d, best = _pop_best(heap, stale, balance, taken, measure, key)
        if balance is not None:
            taken.add(balance[best])
            if len(taken) == n_groups:
                taken = set()
        resident -= set(units[best])
        remaining.remove(best)
        order.append(units[best])
        if local:
            idx = _served(cur_ids, units[best])
            if idx.numel():
                err, new_ids = sc.rows(idx, sorted(resident))
                evaluations += 1
                old = cur_ids[idx]
                cur_ids[idx] = new_ids.to(cur_ids.dtype)
                err_tok[idx] = err
                touched = set(torch.unique(torch.cat([old.reshape(-1), new_ids.reshape(-1).to(old.dtype)])).tolist())
                stale |= {u for u in remaining if any(e in touched for e in units[u])}
            total = float(err_tok.sum())
        elif fast is not None:
            fast.at(resident)  # the new state: its exact per-token errors
            total, stale = fast.total, set(remaining)
        else:
            total, stale = total + d, set(remaining)
        errors.append(total / norm2)
        if tick:
            tick()
    floor = [units[u] for u in remaining]
    return {"order": order, "floor": floor, "error": errors, "local": local,
            **({} if local or grouped else {"others": "rescaled" if fast is not None else "measured"}),
            "forwards": sc.forwards - (0 if isinstance(scorer, str) else forwards0),
            "evaluations": evaluations, "scorer": sc.kind, "output_norm2": norm2, "tokens": int(N),
            "routed": [int(v) for v in used], **({"scorer_note": sc.note} if sc.note else {})}


def _pop_best(heap: list, stale: set[int], balance: Sequence[int] | None, taken: set[int],
              measure: Callable[[int], float], key: Callable[[int, float], tuple]) -> tuple[float, int]:
    """(damage, unit) of the next removal: the heap's best unit whose measure is fresh (a stale one is
    re-measured and pushed back), skipping units whose group already gave one this round."""
    held = []
    while True:
        top = heapq.heappop(heap)
        d, best = top[3], top[2]
        if balance is not None and balance[best] in taken:
            held.append(top)  # its group already gave one this round
            continue
        if best not in stale:
            break
        stale.discard(best)
        heapq.heappush(heap, key(best, measure(best)))
    for h in held:
        heapq.heappush(heap, h)
    return d, best


def _how_others_move(sc: Any, cur_ids: Any, used: np.ndarray) -> tuple[bool, _Rescaled | None]:
    """(local, rescaled): does removing one expert (the most used) move the outputs of tokens it does not
    serve (then every token is scored), and if so, are they rescaled in closed form (`_Rescaled`)?"""
    probe = int(np.argmax(used))
    change = sc.rows(None, sorted(set(range(len(used))) - {probe}))[0]
    if not _moves_others(change, cur_ids, probe):
        return True, None
    return False, _Rescaled.check(sc, probe, change) if RESCALE else None


def _moves_others(change: Any, cur_ids: Any, probe: int) -> bool:
    """Whether removing the most used expert (`probe`; `change`: each token's squared output change) moves
    the outputs of tokens it does not serve. Renormalising routers leave the other tokens as they were up to
    rounding (bf16: ~1e-5 of the served tokens' change); routers that do not renormalise move them by the
    removed expert's probability share."""
    served = (cur_ids == probe).any(dim=1).to(change.device)
    return bool((~served).any() and served.any() and float(change[~served].mean()) > 1e-4 * float(change[served].mean()))


class _Rescaled:
    """Non-local layers whose router keeps every other token's experts when one goes and scales their weights
    (softmax over the resident experts, weights not renormalised over the top-k: OLMoE, Qwen2-MoE). Removing
    expert u from the resident set R leaves token t's selection as it was unless u served t, and multiplies
    its weights by s_tu = 1 / (1 - p_tu) (p: the router's probabilities over R). So with the full model's
    routed output f_t and R's r_t, a token u does not serve has error ||f_t - s_tu r_t||^2 = A_t - 2 s_tu B_t
    + s_tu^2 C_t (A = ||f||^2, B = <f, r>, C = ||r||^2, from the Gram matrices), and every candidate's sum
    over all tokens is two matrix-vector products per state. Only the tokens u serves are re-routed and
    scored exactly. Used where one removal measured on every token agrees (`check`), else every token is
    measured for every candidate."""

    def __init__(self, base: Any, rows: Any):
        self.base, self.rows = base, rows  # the CachedScorer and the rows of its tokens (a subset's)
        self.logits = base.logits[rows]
        self.full_ids, self.full_w = base.full_ids[rows], base.full_w[rows]
        self.A = base.inner(rows, self.full_ids, self.full_w, self.full_ids, self.full_w)
        self.state: frozenset[int] | None = None

    @staticmethod
    def check(sc: Any, probe: int, change: Any) -> _Rescaled | None:
        """A `_Rescaled` for scorer `sc` when its router qualifies and the probe removal (`change`: each
        token's squared output change, measured) is reproduced to 1e-6 of its size; else None."""
        import torch

        base, rows = sc, None
        if getattr(sc, "parent", None) is not None:
            base, rows = sc.parent, sc.sel
        r = getattr(base, "routing", None)
        if base.kind != "cache" or r is None or r.scoring != "softmax" or r.groups is not None or r.bias is not None:
            return None
        if rows is None:
            rows = torch.arange(base.logits.shape[0], device=base.logits.device)
        fast = _Rescaled(base, rows)
        every = set(range(base.E))
        fast.at(every)
        idx = _served(fast.ids, [probe])
        exact = float(change.sum())
        got = fast.total_without(probe, idx, change[idx.to(change.device)])
        return fast if abs(got - exact) <= 1e-6 * max(exact, 1e-30) else None

    def at(self, resident: set[int]) -> None:
        """The per-token quantities of the state `resident` (recomputed only when it changed)."""
        import torch

        key = frozenset(resident)
        if key == self.state:
            return
        base = self.base
        keep = base.keep(sorted(resident))
        mask = torch.zeros(base.E, dtype=torch.float32, device=self.logits.device)
        mask[~keep] = float("-inf")
        p = torch.softmax(self.logits.float() + mask, dim=-1).double()
        self.ids, w = base.routing.route(self.logits, keep)
        B = base.inner(self.rows, self.full_ids, self.full_w, self.ids, w)
        C = base.inner(self.rows, self.ids, w, self.ids, w)
        S = 1.0 / (1.0 - p).clamp(min=1e-300)
        self.B, self.C, self.S = B, C, S
        self.per = (self.A.sum() - 2.0 * (B @ S) + (C @ (S * S)))  # [E]: every candidate, all tokens rescaled
        self.total = float((self.A - 2.0 * B + C).clamp(min=0.0).sum())
        self.state = key

    def damage(self, sc: Any, resident: set[int], u: int, R: list[int]) -> float:
        """How much removing expert u from `resident` (leaving `R`) adds to the layer's summed error: its
        served tokens re-routed and scored by `sc`, every other token in closed form."""
        self.at(resident)
        idx = _served(self.ids, [u])
        return self.total_without(u, idx, sc.rows(idx, R)[0] if idx.numel() else None) - self.total

    def total_without(self, u: int, idx: Any, served: Any) -> float:
        """The layer's summed error with expert u gone: the rescaled sum, its served tokens (`idx`) replaced by
        their measured errors `served`."""
        if idx.numel() == 0:
            return float(self.per[u])
        s = self.S[idx, u]
        approx = (self.A[idx] - 2.0 * s * self.B[idx] + s * s * self.C[idx]).sum()
        return float(self.per[u] - approx + served.sum())


def _served(cur_ids: Any, unit: list[int]) -> Any:
    """Indices of the tokens routed to an expert of `unit` (cur_ids [n, K])."""
    import torch

    sel = (cur_ids.unsqueeze(-1) == torch.as_tensor(unit, device=cur_ids.device)).any(-1).any(-1)
    return sel.nonzero().reshape(-1)
