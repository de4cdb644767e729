"""On-device routing statistics, computed off the critical path: the MoE layers' hooks only keep references,
and every statistic of every layer is computed in one batched pass per forward (or per run of decode steps).

Per forward the caller states which tokens are real (``begin_forward``: a validity mask from the
attention mask, the fold of each batch row and the phase, prefill or decode). The MoE blocks see their
input flattened row-major as ``[batch * seq, H]``, so token ``t = b * seq + s``; the mask is flattened the
same way.

Per MoE layer the hooks (``on_route``, ``on_logits``) launch nothing: they keep references to the router's
selected ids, its routing weights and its logits (probabilities, softmax or sigmoid per the spec's
scoring, are computed for all layers at once in the pass). Holding a reference is
safe with PyTorch's caching allocator (a block is reused only once no tensor refers to it) and the
recorder never writes to these tensors. ``end_forward`` (or the next ``begin_forward`` once
``flush_tokens`` tokens are pending, so a run of decode steps shares one pass) then computes, for a chunk
of layers at a time (at most ``chunk_elements`` one-hot entries):

- ``oh[l, t, e]`` = 1 when real token t selected expert e at MoE layer l (one ``scatter_``)
- counts per (phase, fold, expert): ``M^T @ oh`` with ``M[t, phase * F + fold] = 1`` for real tokens
- co-activation ``oh_l^T @ oh_l`` and transitions ``oh_{l-1}^T @ oh_l`` (two batched matmuls)
- router-weight mass and selected-probability mass: one ``index_add_`` each over all layers; the
  router-probability mass: one batched matrix-vector product (``valid @ probs``)

That is the accelerator pass (``batched``). On the CPU, where launches cost nothing but dense one-hot
products cost E x (2F + 2E) multiply-adds per token and layer, the pass goes layer by layer and counts
sparsely: integer bincounts of the (phase/fold, id), (id, id) and (previous id, id) pairs of the real
tokens, K^2 increments per token. Both passes give the same statistics.

Counts are exact: float32 sums of 0/1 products are exact below 2^24 per pass, and they are added into
int64 totals. Nothing calls ``.item()`` or ``.cpu()`` before ``to_arrays``, so the device never waits
for the host. The optional routing log is built in the same pass (int16 on the device) and copied to the
host once per ``pop_log``. Saliency (``want_saliency``) runs the experts inside the hook, as it must see
the layer's hidden states; it stays per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arch.spec import MoESpec, scores_from_logits


@dataclass
class _Forward:
    batch: int
    seq: int
    phase: int
    valid: Any  # bool [T] on the device
    pf: Any  # long [T] on the device: phase * F + fold of each token
    ids: list = field(default_factory=list)  # per MoE layer: [T, K] (a reference to the router's tensor)
    weights: list = field(default_factory=list)
    probs: list = field(default_factory=list)  # per MoE layer: router logits [T, E] (probabilities: at the pass)
    valid_f: Any = None  # float32 [T], saliency only


class Recorder:
    """Accumulate routing statistics of the MoE layers of `spec` on `device`.

    ``folds``: documents dealt into F folds (the caller passes each batch row's fold). ``want_coact`` /
    ``want_transitions``: co-activation within a layer / transitions between consecutive MoE layers.
    ``want_saliency``: REAP-style gate weight x ||expert output||_2 per routed pair (needs the model's
    adapter, see ``attach``). ``log_routing``: keep every token's selected ids (int16).
    ``flush_tokens``: pending real-or-padding tokens after which ``begin_forward`` runs the batched pass
    (decode steps are batched until then); ``chunk_elements``: largest one-hot block of one pass;
    ``batched``: all layers per kernel (default on accelerators) or layer by layer (default on the CPU,
    where kernel launches cost nothing and stacking layers costs copies); both give the same statistics.
    """

    def __init__(
        self,
        spec: MoESpec,
        device: Any,
        folds: int,
        want_coact: bool = True,
        want_transitions: bool = True,
        want_saliency: bool = False,
        log_routing: bool = False,
        flush_tokens: int = 4096,
        chunk_elements: int = 1 << 25,
        batched: bool | None = None,
    ) -> None:
        import torch

        if folds < 1:
            raise ValueError("folds must be >= 1")
        self.spec = spec
        self.device = torch.device(device)
        self.L = len(spec.moe_layers)
        self.E = int(spec.n_experts)
        self.K = int(spec.top_k)
        self.F = int(folds)
        self.want_coact = want_coact
        self.want_transitions = want_transitions and self.L > 1
        self.want_saliency = want_saliency
        self.log_routing = log_routing
        self.flush_tokens = int(flush_tokens)
        self.chunk_elements = int(chunk_elements)
        self.batched = self.device.type != "cpu" if batched is None else bool(batched)
        L, E, F = self.L, self.E, self.F
        i64 = dict(dtype=torch.int64, device=self.device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(L, 2 * F, E, **i64)  # [layer, phase * F + fold, expert]
        self.coact = torch.zeros(L, E, E, **i64) if want_coact else None
        self.trans = torch.zeros(max(L - 1, 0), E, E, **i64) if self.want_transitions else None
        self.weight_mass = torch.zeros(L, E, **f64)
        self.prob_mass = torch.zeros(L, E, **f64)
        self.selected_prob_mass = torch.zeros(L, E, **f64)
        self.tokens = torch.zeros(2, **i64)  # real tokens by phase
        if want_saliency:
            self.sal_sum = torch.zeros(L, E, **f64)
            self.sal_count = torch.zeros(L, E, **i64)
        self._fw: _Forward | None = None
        self._pending: list[_Forward] = []
        self._pending_tokens = 0
        self._seen_probs = False
        self._logs: list[tuple[list[_Forward], Any]] = []  # (forwards, int16 [T, L, K] on the device)
        self._busy = False  # re-entrancy guard (saliency runs the experts inside the hook)
        self._model = None
        self._adapter = None

    # ---- wiring -----------------------------------------------------------------------------------
    def attach(self, model: Any, adapter: Any) -> list[Any]:
        """Install the adapter's routing hooks on `model`; returns the handles (``.remove()`` each)."""
        self._model, self._adapter = model, adapter
        return adapter.attach_recorder(model, self.on_route, self.on_logits, want_hidden=self.want_saliency)

    def begin_forward(self, valid: Any, fold: Any, phase: int) -> None:
        """Before a forward: `valid` bool [B, S] (False = padding / finished), `fold` long [B], phase 0 =
        prefill, 1 = decode. Tensors may live anywhere; they are moved to the recorder's device."""
        if self._pending_tokens >= self.flush_tokens:
            self._flush()
        valid = valid.to(self.device, non_blocking=True)
        B, S = valid.shape
        v = valid.reshape(B * S).bool()
        fold = fold.to(self.device, non_blocking=True).long()
        pf = (fold + phase * self.F).repeat_interleave(S) if S > 1 else fold + phase * self.F
        none = [None] * self.L
        fw = _Forward(B, S, phase, v, pf, list(none), list(none), list(none))
        if self.want_saliency:
            import torch

            fw.valid_f = v.to(torch.float32)
        self._fw = fw
        self._pending.append(fw)
        self._pending_tokens += B * S

    def end_forward(self) -> None:
        self._flush()
        self._fw = None

    # ---- hooks: references only ---------------------------------------------------------------------
    def on_route(self, m: int, route: Any) -> None:
        fw = self._fw
        if self._busy or fw is None:
            return
        ids = route.ids
        if ids.dim() != 2:  # (a view; routers mostly return [T, K] already, and a reshape costs a call)
            ids = ids.reshape(-1, ids.shape[-1])
        if ids.shape[0] != fw.batch * fw.seq:
            raise RuntimeError(
                f"MoE layer {m}: router saw {ids.shape[0]} tokens, expected {fw.batch * fw.seq} (batch x sequence)"
            )
        fw.ids[m] = ids
        w = route.weights
        if w is not None:
            if w.dim() != 2:
                w = w.reshape(-1, ids.shape[1])
            fw.weights[m] = w
        if self.want_saliency and route.hidden is not None and w is not None:
            self._saliency(m, route.hidden, ids, w, fw.valid_f)

    def on_logits(self, m: int, logits: Any) -> None:
        """Router logits [T, E] of MoE layer `m` (probabilities are computed in the batched pass)."""
        fw = self._fw
        if self._busy or fw is None:
            return
        fw.probs[m] = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
        self._seen_probs = True

    on_logits.wants_logits = True  # type: ignore[attr-defined]  # the adapter passes raw logits

    def _saliency(self, m: int, hidden: Any, ids: Any, w: Any, vf: Any) -> None:
        import torch

        ids = ids.to(self.device, non_blocking=True).long()
        w = w.to(self.device, non_blocking=True)
        layer = self.spec.moe_layers[m]
        h = hidden.reshape(-1, hidden.shape[-1])
        K = ids.shape[-1]
        self._busy = True
        try:
            with torch.no_grad():
                out = self._adapter.expert_output(
                    self._model, layer, h.repeat_interleave(K, dim=0), ids.reshape(-1).to(h.device)
                )
        finally:
            self._busy = False
        norms = out.float().norm(dim=-1).to(self.device).reshape(-1, K)
        flat = ids.reshape(-1)
        self.sal_sum[m].index_add_(0, flat, (norms * w.float() * vf[:, None]).reshape(-1).to(torch.float64))
        self.sal_count[m].index_add_(0, flat, vf[:, None].expand(-1, K).reshape(-1).long())

    # ---- the batched pass -----------------------------------------------------------------------------
    def _gather(self, fws: list[_Forward], name: str, m: int, T: int, K: int, fill: float) -> Any:
        """Layer `m`'s per-token tensor `name` of the pending forwards, on the recorder's device, [T, K]
        (probabilities for "probs"); a forward that did not report it contributes `fill`."""
        import torch

        xs = [getattr(f, name)[m] for f in fws]
        if name == "probs" and all(x is not None for x in xs):  # one softmax for all the forwards
            x = xs[0] if len(xs) == 1 else torch.cat([x.to(self.device, non_blocking=True) for x in xs])
            return scores_from_logits(x.to(self.device, non_blocking=True), self.spec.scoring)
        parts = []
        for f, x in zip(fws, xs, strict=True):
            if x is None:
                dt = torch.int64 if name == "ids" else torch.float32
                x = torch.full((f.batch * f.seq, K), fill, dtype=dt, device=self.device)
            else:
                x = x.to(self.device, non_blocking=True)
                if name == "ids":
                    x = x.long()
                    if x.shape[1] < K:  # fewer selections at this layer: pad with the sentinel E
                        x = torch.cat([x, x.new_full((x.shape[0], K - x.shape[1]), self.E)], 1)
                else:
                    x = scores_from_logits(x, self.spec.scoring) if name == "probs" else x.float()
                    if x.shape[1] < K:
                        x = torch.cat([x, x.new_zeros((x.shape[0], K - x.shape[1]))], 1)
            parts.append(x)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _stack(self, fws: list[_Forward], name: str, layers: range, T: int, K: int, fill: float) -> Any:
        """[len(layers), T, K] of `name` (ids: int64; otherwise float32): one stack (and one cast) when a
        single forward reported every layer alike, else per layer."""
        import torch

        if len(fws) == 1:
            xs = [getattr(fws[0], name)[m] for m in layers]
            if all(x is not None for x in xs) and len({(x.device, x.dtype, x.shape[1]) for x in xs}) == 1 \
                    and xs[0].device == self.device and xs[0].shape[1] == K:
                out = torch.stack(xs)
                if name == "probs":
                    return scores_from_logits(out, self.spec.scoring)
                return out.long() if name == "ids" else out.float()
        return torch.stack([self._gather(fws, name, m, T, K, fill) for m in layers])

    def _flush(self) -> None:
        """Every statistic of every layer for the pending forwards, in a few batched kernels."""
        import torch

        fws, self._pending, self._pending_tokens = self._pending, [], 0
        if not fws:
            return
        L, E, F = self.L, self.E, self.F
        T = sum(f.batch * f.seq for f in fws)
        valid = fws[0].valid if len(fws) == 1 else torch.cat([f.valid for f in fws])
        pf = fws[0].pf if len(fws) == 1 else torch.cat([f.pf for f in fws])
        vf = valid.to(torch.float32)
        M = torch.zeros(T, 2 * F, dtype=torch.float32, device=self.device)
        M.scatter_(1, pf[:, None], vf[:, None])
        self.tokens += M.sum(0).reshape(2, F).sum(1).to(torch.int64)
        Ks = {f.ids[m].shape[1] for f in fws for m in range(L) if f.ids[m] is not None}
        if not Ks:
            return
        K = max(Ks)
        pad = len(Ks) > 1 or any(f.ids[m] is None for f in fws for m in range(L))
        width = E + 1 if pad else E  # column E collects the padding sentinel
        has_w = any(f.weights[m] is not None for f in fws for m in range(L))
        has_p = any(f.probs[m] is not None for f in fws for m in range(L))
        log = torch.full((T, L, K), -1, dtype=torch.int16, device=self.device) if self.log_routing else None
        if self.batched:
            self._pass_batched(fws, T, K, width, pad, vf, M, has_w, has_p, log)
        else:
            self._pass_per_layer(fws, T, K, width, pad, vf, M, has_w, has_p, log, pf)
        if log is not None:
            self._logs.append((fws, log))

    def _pass_batched(self, fws: list[_Forward], T: int, K: int, width: int, pad: bool, vf: Any, M: Any,
                      has_w: bool, has_p: bool, log: Any) -> None:
        """All layers at once, a chunk of layers per batched kernel (accelerators: few launches)."""
        import torch

        L, E = self.L, self.E
        per = max(1, self.chunk_elements // max(1, T * width))
        prev = None  # one-hot of the layer before the chunk (transitions)
        for a in range(0, L, per):
            layers = range(a, min(L, a + per))
            nl = len(layers)
            ids = self._stack(fws, "ids", layers, T, K, E)  # [nl, T, K]
            oh = torch.zeros(nl, T, width, dtype=torch.float32, device=self.device)
            oh.scatter_(2, ids, vf[None, :, None].expand(nl, T, K))
            if pad:
                oh = oh[:, :, :E]
            self.counts[a : a + nl] += torch.matmul(M.T, oh).to(torch.int64)
            if self.want_coact:
                self.coact[a : a + nl] += torch.bmm(oh.transpose(1, 2), oh).to(torch.int64)
            if self.want_transitions:
                if nl > 1:
                    self.trans[a : a + nl - 1] += torch.bmm(oh[:-1].transpose(1, 2), oh[1:]).to(torch.int64)
                if prev is not None:
                    self.trans[a - 1] += (prev.T @ oh[0]).to(torch.int64)
                prev = oh[-1]
            flat = (ids + torch.arange(nl, device=self.device)[:, None, None] * width).reshape(-1)
            vk = vf[None, :, None]
            if has_w:
                w = self._stack(fws, "weights", layers, T, K, 0.0)
                self._index_add(self.weight_mass, a, nl, width, flat, (w * vk).reshape(-1))
            if has_p:
                p = self._stack(fws, "probs", layers, T, E, 0.0)  # [nl, T, E]
                self.prob_mass[a : a + nl] += torch.matmul(vf, p).to(torch.float64)
                sel = p.gather(2, ids.clamp(max=E - 1) if pad else ids) * vk
                self._index_add(self.selected_prob_mass, a, nl, width, flat, sel.reshape(-1))
            if log is not None:
                lg = ids.to(torch.int16).permute(1, 0, 2)
                log[:, a : a + nl] = lg.masked_fill(lg == E, -1) if pad else lg

    def _pass_per_layer(self, fws: list[_Forward], T: int, K: int, width: int, pad: bool, vf: Any, M: Any,
                        has_w: bool, has_p: bool, log: Any, pf: Any) -> None:
        """Layer by layer with sparse counting (the CPU: launches are free, dense one-hot products are not):
        counts, co-activation and transitions are integer bincounts of (phase/fold, id), (id, id) within a
        token and (previous id, id) pairs of the real tokens: K^2 increments per token instead of a
        [T, E] x [E, E] product. Router top-k ids are distinct within a token, as the one-hot assumes."""
        import torch

        L, E, F2 = self.L, self.E, 2 * self.F
        f32 = dict(dtype=torch.float32, device=self.device)
        wm = torch.zeros(L, width, **f32)
        pm = torch.zeros(L, E, **f32)
        spm = torch.zeros(L, width, **f32)
        vk = vf[:, None]
        real = vf > 0
        pfr = pf[real][:, None] * width
        prev = None
        for m in range(L):
            ids = self._gather(fws, "ids", m, T, K, E)
            r = ids[real]  # [Tr, K]
            c = torch.bincount((pfr + r).reshape(-1), minlength=F2 * width)
            self.counts[m] += c[: F2 * width].view(F2, width)[:, :E]
            if self.want_coact:
                c = torch.bincount((r[:, :, None] * width + r[:, None, :]).reshape(-1), minlength=width * width)
                self.coact[m] += c[: width * width].view(width, width)[:E, :E]
            if self.want_transitions and prev is not None:
                c = torch.bincount((prev[:, :, None] * width + r[:, None, :]).reshape(-1), minlength=width * width)
                self.trans[m - 1] += c[: width * width].view(width, width)[:E, :E]
            prev = r
            flat = ids.reshape(-1)
            if has_w:
                w = self._gather(fws, "weights", m, T, K, 0.0)
                wm[m].index_add_(0, flat, (w * vk).reshape(-1))
            if has_p:
                p = self._gather(fws, "probs", m, T, E, 0.0)
                pm[m].addmv_(p.T, vf)
                spm[m].index_add_(0, flat, (p.gather(1, ids.clamp(max=E - 1) if pad else ids) * vk).reshape(-1))
            if log is not None:
                lg = ids.to(torch.int16)
                log[:, m] = lg.masked_fill(lg == E, -1) if pad else lg
        if has_w:
            self.weight_mass += wm[:, :E]
        if has_p:
            self.prob_mass += pm
            self.selected_prob_mass += spm[:, :E]

    def _index_add(self, total: Any, a: int, nl: int, width: int, flat: Any, vals: Any) -> None:
        """total[a : a + nl] += per-(layer, expert) sums of `vals` at the flat indices layer * width + id."""
        import torch

        acc = torch.zeros(nl * width, dtype=torch.float64, device=self.device)
        acc.index_add_(0, flat, vals.to(torch.float64))
        total[a : a + nl] += acc.reshape(nl, width)[:, : self.E]

    # ---- results ----------------------------------------------------------------------------------
    def pop_log(self) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
        """The routing log of the forwards since the last call, copied to the host at once:
        [(batch, seq, phase, valid bool [T], ids int16 [T, L, K])]."""
        import torch

        self._flush()
        logs, self._logs = self._logs, []
        if not logs:
            return []
        fws = [f for fs, _ in logs for f in fs]
        ids = torch.cat([lg for _, lg in logs]).cpu().numpy()
        valid = torch.cat([f.valid for f in fws]).cpu().numpy()
        out, o = [], 0
        for f in fws:
            T = f.batch * f.seq
            out.append((f.batch, f.seq, f.phase, valid[o : o + T], ids[o : o + T]))
            o += T
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Statistics as host arrays named as in the trace file (see moesift.tracefile)."""
        self._flush()
        L, E, F = self.L, self.E, self.F
        pf = self.counts.cpu().numpy().reshape(L, 2, F, E)
        out: dict[str, np.ndarray] = {
            "prefill_counts": pf[:, 0].sum(axis=1),
            "decode_counts": pf[:, 1].sum(axis=1),
            "fold_counts": np.ascontiguousarray(pf.sum(axis=1).transpose(1, 0, 2)),
            "weight_mass": self.weight_mass.cpu().numpy(),
        }
        if self._seen_probs:
            out["prob_mass"] = self.prob_mass.cpu().numpy()
            out["selected_prob_mass"] = self.selected_prob_mass.cpu().numpy()
        if self.want_coact:
            co = self.coact.cpu().numpy()
            idx = np.arange(E)
            co[:, idx, idx] = 0
            out["coactivation"] = co
        if self.want_transitions:
            out["transitions"] = self.trans.cpu().numpy()
        if self.want_saliency:
            out["saliency_sum"] = self.sal_sum.cpu().numpy()
            out["saliency_count"] = self.sal_count.cpu().numpy()
        return out

    def token_counts(self) -> tuple[int, int]:
        """(prefill, decode) real tokens seen (one host copy)."""
        self._flush()
        t = self.tokens.cpu().tolist()
        return int(t[0]), int(t[1])
