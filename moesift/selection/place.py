"""Expert-parallel placement from a trace: balance load (EPLB-style replication) or keep chains together
(ExFlow-style inter-layer affinity), with a simulated report against round-robin placement.

Model. Each MoE layer has ``E`` logical experts and ``E + R`` physical slots (``R`` = ``replicas``, the
redundant experts), ``(E + R) / G`` slots on each of ``G`` GPUs; slot ``p`` lives on GPU
``p // slots_per_gpu`` (SGLang's convention). An expert with ``c`` replicas gets ``1/c`` of its tokens on each.

Figures (each beside the same figure for round-robin placement, expert ``e`` on GPU ``e % G``):

- ``load_max_over_mean``: per MoE layer, the busiest GPU's routed tokens over the mean GPU's; the mean over
  layers and the worst layer.
- ``cross_gpu_hop_share``: of all layer-to-layer hops (a token's expert ``i`` at one MoE layer to each of its
  experts ``j`` at the next, every pair counted, as in the trace's ``transitions``), the share whose two
  experts sit on different GPUs (with replicas, the probability that the two replicas used differ).
- ``all_to_all_bytes_per_token``: a token's hidden state is sent to every GPU that hosts one of its experts
  and its result sent back (2 x hidden x dtype bytes per GPU), except GPUs that already hold it: for the
  first MoE layer the token's home GPU (uniform, so ``1/G`` of a GPU is free on average), for later layers
  the GPUs that ran its experts at the previous MoE layer (tokens follow their experts, as in ExFlow).
  Replicas are used round-robin over tokens. Needs the hidden size (trace model info or ``hidden``).
"""

from __future__ import annotations

import itertools
import json as _json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.io import check_output_path, input_paths, write_json
from ..core.values import check_int
from ..formats.trace import Trace
from .place_sim import simulate_placement, transitions_from_log

MILP_MAX_VARS = 4000


# ---------------------------------------------------------------------------------------------------------
# balance: hierarchical replication + balanced packing (DeepSeek EPLB) with a swap refinement
# ---------------------------------------------------------------------------------------------------------


def _balanced_packing(weights: np.ndarray, n_bins: int, per_bin: int) -> np.ndarray:
    """Assign items to bins, ``per_bin`` items each, heaviest first onto the lightest bin with room.
    Then swap pairs between the heaviest bin and others while that lowers the heaviest bin's load."""
    n = len(weights)
    assert n == n_bins * per_bin
    bin_of = np.empty(n, dtype=np.int64)
    load = np.zeros(n_bins)
    cnt = np.zeros(n_bins, dtype=np.int64)
    for i in np.argsort(-weights, kind="stable"):
        open_ = np.flatnonzero(cnt < per_bin)
        b = open_[np.argmin(load[open_])]
        bin_of[i] = b
        load[b] += weights[i]
        cnt[b] += 1
    for _ in range(4 * n):
        hb = int(np.argmax(load))
        best = None
        hi_items = np.flatnonzero(bin_of == hb)
        for b in np.argsort(load):
            if b == hb:
                continue
            lo_items = np.flatnonzero(bin_of == b)
            d = weights[hi_items][:, None] - weights[lo_items][None, :]  # moved from hb to b
            new_max_pair = np.maximum(load[hb] - d, load[b] + d)
            ok = (d > 0) & (new_max_pair < load[hb] - 1e-12)
            if ok.any():
                k = np.unravel_index(np.argmin(np.where(ok, new_max_pair, np.inf)), d.shape)
                best = (hi_items[k[0]], lo_items[k[1]], b, d[k])
                break
        if best is None:
            break
        i, j, b, dd = best
        bin_of[i], bin_of[j] = b, hb
        load[hb] -= dd
        load[b] += dd
    return bin_of


def _replicate(weights: np.ndarray, n_phy: int) -> np.ndarray:
    """Replica counts: one each, then repeatedly one more for the expert with the most load per replica."""
    cnt = np.ones(len(weights), dtype=np.int64)
    for _ in range(n_phy - len(weights)):
        cnt[int(np.argmax(weights / cnt))] += 1
    return cnt


