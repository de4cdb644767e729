"""Traces built from serving engines' routing records: from per-token expert ids (a routing log) or from
counts alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.version import __version__
from ..formats.trace import Trace


def trace_from_log(log: np.ndarray, doc_offsets: np.ndarray, phase: np.ndarray, model: dict[str, Any], label: str,
                   sources: list[dict], folds: int = 8, tool: dict | None = None) -> Trace:
    """A trace with counts, folds, transitions and the routing log from per-token ids [N, L, K] (-1 = none)."""
    N, L, K = log.shape
    E = int(model["n_experts"])
    if N and (log.max() >= E or log.min() < -1):
        raise MoesiftError(f"{label}: expert ids must lie in 0..{E - 1} (found {int(log.min())}..{int(log.max())})")
    valid = log >= 0
    safe = np.where(valid, log, 0).astype(np.int64)

    def counts(sel: np.ndarray) -> np.ndarray:
        out = np.zeros((L, E), dtype=np.int64)
        for li in range(L):
            v = valid[sel, li].reshape(-1)
            out[li] = np.bincount(safe[sel, li].reshape(-1)[v], minlength=E)
        return out

    n_docs = len(doc_offsets) - 1
    doc_of_tok = np.repeat(np.arange(n_docs), np.diff(doc_offsets))
    arrays: dict[str, np.ndarray] = {
        "prefill_counts": counts(phase == 0),
        "decode_counts": counts(phase == 1),
        "fold_counts": np.stack([counts(doc_of_tok % folds == f) for f in range(folds)]),
        "routing_log": log.astype(np.int16),
        "doc_offsets": doc_offsets.astype(np.int64),
        "log_phase": phase.astype(np.uint8),
    }
    if L > 1:
        T = np.zeros((L - 1, E, E), dtype=np.int64)
        for li in range(L - 1):
            a, b = safe[:, li, :], safe[:, li + 1, :]
            ok = (valid[:, li, :][:, :, None] & valid[:, li + 1, :][:, None, :]).reshape(-1)
            idx = (a[:, :, None] * E + b[:, None, :]).reshape(-1)[ok]
            T[li] = np.bincount(idx, minlength=E * E).reshape(E, E)
        arrays["transitions"] = T

    return Trace(
        model=model,
        workload={"label": label, "sources": sources, "token_sha256": None, "documents": int(n_docs),
                  "prefill_tokens": int((phase == 0).sum()), "decode_tokens": int((phase == 1).sum()), "folds": folds},
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, **(tool or {})},
    )


def counts_trace(counts: np.ndarray, model: dict[str, Any], label: str, sources: list[dict], tool: dict) -> Trace:
    """A trace of counts only (engine statistics without a routing log)."""
    return Trace(
        model=model,
        workload={"label": label, "sources": sources, "token_sha256": None, "documents": 0,
                  "prefill_tokens": None, "decode_tokens": None},
        arrays={"prefill_counts": counts.astype(np.int64)},
        tool={"name": "moesift", "version": __version__, **tool},
    )


def finish_model(minfo: dict[str, Any], log: np.ndarray, where: str) -> None:
    """Fill the model's expert count and top-k from the log when unknown; refuse ids outside the model."""
    mx = int(log.max()) if log.size else -1
    if minfo.get("n_experts") is None:
        minfo["n_experts"] = mx + 1
    if minfo.get("top_k") is None:
        minfo["top_k"] = int((log >= 0).sum(-1).max()) if log.size else 0
    if mx >= int(minfo["n_experts"]):
        raise MoesiftError(f"{where}: expert id {mx} is outside a model with {minfo['n_experts']} experts")
