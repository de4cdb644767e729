"""Scoring calibrated removals without running the block per candidate.

The greedy of calibrated selection asks, for many resident sets R, what the layer's output error
``sum_t ||y_full(x_t) - y_R(x_t)||^2`` is. The block's output is a constant part (shared experts, their
gate) plus the routed part ``sum_k w_k(R) o_{e_k(R)}(x_t)``, where ``o_e(x_t)`` is expert e's unweighted
output on token t and the selection ``e_k(R)`` and weights ``w_k(R)`` come from the router's logits alone.
The constant part cancels in the difference, so

    ||y_full - y_R||^2 = a^T G_t a,  G_t[i, j] = <o_i(x_t), o_j(x_t)>,

with ``a`` the full selection's weights minus R's (at most 2 top-k nonzero entries). So per layer:

1. one block forward on the calibration tokens records the router's logits [T, E] (the family's own
   router, in its own dtype) and what the block hands its experts (ids, weights);
2. every expert runs on every calibration token once, in chunks of tokens whose outputs (chunk x E x H)
   stay under ``CHUNK_BYTES``; each chunk is reduced to its tokens' Gram matrices (products of the
   outputs in float32, or float64 for a float64 block), and only those are kept: T x E x E float32 values
   (4 T E^2 bytes, e.g. 256 MiB for 4,096 tokens and 128 experts; over ``CACHE_BYTES`` the block scorer is
   used). That is the whole cost in expert computations: the lower bound of computing every expert on
   every token once;
3. a candidate R is scored by re-routing its tokens over the stored logits exactly as the router does it
   under the family's restriction (non-resident logits -inf before the scoring, selection biases masked,
   group limits with the group score of the adapter, the family's selection weights: renormalisation,
   routed scaling), then ``a^T G_t a`` over the selection's at most 2K experts: no matmul of the model.

Whether this reproduces the block is checked on every layer, not assumed: the re-routed full selection
must equal the block's (ids exactly, weights to the dtype's rounding), and one restricted block forward
(the most routed expert removed; for group-limited routers also a whole group) must give the same
selections and the same error up to rounding. A layer that fails is scored by running the block
(`BlockScorer`), and its calibration entry says so (``scorer``, ``scorer_note``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from ..arch.spec import expert_args, get_path, has_path, scores_from_logits

CACHE_BYTES = 8 << 30  # bound on the per-token Gram matrices of one layer (T x E x E)
CHUNK_BYTES = 256 << 20  # bound on the expert outputs held at once while the Gram matrices are built


class BlockRunner:
    """Runs one MoE block, restricted or not, and reports the experts each token was routed to."""

    def __init__(self, frame: Any, adapter: Any, spec: Any, layer: int):
        self.frame, self.ad, self.layer = frame, adapter, layer
        self.block = adapter.moe_block(frame, layer)
        self.spec = spec
        self.m = spec.moe_layers.index(layer)
        self.E = spec.n_experts

    def run(self, x: Any, resident: Sequence[int] | None, chunk: int = 8192,
            seen: Callable[[Any, Any], None] | None = None) -> tuple[Any, Any]:
        """(output [n, H] float32, routed ids [n, K]) of the block on x [n, H] restricted to `resident`;
        `seen(ids, weights)` is called with what the block hands its experts, chunk by chunk."""
        import torch

        outs, ids = [], []
        experts = self.ad.experts(self.frame, self.layer)

        def pre(mod, args, kwargs):
            _, i, w = expert_args(args, kwargs)
            ids.append(i.reshape(-1, i.shape[-1]))
            if seen is not None:
                seen(i.reshape(-1, i.shape[-1]), w.reshape(-1, w.shape[-1]))

        h = experts.register_forward_pre_hook(pre, with_kwargs=True)
        ctx = self.ad.restrict(self.frame, {self.layer: list(resident)}) if resident is not None \
            and len(resident) < self.E else contextlib.nullcontext()
        try:
            with ctx, torch.no_grad():
                for s in range(0, x.shape[0], chunk):
                    y = self.block(x[s: s + chunk].unsqueeze(0))
                    y = y[0] if isinstance(y, tuple) else y
                    outs.append(y.reshape(-1, y.shape[-1]).float())
        finally:
            h.remove()
        return torch.cat(outs), torch.cat(ids)


class BlockScorer:
    """Scores a restriction by running the block restricted to it (one block forward per call)."""

    kind = "block"

    def __init__(self, blk: BlockRunner, x: Any, note: str | None = None):
        self.blk, self.x, self.note = blk, x, note
        self.full, self.full_ids = blk.run(x, None)
        self.tok_norm2 = (self.full.double() ** 2).sum(dim=1)
        self.norm2 = float(self.tok_norm2.sum()) or 1.0
        self.forwards = 1

    def rows(self, idx: Any, resident: Sequence[int]) -> tuple[Any, Any]:
        """(squared output error per token [n] float64, routed ids [n, K]) of the tokens `idx` (None: all)
        with the block restricted to `resident`."""
        x = self.x if idx is None else self.x[idx.to(self.x.device)]
        full = self.full if idx is None else self.full[idx]
        out, ids = self.blk.run(x, resident)
        self.forwards += 1
        return ((full - out).double() ** 2).sum(dim=1), ids


class Routing:
    """The router of one MoE block restated on its logits: the experts and weights the block uses for a
    token when only the resident experts may be chosen (the family adapter's restriction)."""

    def __init__(self, adapter: Any, router: Any, spec: Any, weight_dtype: Any):
        self.ad, self.router = adapter, router
        self.E, self.K = spec.n_experts, spec.top_k
        self.scoring = spec.scoring
        self.groups = (int(spec.n_group), int(spec.topk_group or spec.n_group)) \
            if spec.n_group and spec.n_group > 1 else None
        self.gtop = int(adapter.group_score_top)
        self.weight_dtype = weight_dtype
        self.bias = None
        for attr in adapter.bias_attrs:
            b = get_path(router, attr) if has_path(router, attr) else None
            if b is not None:
                self.bias = b.detach().reshape(-1, self.E)[0]

    def route(self, logits: Any, keep: Any) -> tuple[Any, Any]:
        """(ids [n, K], weights [n, K] float64) for logits [n, E] with residents `keep` (bool [E])."""
        import torch

        mask = torch.zeros(self.E, dtype=torch.float32, device=logits.device)
        mask[~keep] = float("-inf")
        probs = scores_from_logits(logits + mask.to(logits.dtype), self.scoring)
        choice = probs
        if self.bias is not None:
            b = self.bias.to(probs.device).clone()
            b[~keep.to(b.device)] = float("-inf")
            choice = probs + b
        if self.groups is not None:
            G, top_g = self.groups
            n, per = choice.shape[0], self.E // G
            gs = choice.view(n, G, per).topk(self.gtop, dim=-1)[0].sum(dim=-1)
            gidx = torch.topk(gs, k=top_g, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
            smask = gmask.unsqueeze(-1).expand(-1, G, per).reshape(n, self.E)
            choice = choice.masked_fill(~smask, float("-inf"))
            ids = torch.topk(choice, k=self.K, dim=-1, sorted=False)[1]
        else:
            ids = torch.topk(choice, k=self.K, dim=-1)[1]
        active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        w = self.ad.selection_weights(self.router, probs, ids, active)
        return ids, w.to(self.weight_dtype).double()


class CachedScorer:
    """Scores restrictions of one MoE layer from its router logits and per-token Gram matrices of the
    expert outputs (see the module docstring). Same interface as `BlockScorer`."""

    kind = "cache"
    note = None

    def __init__(self, routing: Routing, logits: Any, gram: Any, full: Any):
        import torch

        self.routing, self.logits, self.gram = routing, logits, gram
        self.E = routing.E
        self.flat = gram.reshape(-1)
        self.tok_norm2 = (full.double() ** 2).sum(dim=1)
        self.norm2 = float(self.tok_norm2.sum()) or 1.0
        every = torch.ones(self.E, dtype=torch.bool, device=logits.device)
        self.full_ids, self.full_w = routing.route(logits, every)
        self.forwards = 1

    def keep(self, resident: Sequence[int]) -> Any:
        import torch

        k = torch.zeros(self.E, dtype=torch.bool, device=self.logits.device)
        k[torch.as_tensor(list(resident), dtype=torch.long, device=k.device)] = True
        return k

    def rows(self, idx: Any, resident: Sequence[int]) -> tuple[Any, Any]:
        """(squared output error per token [n] float64, routed ids [n, K]) of the tokens `idx` (None: all)
        under the restriction to `resident`."""
        import torch

        if idx is None:
            idx = torch.arange(self.logits.shape[0], device=self.logits.device)
        idx = idx.to(self.logits.device)
        ids, w = self.routing.route(self.logits[idx], self.keep(resident))
        return self.error(idx, self.full_ids[idx], self.full_w[idx], ids, w), ids

    def inner(self, idx: Any, ids_a: Any, w_a: Any, ids_b: Any, w_b: Any) -> Any:
        """<sum_k w_a o_{ids_a}, sum_k w_b o_{ids_b}> per token (float64), from the Gram matrices."""
        import torch

        n, K = ids_a.shape
        E = self.E
        at = (idx * (E * E)).view(n, 1, 1) + ids_a.unsqueeze(-1) * E + ids_b.unsqueeze(1)
        g = self.flat.index_select(0, at.reshape(-1)).view(n, K, ids_b.shape[1]).double()
        return torch.bmm(torch.bmm(w_a.unsqueeze(1), g), w_b.unsqueeze(-1)).reshape(n)

    def error(self, idx: Any, ids_a: Any, w_a: Any, ids_b: Any, w_b: Any) -> Any:
        """||sum_k w_a o_{ids_a} - sum_k w_b o_{ids_b}||^2 per token, from the Gram matrices; an expert in
        both selections gets one coefficient (the difference of its weights: exactly 0 when unchanged)."""
        import torch

        n, K = ids_a.shape
        c = torch.zeros(n, self.E, dtype=torch.float64, device=ids_a.device)
        c.scatter_add_(1, ids_a, w_a).scatter_add_(1, ids_b, -w_b)
        dup = (ids_b.unsqueeze(-1) == ids_a.unsqueeze(1)).any(-1)
        coef = torch.cat([c.gather(1, ids_a), c.gather(1, ids_b).masked_fill(dup, 0.0)], dim=1)
        sup = torch.cat([ids_a, ids_b], dim=1)
        at = (idx * (self.E * self.E)).view(n, 1, 1) + sup.unsqueeze(-1) * self.E + sup.unsqueeze(1)
        g = self.flat.index_select(0, at.reshape(-1)).view(n, 2 * K, 2 * K).double()
        return (torch.bmm(g, coef.unsqueeze(-1)).squeeze(-1) * coef).sum(dim=1).clamp(min=0.0)


class SubsetScorer:
    """A scorer over some of another scorer's tokens (`rows`, indices into them): the greedy of a subset of
    the calibration documents from the one pass (capture, Gram matrices or block) over all of them. Scores are
    the parent's on those tokens, so a subset's greedy is the greedy those tokens alone would give, up to the
    rounding of the batches they were computed in."""

    def __init__(self, parent: Any, rows: Any):
        self.parent = parent
        self.sel = rows.to(parent.full_ids.device)
        self.full_ids = parent.full_ids[self.sel]
        self.tok_norm2 = parent.tok_norm2[self.sel.to(parent.tok_norm2.device)]
        self.norm2 = float(self.tok_norm2.sum()) or 1.0
        self.kind, self.note = parent.kind, parent.note

    @property
    def forwards(self) -> int:
        return self.parent.forwards

    def rows(self, idx: Any, resident: Sequence[int]) -> tuple[Any, Any]:
        """As the parent's `rows`, `idx` indexing this subset's tokens (None: all of them)."""
        return self.parent.rows(self.sel if idx is None else self.sel[idx.to(self.sel.device)], resident)


def expert_grams(adapter: Any, frame: Any, layer: int, x: Any, n_experts: int,
                 chunk_bytes: int = CHUNK_BYTES) -> Any:
    """Per-token Gram matrices [T, E, E] float32 of every expert's unweighted output on x [T, H]: each
    expert runs on each token once, chunk by chunk (chunk x E x H outputs held at once)."""
    import torch

    T, H = x.shape
    E = n_experts
    step = max(1, min(T, chunk_bytes // max(1, E * H * 4)))
    gram = torch.empty(T, E, E, dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for s in range(0, T, step):
            xc = x[s: s + step]
            n = xc.shape[0]
            outs = torch.stack([adapter.expert_output(frame, layer, xc, torch.full((n, 1), e, dtype=torch.long,
                                                                                device=x.device)).reshape(n, H)
                                for e in range(E)], dim=1)  # [n, E, H]
            if outs.dtype != torch.float64:
                outs = outs.float()
            gram[s: s + n] = torch.bmm(outs, outs.transpose(1, 2))
            del outs
    return gram


def cached_or_block(blk: BlockRunner, x: Any, cache_bytes: int = CACHE_BYTES) -> Any:
    """A `CachedScorer` for this layer when it reproduces the block on the calibration tokens, else a
    `BlockScorer` whose note says why."""
    import torch

    T, E = x.shape[0], blk.E
    if T * E * E * 4 > cache_bytes:
        return BlockScorer(blk, x, note=f"Gram matrices ({T * E * E * 4 / 2**30:.1f} GiB) over the cache bound")
    ad, frame, layer = blk.ad, blk.frame, blk.layer
    logits, seen = [], []
    router = ad.router(frame, layer)

    def post(mod, args, output):
        logits.append(ad.router_logits(mod, output).detach())

    h = router.register_forward_hook(post)
    try:
        full, ids = blk.run(x, None, seen=lambda i, w: seen.append((i, w)))
    finally:
        h.remove()
    bad = _capture_problem(logits, seen, T, E)
    if bad:
        return _fallback(blk, x, full, ids, bad)
    lg = torch.cat(logits)
    cap_ids = torch.cat([i for i, _ in seen])
    cap_w = torch.cat([w for _, w in seen])
    routing = Routing(ad, router, blk.spec, cap_w.dtype)
    gram = expert_grams(ad, frame, layer, x, E)
    sc = CachedScorer(routing, lg, gram, full)
    bad = _selection_mismatch(sc.full_ids, sc.full_w, cap_ids, cap_w)
    if not bad:
        bad = _probe_mismatch(blk, x, sc, full, cap_ids)
    if bad:
        del gram, sc
        return _fallback(blk, x, full, ids, bad)
    sc.forwards = 1 + len(_probes(blk, cap_ids))
    return sc


def make_scorer(blk: BlockRunner, x: Any, scorer: Any = "cache") -> Any:
    """The scorer `greedy_layer` uses: "cache" (the cached scorer, or the block scorer with a note saying
    why where the cache does not reproduce the block), "block", or a scorer object as it is."""
    if not isinstance(scorer, str):
        return scorer
    if scorer == "block":
        return BlockScorer(blk, x)
    if scorer != "cache":
        raise ValueError(f"unknown scorer {scorer!r}: cache or block")
    return cached_or_block(blk, x)


def _fallback(blk: BlockRunner, x: Any, full: Any, ids: Any, why: str) -> BlockScorer:
    sc = BlockScorer.__new__(BlockScorer)
    sc.blk, sc.x, sc.note = blk, x, f"block forward per candidate: {why}"
    sc.full, sc.full_ids = full, ids
    sc.tok_norm2 = (full.double() ** 2).sum(dim=1)
    sc.norm2 = float(sc.tok_norm2.sum()) or 1.0
    sc.forwards = 1
    return sc


def _capture_problem(logits: list, seen: list, T: int, E: int) -> str | None:
    """Why the router / experts calls seen in the full forward cannot be restated (None when they can)."""
    if not logits or not seen:
        return "the router's logits or the experts' inputs were not seen"
    n = sum(int(t.shape[0]) for t in logits)
    if n != T or any(t.dim() != 2 or t.shape[1] != E for t in logits):
        return "the router's output is not one row of logits over every expert per token"
    if sum(int(i.shape[0]) for i, _ in seen) != T:
        return "the experts were not handed one selection per token"
    return None


def _selection_mismatch(ids: Any, w: Any, cap_ids: Any, cap_w: Any) -> str | None:
    """Whether the re-routed selection (ids, weights) differs from what the block handed its experts."""
    import torch

    if ids.shape != cap_ids.shape:
        return "the block selects another number of experts per token"
    a, ia = ids.sort(dim=1)
    b, ib = cap_ids.long().sort(dim=1)
    if not torch.equal(a, b.to(a.device)):
        return "the re-routed selection differs from the block's"
    wa = w.gather(1, ia)
    wb = cap_w.double().to(wa.device).gather(1, ib.to(wa.device))
    tol = 1e-5 if cap_w.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(wa, wb, rtol=tol, atol=tol * 1e-2):
        return "the re-routed weights differ from the block's"
    return None


def _probes(blk: BlockRunner, cap_ids: Any) -> list[list[int]]:
    """Restrictions the check runs through the block: without the most routed expert; for group-limited
    routers also without the most routed expert's group."""
    import torch

    used = torch.bincount(cap_ids.reshape(-1).long().cpu(), minlength=blk.E)
    top = int(used.argmax())
    out = [[top]]
    spec = blk.spec
    if spec.n_group and spec.n_group > 1:
        per = blk.E // spec.n_group
        g = top // per
        out.append(list(range(g * per, (g + 1) * per)))
    return out


def _probe_mismatch(blk: BlockRunner, x: Any, sc: CachedScorer, full: Any, cap_ids: Any) -> str | None:
    """Whether a restricted block forward (see `_probes`) differs from the cached scorer's account of it:
    another selection on any token, or another total error beyond rounding."""
    import torch

    for gone in _probes(blk, cap_ids):
        R = sorted(set(range(blk.E)) - set(gone))
        out, ids = blk.run(x, R)
        err_blk = ((full - out).double() ** 2).sum(dim=1)
        err_sc, ids_sc = sc.rows(None, R)
        if not torch.equal(ids_sc.sort(dim=1)[0], ids.long().sort(dim=1)[0].to(ids_sc.device)):
            return f"the selection without experts {gone[:4]} differs from the block's"
        tol = 1e-4 if full.dtype == torch.float32 and x.dtype in (torch.float32, torch.float64) else 5e-2
        a, b = float(err_sc.sum()), float(err_blk.sum())
        if abs(a - b) > tol * max(a, b) + 1e-9 * sc.norm2:
            return f"the error without experts {gone[:4]} is {a:.6g} here, {b:.6g} in the block"
    return None
