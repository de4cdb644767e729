"""The per-layer recorder moesift used before its batched one, kept as a reference for tests/test_recorder.py:
the same statistics with one small fused update per MoE layer, on the critical path.

Per forward the caller states which tokens are real (``begin_forward``: a validity mask from the
attention mask, the fold of each batch row and the phase, prefill or decode). The MoE blocks see their
input flattened row-major as ``[batch * seq, H]``, so token ``t = b * seq + s``; the mask is flattened the
same way.

Per MoE layer ``l`` (``on_route``) the recorder writes the one-hot of the selected experts of every real
token into a preallocated float32 matrix ``X = [M | slot_0 | slot_1]`` of shape ``[T, 2F + 2E]``, where
``M[t, phase * F + fold] = 1`` for real tokens, and slot ``l % 2`` holds the current layer's one-hot (the
other slot still holds layer ``l - 1``'s). A single matmul ``X^T @ onehot_l`` then gives, exactly
(integers < 2^24 in float32) and without atomics:

- rows ``M``: selections per (phase, fold, expert)        -> prefill / decode / fold counts
- rows of the current slot: co-activation (diagonal = counts, dropped at the end)
- rows of the other slot: transitions from layer ``l - 1`` (all K x K pairs of a token)

and is accumulated into the forward's float32 sums with one fused ``addmm_``. Router-weight mass is one
``index_add_`` of the weights (padding masked to zero); router-probability mass one ``addmv_`` (``probs^T
@ valid``); selected-probability mass one ``gather`` of the router probabilities at the selected ids and
one ``index_add_`` (the probabilities and the ids of a layer arrive in either order; the first is held
until the second). The forward's sums are added into float64 totals once per forward. Nothing calls
``.item()``, ``.cpu()`` or boolean indexing per layer, so the device never waits for the host. The
optional routing log stashes ids as int16 on the device; the caller copies it once per batch
(``pop_log``). ``to_arrays()`` copies the statistics to the host once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesift.arch.spec import MoESpec


@dataclass
class _Forward:
    batch: int
    seq: int
    phase: int
    valid: Any  # bool [T] on the device
    log: Any = None  # int16 [T, L, K] on the device


class Recorder:
    """Accumulate routing statistics of the MoE layers of `spec` on `device`.

    ``folds``: documents dealt into F folds (the caller passes each batch row's fold). ``want_coact`` /
    ``want_transitions``: co-activation within a layer / transitions between consecutive MoE layers.
    ``want_saliency``: REAP-style gate weight x ||expert output||_2 per routed pair (needs the model's
    adapter, see ``attach``). ``log_routing``: keep every token's selected ids (int16).
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
        self.n_slots = 2 if self.want_transitions else 1
        self.R = 2 * self.F + self.n_slots * self.E
        f64 = dict(dtype=torch.float64, device=self.device)
        f32 = dict(dtype=torch.float32, device=self.device)
        # float64 totals, and float32 sums of the current forward (exact: integers < 2^24 per forward),
        # added into the totals once per forward so each layer's update is a single fused addmm / addmv
        self.acc = torch.zeros(self.L, self.R, self.E, **f64)
        self.weight_mass = torch.zeros(self.L, self.E, **f64)
        self.prob_mass = torch.zeros(self.L, self.E, **f64)
        self.selected_prob_mass = torch.zeros(self.L, self.E, **f64)
        self._acc32 = torch.zeros(self.L, self.R, self.E, **f32)
        self._wm32 = torch.zeros(self.L, self.E, **f32)
        self._pm32 = torch.zeros(self.L, self.E, **f32)
        self._spm32 = torch.zeros(self.L, self.E, **f32)
        self._held: dict[int, tuple[str, Any]] = {}  # MoE layer -> ("probs" | "ids", tensor) of this forward
        self._dirty = False
        self.tokens = torch.zeros(2, dtype=torch.int64, device=self.device)  # real tokens by phase
        if want_saliency:
            self.sal_sum = torch.zeros(self.L, self.E, **f64)
            self.sal_count = torch.zeros(self.L, self.E, dtype=torch.int64, device=self.device)
        self._fw: _Forward | None = None
        self._X = None
        self._valid_f = None
        self._seen_probs = False
        self._forwards: list[_Forward] = []
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
        import torch

        self._flush()
        valid = valid.to(self.device, non_blocking=True).bool()
        B, S = valid.shape
        T = B * S
        v = valid.reshape(T)
        vf = v.to(torch.float32)
        fold = fold.to(self.device, non_blocking=True).long()
        X = torch.zeros(T, self.R, dtype=torch.float32, device=self.device)
        pf = (phase * self.F + fold).repeat_interleave(S)  # [T]
        X[:, : 2 * self.F].scatter_(1, pf[:, None], vf[:, None])
        self._X, self._valid_f = X, vf
        self.tokens[phase] += v.sum()
        fw = _Forward(B, S, phase, v)
        if self.log_routing:
            fw.log = torch.full((T, self.L, self.K), -1, dtype=torch.int16, device=self.device)
            self._forwards.append(fw)
        self._fw = fw
        self._held = {}
        self._dirty = True

    def end_forward(self) -> None:
        self._flush()
        self._fw, self._X, self._valid_f = None, None, None
        self._held = {}

    def _flush(self) -> None:
        """Add the current forward's float32 sums into the float64 totals (a few kernels per forward)."""
        if not self._dirty:
            return
        for total, part in ((self.acc, self._acc32), (self.weight_mass, self._wm32), (self.prob_mass, self._pm32),
                            (self.selected_prob_mass, self._spm32)):
            total += part
            part.zero_()
        self._dirty = False

    # ---- hooks ------------------------------------------------------------------------------------
    def on_route(self, m: int, route: Any) -> None:
        if self._busy or self._fw is None:
            return
        ids = route.ids
        K = ids.shape[-1]
        ids = ids.reshape(-1, K)
        T = self._X.shape[0]
        if ids.shape[0] != T:
            raise RuntimeError(
                f"MoE layer {m}: router saw {ids.shape[0]} tokens, expected {T} (batch x sequence)"
            )
        if ids.device != self.device:
            ids = ids.to(self.device, non_blocking=True)
        ids = ids.long()
        vf = self._valid_f
        E, F2 = self.E, 2 * self.F
        s = m % self.n_slots
        oh = self._X[:, F2 + s * E : F2 + (s + 1) * E]
        oh.zero_()
        oh.scatter_(1, ids, vf[:, None].expand(T, K))
        self._acc32[m].addmm_(self._X.T, oh)
        w = route.weights
        if w is not None:
            w = w.reshape(-1, K)
            if w.device != self.device:
                w = w.to(self.device, non_blocking=True)
            self._wm32[m].index_add_(0, ids.reshape(-1), (w.float() * vf[:, None]).reshape(-1))
        if self.log_routing:
            self._fw.log[:, m, :K].copy_(ids)
        self._pair(m, "ids", ids)
        if self.want_saliency and route.hidden is not None and w is not None:
            self._saliency(m, route.hidden, ids, w, vf)

    def on_logits(self, m: int, probs: Any) -> None:
        if self._busy or self._fw is None:
            return
        p = probs.reshape(-1, probs.shape[-1])
        if p.device != self.device:
            p = p.to(self.device, non_blocking=True)
        p = p.float()
        self._pm32[m].addmv_(p.T, self._valid_f)
        self._seen_probs = True
        self._pair(m, "probs", p)

    def _pair(self, m: int, kind: str, t: Any) -> None:
        """Selected-probability mass of layer `m` once both its probabilities and its ids are in."""
        other = self._held.pop(m, None)
        if other is None or other[0] == kind:
            self._held[m] = (kind, t)
            return
        probs, ids = (t, other[1]) if kind == "probs" else (other[1], t)
        if probs.shape[0] != ids.shape[0]:
            return
        sel = probs.gather(1, ids) * self._valid_f[:, None]
        self._spm32[m].index_add_(0, ids.reshape(-1), sel.reshape(-1))

    def _saliency(self, m: int, hidden: Any, ids: Any, w: Any, vf: Any) -> None:
        import torch

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
        self.sal_sum[m].index_add_(0, flat, (norms * w.float() * vf[:, None]).reshape(-1).to(torch_float64()))
        self.sal_count[m].index_add_(0, flat, vf[:, None].expand(-1, K).reshape(-1).long())

    # ---- results ----------------------------------------------------------------------------------
    def pop_log(self) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
        """The routing log of the forwards since the last call, copied to the host at once:
        [(batch, seq, phase, valid bool [T], ids int16 [T, L, K])]."""
        import torch

        fws, self._forwards = self._forwards, []
        if not fws:
            return []
        logs = torch.cat([f.log for f in fws]).cpu().numpy()
        valid = torch.cat([f.valid for f in fws]).cpu().numpy()
        out, o = [], 0
        for f in fws:
            T = f.batch * f.seq
            out.append((f.batch, f.seq, f.phase, valid[o : o + T], logs[o : o + T]))
            o += T
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Statistics as host arrays named as in the trace file (see moesift.formats.trace)."""
        self._flush()
        L, E, F = self.L, self.E, self.F
        acc = self.acc.cpu().numpy()
        pf = np.rint(acc[:, : 2 * F, :]).astype(np.int64).reshape(L, 2, F, E)
        out: dict[str, np.ndarray] = {
            "prefill_counts": pf[:, 0].sum(axis=1),
            "decode_counts": pf[:, 1].sum(axis=1),
            "fold_counts": np.ascontiguousarray(pf.sum(axis=1).transpose(1, 0, 2)),
            "weight_mass": self.weight_mass.cpu().numpy(),
        }
        if self._seen_probs:
            out["prob_mass"] = self.prob_mass.cpu().numpy()
            out["selected_prob_mass"] = self.selected_prob_mass.cpu().numpy()
        base = 2 * F
        if self.want_coact:
            co = np.stack([acc[m, base + (m % self.n_slots) * E : base + (m % self.n_slots + 1) * E] for m in range(L)])
            co = np.rint(co).astype(np.int64)
            idx = np.arange(E)
            co[:, idx, idx] = 0
            out["coactivation"] = co
        if self.want_transitions:
            tr = np.stack([acc[m, base + ((m - 1) % 2) * E : base + ((m - 1) % 2 + 1) * E] for m in range(1, L)])
            out["transitions"] = np.rint(tr).astype(np.int64)
        if self.want_saliency:
            out["saliency_sum"] = self.sal_sum.cpu().numpy()
            out["saliency_count"] = self.sal_count.cpu().numpy()
        return out

    def token_counts(self) -> tuple[int, int]:
        """(prefill, decode) real tokens seen (one host copy)."""
        t = self.tokens.cpu().tolist()
        return int(t[0]), int(t[1])


def torch_float64() -> Any:
    import torch

    return torch.float64
