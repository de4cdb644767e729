"""The `moesift-trace/1` file: routing statistics of one model on one workload.

One safetensors file. Arrays are indexed by MoE layer (position in `model["moe_layers"]`, not decoder
layer id). JSON metadata lives in the safetensors header under the key ``moesift`` so the file is
self-describing, memory-mapped and free of pickle.

Arrays (all optional except ``prefill_counts``):

========================  =================  ==============================================================
name                      shape / dtype      meaning
========================  =================  ==============================================================
prefill_counts            [L, E] int64       times each expert was selected on prompt tokens
decode_counts             [L, E] int64       ... on generated tokens (``--generate``)
fold_counts               [F, L, E] int64    prefill + decode counts of the documents dealt to fold f
weight_mass               [L, E] float64     sum of the routing weights the model applied to each expert
prob_mass                 [L, E] float64     sum over tokens of the router probability of each expert
selected_prob_mass        [L, E] float64     sum over the tokens that selected an expert of its router
                                             probability before top-k renormalisation (softmax over all
                                             experts; sigmoid routers: the sigmoid score)
coactivation              [L, E, E] int64    tokens on which experts i and j were both selected (i != j)
transitions               [L-1, E, E] int64  tokens routed to i at MoE layer l and to j at MoE layer l+1
saliency_sum              [L, E] float64     sum over routed tokens of gate weight x ||expert output||_2
saliency_count            [L, E] int64       tokens behind saliency_sum
routing_log               [N, L, K] int16    selected expert ids per token (N tokens, documents in order)
doc_offsets               [D+1] int64        token offsets of the documents in routing_log
log_phase                 [N] uint8          0 = prefill token, 1 = decode token
========================  =================  ==============================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoesiftError
from .io import atomic_path

SCHEMA = "moesift-trace/1"

ARRAY_NAMES = (
    "prefill_counts",
    "decode_counts",
    "fold_counts",
    "weight_mass",
    "prob_mass",
    "selected_prob_mass",
    "coactivation",
    "transitions",
    "saliency_sum",
    "saliency_count",
    "routing_log",
    "doc_offsets",
    "log_phase",
)
# Arrays that add when traces of the same model are merged.
ADDITIVE = (
    "prefill_counts",
    "decode_counts",
    "weight_mass",
    "prob_mass",
    "selected_prob_mass",
    "coactivation",
    "transitions",
    "saliency_sum",
    "saliency_count",
)


@dataclass
class Trace:
    """Routing statistics of one model on one workload.

    ``model``: ``name`` (path or hub id), ``model_type``, ``config_hash``, ``moe_layers`` (decoder layer
    ids), ``n_experts``, ``top_k``, ``n_shared``, optional ``hash_layers`` (MoE positions kept whole).
    ``workload``: ``label``, ``sources`` (list of {path, sha256}), ``token_sha256``, ``documents``,
    ``prefill_tokens``, ``decode_tokens``.
    """

    model: dict[str, Any]
    workload: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.arrays["prefill_counts"].shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.model["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self.model["top_k"])

    @property
    def counts(self) -> np.ndarray:
        """Selections per MoE layer and expert, prefill and decode together: int64 [L, E]."""
        c = self.arrays["prefill_counts"].astype(np.int64)
        d = self.arrays.get("decode_counts")
        return c + d if d is not None else c

    @property
    def n_folds(self) -> int:
        f = self.arrays.get("fold_counts")
        return 0 if f is None else int(f.shape[0])

    def get(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)

    @property
    def label(self) -> str:
        return str(self.workload.get("label", ""))

    # ---- io ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = True) -> Path:
        from safetensors.numpy import save_file

        meta = {
            "schema": SCHEMA,
            "model": self.model,
            "workload": self.workload,
            "tool": self.tool,
            "extra": self.extra,
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.arrays.items() if v is not None}
        with atomic_path(path, force) as tmp:
            save_file(tensors, str(tmp), metadata={"moesift": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a `moesift-trace/1` file, or import a WCER `expert-trace/1` JSON file."""
        p = Path(path)
        if not p.is_file():
            raise MoesiftError(f"trace file {str(p)!r} not found")
        with open(p, "rb") as f:
            head = f.read(1)
        if head in (b"{", b"[") or p.suffix == ".json":
            from .wcer import load_expert_trace

            return load_expert_trace(p)
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="numpy") as f:
                meta_s = (f.metadata() or {}).get("moesift")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise MoesiftError(f"{str(p)!r} is not a moesift trace ({e})") from None
        if not meta_s:
            raise MoesiftError(f"{str(p)!r} is a safetensors file but not a moesift trace (no metadata)")
        meta = json.loads(meta_s)
        if meta.get("schema") != SCHEMA:
            raise MoesiftError(f"{str(p)!r} has schema {meta.get('schema')!r}; this moesift reads {SCHEMA}")
        return cls(
            model=meta["model"],
            workload=meta["workload"],
            arrays=arrays,
            tool=meta.get("tool", {}),
            extra=meta.get("extra", {}),
        )

    # ---- identity ----------------------------------------------------------------------------------
    def model_key(self) -> tuple:
        """What must agree for two traces to describe the same model."""
        m = self.model
        return (
            m.get("model_type"),
            m.get("config_hash"),
            tuple(m.get("moe_layers") or range(self.n_layers)),
            int(m["n_experts"]),
            int(m["top_k"]),
        )