def balance_layer(w: np.ndarray, gpus: int, nodes: int, replicas: int, groups: int | None = None) -> np.ndarray:
    """phy2log [E + R] for one layer by EPLB's hierarchical scheme: groups of experts packed evenly onto
    nodes, replicas added inside each node to the expert with the most load per replica, replicas packed
    onto the node's GPUs by load. Slot order: GPU by GPU."""
    E = len(w)
    w = np.asarray(w, dtype=np.float64) + 1e-9  # unseen experts still get a slot and a stable order
    n_phy = E + replicas
    groups = groups if groups and E % groups == 0 and groups % nodes == 0 else E
    gsize = E // groups
    node_of_group = _balanced_packing(w.reshape(groups, gsize).sum(1), nodes, groups // nodes)
    gpn = gpus // nodes
    phy_per_node = n_phy // nodes
    per_gpu = n_phy // gpus
    out = []
    for nd in range(nodes):
        experts = np.concatenate([np.arange(g * gsize, (g + 1) * gsize) for g in np.flatnonzero(node_of_group == nd)])
        cnt = _replicate(w[experts], phy_per_node)
        rep_expert = np.repeat(experts, cnt)
        rep_load = np.repeat(w[experts] / cnt, cnt)
        gpu_of = _balanced_packing(rep_load, gpn, per_gpu)
        for g in range(gpn):
            out.extend(sorted(rep_expert[gpu_of == g].tolist()))
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# affinity: experts chained across consecutive layers on the same GPU (ExFlow)
# ---------------------------------------------------------------------------------------------------------


def _cap(E: int, G: int) -> int:
    return -(-E // G)


def same_gpu_hops(T: np.ndarray, gpu: np.ndarray) -> float:
    """Hops (weighted by T [L-1, E, E]) whose two experts share a GPU under gpu [L, E]."""
    return float(sum(T[li][gpu[li][:, None] == gpu[li + 1][None, :]].sum() for li in range(len(T))))


def affinity_bound(T: np.ndarray, G: int) -> float:
    """Upper bound on same-GPU hops: an expert shares its GPU with at most ceil(E/G) experts of the next layer,
    so its row keeps at most the sum of its ceil(E/G) largest entries (likewise per column)."""
    E = T.shape[1]
    c = _cap(E, G)
    tot = 0.0
    for Tl in T:
        rows = np.sort(Tl, axis=1)[:, ::-1][:, :c].sum()
        cols = np.sort(Tl, axis=0)[::-1, :][:c, :].sum()
        tot += min(rows, cols)
    return float(tot)


def _assign(score: np.ndarray, G: int) -> np.ndarray:
    """Experts to GPUs (at most ceil(E/G) each) maximising sum score[e, gpu(e)]: a linear assignment."""
    from scipy.optimize import linear_sum_assignment

    E = score.shape[0]
    c = _cap(E, G)
    cols = np.repeat(np.arange(G), c)
    r, k = linear_sum_assignment(-score[:, cols])
    out = np.empty(E, dtype=np.int64)
    out[r] = cols[k]
    return out


def affinity_heuristic(T: np.ndarray, G: int, sweeps: int = 8) -> np.ndarray:
    """Chain layer by layer (each layer's assignment solved exactly given the previous layer), then sweep:
    re-solve every layer given both neighbours until nothing improves. Never worse than round-robin."""
    Lm1, E, _ = T.shape
    L = Lm1 + 1
    rr = np.tile(np.arange(E) % G, (L, 1))
    gpu = rr.copy()
    for li in range(1, L):
        onehot = np.eye(G)[gpu[li - 1]]  # [E, G]
        gpu[li] = _assign(T[li - 1].T @ onehot, G)
    best = same_gpu_hops(T, gpu)
    for _ in range(sweeps):
        for li in range(L):
            s = np.zeros((E, G))
            if li > 0:
                s += T[li - 1].T @ np.eye(G)[gpu[li - 1]]
            if li < L - 1:
                s += T[li] @ np.eye(G)[gpu[li + 1]]
            gpu[li] = _assign(s, G)
        v = same_gpu_hops(T, gpu)
        if v <= best + 1e-9:
            best = max(best, v)
            break
        best = v
    if same_gpu_hops(T, rr) > same_gpu_hops(T, gpu):
        return rr
    return gpu


def _neighbour_score(T: np.ndarray, gpu: np.ndarray, li: int, G: int) -> np.ndarray:
    """[E, G]: hops expert e of layer li would keep on GPU g given the neighbouring layers' placement."""
    E = gpu.shape[1]
    s = np.zeros((E, G))
    if li > 0:
        s += T[li - 1].T @ np.eye(G)[gpu[li - 1]]
    if li < len(gpu) - 1:
        s += T[li] @ np.eye(G)[gpu[li + 1]]
    return s


def rebalance_affinity(T: np.ndarray, gpu: np.ndarray, load: np.ndarray, G: int, max_ratio: float) -> np.ndarray:
    """Swap experts of a layer between its busiest GPU and another until busiest/mean load <= max_ratio,
    choosing each time the swap that lowers the busiest GPU and loses the fewest same-GPU hops."""
    gpu = gpu.copy()
    L, E = gpu.shape
    for li in range(L):
        w = load[li].astype(np.float64)
        mean = w.sum() / G
        if mean <= 0:
            continue
        for _ in range(4 * E):
            gl = np.bincount(gpu[li], weights=w, minlength=G)
            hot = int(np.argmax(gl))
            if gl[hot] <= max_ratio * mean + 1e-12:
                break
            S = _neighbour_score(T, gpu, li, G)
            a = np.flatnonzero(gpu[li] == hot)
            b = np.flatnonzero(gpu[li] != hot)
            gb = gpu[li][b]
            d = w[a][:, None] - w[b][None, :]
            new_max = np.maximum(gl[hot] - d, gl[gb][None, :] + d)
            ok = (d > 0) & (new_max < gl[hot] - 1e-12)
            if not ok.any():
                break
            loss = (S[a, hot][:, None] + S[b, gb][None, :] - S[a][:, gb] - S[b, hot][None, :])
            k = np.unravel_index(np.argmin(np.where(ok, loss - 1e-9 * (gl[hot] - new_max), np.inf)), d.shape)
            ea, eb = a[k[0]], b[k[1]]
            gpu[li, ea], gpu[li, eb] = gpu[li, eb], hot
    return gpu


def affinity_milp(T: np.ndarray, G: int, time_limit: float = 30.0) -> tuple[np.ndarray, dict[str, Any]]:
    """ExFlow's integer program through HiGHS: x[l,e,g] (expert e of layer l on GPU g, one GPU each, at most
    ceil(E/G) per GPU and layer), z[l,i,j,g] <= x[l,i,g], x[l+1,j,g]; maximise sum T[l,i,j] z[l,i,j,g]."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    Lm1, E, _ = T.shape
    L = Lm1 + 1
    c = _cap(E, G)
    nx = L * E * G

    def xi(li, e, g):
        return (li * E + e) * G + g

    pairs = [(li, i, j) for li in range(Lm1) for i, j in zip(*np.nonzero(T[li]), strict=True)]
    nz = len(pairs) * G
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for li in range(L):  # each expert on exactly one GPU
        for e in range(E):
            for g in range(G):
                rows.append(r), cols.append(xi(li, e, g)), vals.append(1.0)
            lo.append(1), hi.append(1)
            r += 1
    for li in range(L):  # at most c per GPU
        for g in range(G):
            for e in range(E):
                rows.append(r), cols.append(xi(li, e, g)), vals.append(1.0)
            lo.append(0), hi.append(c)
            r += 1
    cost = np.zeros(nx + nz)
    by_row: dict[tuple[int, int, int], list[int]] = {}  # (layer, expert, gpu) -> z columns it bounds
    by_col: dict[tuple[int, int, int], list[int]] = {}
    for p, (li, i, j) in enumerate(pairs):
        for g in range(G):
            zc = nx + p * G + g
            cost[zc] = -float(T[li, i, j])
            for xc in (xi(li, i, g), xi(li + 1, j, g)):
                rows.extend((r, r)), cols.extend((zc, xc)), vals.extend((1.0, -1.0))
                lo.append(-np.inf), hi.append(0)
                r += 1
            by_row.setdefault((li, int(i), g), []).append(zc)
            by_col.setdefault((li + 1, int(j), g), []).append(zc)
    # valid cuts that tighten the relaxation: an expert on GPU g shares it with at most c experts of the
    # neighbouring layer, so sum_j z[l,i,j,g] <= c x[l,i,g] (and likewise over i)
    for groups in (by_row, by_col):
        for (li, e, g), zcs in groups.items():
            if len(zcs) <= c:
                continue
            rows.extend([r] * (len(zcs) + 1)), cols.extend([*zcs, xi(li, e, g)]), vals.extend([1.0] * len(zcs) + [-c])
            lo.append(-np.inf), hi.append(0)
            r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, nx + nz)).tocsr()
    integrality = np.zeros(nx + nz)
    integrality[:nx] = 1
    lb = np.zeros(nx + nz)
    ub = np.ones(nx + nz)
    # symmetry: GPUs are interchangeable, so number them in order of their smallest first-layer expert;
    # then expert e of the first layer sits on a GPU numbered at most e
    for e in range(min(E, G)):
        for g in range(e + 1, G):
            ub[xi(0, e, g)] = 0
    res = milp(cost, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        raise MoesiftError(f"the placement integer program found no solution ({res.message})")
    x = res.x[:nx].reshape(L, E, G)
    gpu = x.argmax(-1).astype(np.int64)
    info = {"solver": "milp", "status": int(res.status), "optimal": res.status == 0, "message": str(res.message)}
    bound = getattr(res, "mip_dual_bound", None)
    if bound is not None and np.isfinite(bound):
        info["upper_bound_same_hops"] = float(-bound)
    return gpu, info


def affinity_brute(T: np.ndarray, G: int) -> np.ndarray:
    """Exhaustive search over every placement (tiny cases only; for tests)."""
    Lm1, E, _ = T.shape
    L = Lm1 + 1
    c = _cap(E, G)
    per_layer = [p for p in itertools.product(range(G), repeat=E) if max(np.bincount(p, minlength=G)) <= c]
    best, arg = -1.0, None
    for combo in itertools.product(per_layer, repeat=L):
        gpu = np.array(combo)
        v = same_gpu_hops(T, gpu)
        if v > best:
            best, arg = v, gpu
    return arg


def affinity_place(T: np.ndarray, G: int, method: str = "auto", time_limit: float = 30.0) -> tuple[np.ndarray, dict]:
    Lm1, E, _ = T.shape
    n_vars = (Lm1 + 1) * E * G + int((T > 0).sum()) * G
    heur = affinity_heuristic(T, G)
    hv = same_gpu_hops(T, heur)
    bound = affinity_bound(T, G)
    info: dict[str, Any] = {"variables": n_vars}
    gpu = heur
    if method == "milp" or (method == "auto" and n_vars <= MILP_MAX_VARS):
        mg, mi = affinity_milp(T, G, time_limit)
        info.update(mi)
        if same_gpu_hops(T, mg) >= hv:
            gpu = mg
        if mi.get("optimal"):
            bound = same_gpu_hops(T, mg)
        elif "upper_bound_same_hops" in mi:
            bound = min(bound, mi["upper_bound_same_hops"])
    else:
        info.update({"solver": "heuristic", "optimal": False})
    total = float(T.sum())
    cross = total - same_gpu_hops(T, gpu)
    cross_lb = max(0.0, total - bound)
    info["cross_hops_lower_bound"] = cross_lb
    # relative gap (share of the placement's cross hops that an optimum might still save) and the same in
    # points of the hop share; the bound is loose when transitions are sparse, so both are upper estimates
    info["optimality_gap"] = float((cross - cross_lb) / cross) if cross > 0 else 0.0
    info["gap_share_points"] = float((cross - cross_lb) / total) if total > 0 else 0.0
    return gpu, info


# ---------------------------------------------------------------------------------------------------------
# placement maps and the public function
# ---------------------------------------------------------------------------------------------------------


def round_robin(L: int, E: int, G: int) -> np.ndarray:
    """phy2log for expert e on GPU e % G (E slots; the last GPUs hold one fewer when G does not divide E)."""
    per = _cap(E, G)
    p2l = np.full(per * G, -1, dtype=np.int64)
    for e in range(E):
        g, k = e % G, e // G
        p2l[g * per + k] = e
    return np.tile(p2l, (L, 1))


def _phy2log_from_gpu(gpu: np.ndarray, G: int) -> np.ndarray:
    L, E = gpu.shape
    per = _cap(E, G)
    out = np.full((L, per * G), -1, dtype=np.int64)
    for li in range(L):
        for g in range(G):
            ex = np.flatnonzero(gpu[li] == g)
            out[li, g * per : g * per + len(ex)] = ex
    return out


def _sglang_map(phy2log: np.ndarray, trace) -> list[list[int]]:
    """physical_to_logical_map over every decoder layer (dense layers get the trivial map)."""
    moe_layers = [int(x) for x in (trace.model.get("moe_layers") or range(trace.n_layers))]
    n_layers = int(trace.model.get("num_hidden_layers") or (max(moe_layers) + 1))
    if n_layers <= max(moe_layers):
        raise MoesiftError(f"the trace says the model has {n_layers} decoder layers but MoE layer {max(moe_layers)}; "
                           "re-import or re-trace it")
    E = trace.n_experts
    P = phy2log.shape[1]
    trivial = (np.arange(P) % E).tolist()
    rows = [trivial for _ in range(n_layers)]
    for i, dl in enumerate(moe_layers):
        rows[dl] = phy2log[i].tolist()
    return rows


def place(trace, gpus: int, nodes: int = 1, replicas: int = 0, method: str = "balance", out=None,
          json: bool = False, hidden: int | None = None, dtype_bytes: int = 2, time_limit: float = 30.0,
          max_load_ratio: float | None = None, force: bool = False) -> dict[str, Any]:
    """Place experts on ``gpus`` GPUs (``nodes`` nodes) from a trace; write the placement when ``out`` is given.

    ``method="balance"``: EPLB-style replication of hot experts (``replicas`` redundant slots per layer) and
    load-balanced packing. ``method="affinity"``: ExFlow-style placement that keeps experts chained by
    consecutive layers on one GPU (integer program for small sizes, heuristic with its optimality gap for
    large ones); ``max_load_ratio`` then swaps experts within a layer until the busiest GPU carries at most
    that multiple of the mean load, losing as few same-GPU hops as it can. Returns the placement and its
    simulated figures against round-robin placement.
    """
    t0 = time.time()
    tr = trace if isinstance(trace, Trace) else Trace.load(trace)
    L, E, G = tr.n_layers, tr.n_experts, int(gpus)
    nodes, replicas = int(nodes), int(replicas)
    if G < 1 or nodes < 1 or G % nodes:
        raise MoesiftError(f"--gpus {G} must be a positive multiple of --nodes {nodes}")
    if replicas < 0:
        raise MoesiftError("--replicas must be 0 or more")
    if G > E + replicas:
        raise MoesiftError(f"{G} GPUs need at least {G} expert slots per layer; the model has {E} experts, "
                           f"add --replicas {G - E} or more")
    if out is not None:
        check_output_path(out, force, inputs=[] if isinstance(trace, Trace) else [trace])
    if hidden is not None:
        check_int("--hidden", hidden, 1)
    check_int("--dtype-bytes", dtype_bytes, 1)
    if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0):
        raise MoesiftError(f"--time-limit must be a positive number of seconds (got {time_limit!r})")
    if max_load_ratio is not None and not (math.isfinite(max_load_ratio) and max_load_ratio >= 1):
        raise MoesiftError(f"--max-load-ratio must be a number >= 1 (got {max_load_ratio!r})")
    hidden = hidden or tr.model.get("hidden_size")
    hidden = int(hidden) if hidden else None
    if method == "balance":
        phy2log, info = _balance_map(tr, G, nodes, replicas)
    elif method == "affinity":
        phy2log, info = _affinity_map(tr, G, replicas, time_limit, max_load_ratio)
    else:
        raise MoesiftError(f"unknown --method {method!r}; choose balance or affinity")

    sim = simulate_placement(tr, phy2log, G, hidden, dtype_bytes)
    if "max_load_ratio" in info:  # a hot expert alone can exceed the cap: it needs replicas, not swaps
        ratios = sim["load_max_over_mean_per_layer"]
        info["cap_unmet_moe_layers"] = [li for li, x in enumerate(ratios) if x > info["max_load_ratio"] + 1e-9]
        info["worst_layer_load_ratio"] = max(ratios, default=1.0)
    base = simulate_placement(tr, round_robin(L, E, G), G, hidden, dtype_bytes)
    slots = phy2log.shape[1] // G
    placement = _placement_doc(tr, phy2log, G, nodes, method, replicas)
    res: dict[str, Any] = {
        "gpus": G, "nodes": nodes, "replicas": replicas, "method": method, "slots_per_gpu": slots,
        "hidden_size": hidden, "dtype_bytes": dtype_bytes, "solver": info,
        "placement": sim, "round_robin": base,
    }
    for key in ("load_max_over_mean", "cross_gpu_hop_share", "all_to_all_bytes_per_token"):
        if key in sim and key in base:
            res.setdefault("vs_round_robin", {})[key] = {"placed": sim[key], "round_robin": base[key]}
    if out is not None:
        res.update(_write_placement(out, placement, phy2log, tr, force, input_paths(trace)))
    else:
        res["layers"] = placement["layers"]
    res["seconds"] = round(time.time() - t0, 3)
    return res


def _balance_map(tr: Trace, G: int, nodes: int, replicas: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(phy2log [L, E + R], solver info) of the EPLB-style placement."""
    L, E = tr.n_layers, tr.n_experts
    if (E + replicas) % G:
        raise MoesiftError(f"experts + replicas ({E} + {replicas}) must be divisible by --gpus {G}; "
                           f"try --replicas {replicas + (-(E + replicas)) % G}")
    if (E + replicas) % nodes:
        raise MoesiftError(f"experts + replicas ({E + replicas}) must be divisible by --nodes {nodes}")
    if nodes > 1 and E % nodes:
        raise MoesiftError(f"{E} experts cannot be split evenly over {nodes} nodes; use --nodes 1")
    groups = tr.model.get("n_group")
    phy2log = np.stack([balance_layer(tr.counts[li], G, nodes, replicas, groups) for li in range(L)])
    return phy2log, {"solver": "eplb-hierarchical" if nodes > 1 else "eplb-global"}


def _affinity_map(tr: Trace, G: int, replicas: int, time_limit: float,
                  max_load_ratio: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """(phy2log [L, E], solver info) of the ExFlow-style placement, swapped under `max_load_ratio` when given."""
    L, E = tr.n_layers, tr.n_experts
    if replicas:
        raise MoesiftError("--method affinity places each expert once; use --replicas 0 (or --method balance)")
    if E % G:
        raise MoesiftError(f"--method affinity puts E/G experts on each GPU; {E} experts do not divide over "
                           f"{G} GPUs (use --method balance with --replicas {(-E) % G})")
    log = tr.get("routing_log")
    if log is not None and log.shape[0] > 0:
        T = transitions_from_log(log, E)
    elif tr.get("transitions") is not None:
        T = tr.get("transitions").astype(np.int64)
    else:
        raise MoesiftError("--method affinity needs a trace with transitions or a routing log "
                           "(trace with --log-routing)")
    if L < 2:
        raise MoesiftError("--method affinity needs at least two MoE layers")
    gpu, info = affinity_place(T.astype(np.float64), G, time_limit=time_limit)
    if max_load_ratio is not None:
        gpu = rebalance_affinity(T.astype(np.float64), gpu, tr.counts, G, float(max_load_ratio))
        info["max_load_ratio"] = float(max_load_ratio)
    return _phy2log_from_gpu(gpu, G), info


def _placement_doc(tr: Trace, phy2log: np.ndarray, G: int, nodes: int, method: str,
                   replicas: int) -> dict[str, Any]:
    """The placement file's content (`moesift-placement/1`)."""
    L, E = tr.n_layers, tr.n_experts
    slots = phy2log.shape[1] // G
    return {
        "schema": "moesift-placement/1",
        "model": {k: tr.model.get(k) for k in ("name", "model_type", "config_hash", "moe_layers", "n_experts", "top_k")},
        "gpus": G,
        "nodes": nodes,
        "method": method,
        "replicas": replicas,
        "slots_per_gpu": slots,
        "layers": [
            {
                "layer": int((tr.model.get("moe_layers") or list(range(L)))[li]),
                "moe_index": li,
                "physical_to_logical": [int(x) for x in phy2log[li]],
                "gpu_of_expert": {str(e): sorted({int(p // slots) for p in np.flatnonzero(phy2log[li] == e)})
                                  for e in range(E)},
            }
            for li in range(L)
        ],
    }


def _write_placement(out: Any, placement: dict[str, Any], phy2log: np.ndarray, tr: Trace,
                     force: bool, inputs: list[str]) -> dict[str, str]:
    """Write the placement and its SGLang map (PLACEMENT.sglang.json); returns both paths."""
    outp = Path(out)
    sg = outp.with_name(outp.stem + ".sglang.json")
    for p in (outp, sg):
        check_output_path(p, force, inputs=inputs)
    sg_map = _sglang_map(phy2log, tr)
    write_json(outp, placement, force=force, inputs=inputs)
    write_json(sg, {"physical_to_logical_map": sg_map}, force=force, inputs=inputs)
    return {"out": str(outp), "sglang_init_expert_location": str(sg)}


def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout)


def print_placement(res: dict[str, Any], method: str, gpus: int,
                    echo: Callable[..., None] = _echo) -> None:
    """Print a `place` result as `moesift place` does: the figures against round-robin on stdout, notes and
    warnings on stderr (`echo(text, err=...)` writes one line)."""
    echo(f"{method} placement on {gpus} GPUs ({res['slots_per_gpu']} slots each), solver {res['solver'].get('solver')}")
    for k, v in res.get("vs_round_robin", {}).items():
        echo(f"  {k:28s} {v['placed']:12.4f}   round-robin {v['round_robin']:12.4f}")
    if "optimality_gap" in res["solver"]:
        echo(f"  optimality gap (cross hops, upper estimate) {res['solver']['optimality_gap']:.3f}")
    if res["hidden_size"] is None:
        echo("  note: no all-to-all bytes: the trace does not record hidden_size (an older trace, or imported "
             "without --model); pass --hidden", err=True)
    unmet = res["solver"].get("cap_unmet_moe_layers")
    if unmet:
        echo(f"  warning: --max-load-ratio not reachable in MoE layers {unmet} by swaps alone (worst "
             f"{res['solver']['worst_layer_load_ratio']:.3f}); hot experts need replicas (--method balance)",
             err=True)
    if res.get("out"):
        echo(f"wrote {res['out']} and {res['sglang_init_expert_location']} (SGLang --init-expert-location)")


def load_placement(path: str | os.PathLike) -> dict[str, Any]:
    """Read a placement file written by `place`."""
    p = Path(path)
    try:
        d = _json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise MoesiftError(f"cannot read placement {str(p)!r}: {e}") from None
    if d.get("schema") != "moesift-placement/1":
        raise MoesiftError(f"{str(p)!r} is not a moesift placement file")
    return d


__all__ = ["place", "print_placement", "balance_layer", "affinity_place", "affinity_milp", "affinity_brute", "affinity_heuristic",
           "simulate_placement", "round_robin", "load_placement"]