def merge(traces: list[Trace], label: str | None = None) -> Trace:
    """Add traces of the same model: counts and masses add, folds add fold by fold, logs concatenate."""
    if not traces:
        raise MoesiftError("merge needs at least one trace")
    first = traces[0]
    for t in traces[1:]:
        if t.model_key() != first.model_key():
            raise MoesiftError(
                f"cannot merge traces of different models: {first.model.get('name')!r} "
                f"({first.model.get('model_type')}, config {first.model.get('config_hash')}) and "
                f"{t.model.get('name')!r} ({t.model.get('model_type')}, config {t.model.get('config_hash')})"
            )
    arrays: dict[str, np.ndarray] = {}
    for name in ADDITIVE:
        present = [t.arrays.get(name) for t in traces]
        if all(a is not None for a in present):
            arrays[name] = np.sum(np.stack(present), axis=0)
    folds = [t.arrays.get("fold_counts") for t in traces]
    if all(f is not None for f in folds) and len({f.shape for f in folds}) == 1:
        arrays["fold_counts"] = np.sum(np.stack(folds), axis=0)
    logs = [t.arrays.get("routing_log") for t in traces]
    if all(lg is not None for lg in logs):
        arrays["routing_log"] = np.concatenate(logs, axis=0)
        offs, base = [np.zeros(1, np.int64)], 0
        for t in traces:
            o = t.arrays["doc_offsets"].astype(np.int64)
            offs.append(o[1:] + base)
            base += int(o[-1])
        arrays["doc_offsets"] = np.concatenate(offs)
        phases = [t.arrays.get("log_phase") for t in traces]
        if all(p is not None for p in phases):
            arrays["log_phase"] = np.concatenate(phases)
    w = {
        "label": label or "+".join(dict.fromkeys(t.label for t in traces)),
        "sources": [s for t in traces for s in t.workload.get("sources", [])],
        "documents": sum(int(t.workload.get("documents", 0)) for t in traces),
        "prefill_tokens": sum(int(t.workload.get("prefill_tokens", 0)) for t in traces),
        "decode_tokens": sum(int(t.workload.get("decode_tokens", 0)) for t in traces),
        "merged_from": [t.workload.get("token_sha256") or t.label for t in traces],
    }
    return Trace(model=dict(first.model), workload=w, arrays=arrays, tool=dict(first.tool))


def load_trace(path: str | os.PathLike) -> Trace:
    return Trace.load(path)
