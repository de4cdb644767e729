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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ..core.errors import MoesiftError
from ..core.io import write_safetensors
from ..core.values import is_int

SCHEMA = "moesift-trace/1"
WCER_SCHEMA = "expert-trace/1"  # the WCER JSON trace format this module imports (formats.wcer exports it)

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
    id of each MoE layer, in order; None when the source did not say), ``n_experts``, ``top_k``,
    ``n_shared``, optional ``hash_layers`` (MoE positions kept whole), ``hidden_size`` and
    ``num_hidden_layers`` (decoder layers, dense ones included; placement reads both). Traces written
    before the last two were recorded still load: readers treat a missing key as unknown.
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
    def save(self, path: str | os.PathLike, force: bool = True, inputs: Iterable[str | os.PathLike] = ()) -> Path:
        """Write the trace (safetensors with JSON metadata) atomically; `inputs`: files it must not replace."""
        meta = {
            "schema": SCHEMA,
            "model": self.model,
            "workload": self.workload,
            "tool": self.tool,
            "extra": self.extra,
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.arrays.items() if v is not None}
        return write_safetensors(path, tensors, {"moesift": json.dumps(meta)}, force=force, inputs=inputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a `moesift-trace/1` file, or import a WCER `expert-trace/1` JSON file."""
        p = Path(path)
        if not p.is_file():
            raise MoesiftError(f"trace file {str(p)!r} not found")
        with open(p, "rb") as f:
            head = f.read(1)
        if head in (b"{", b"[") or p.suffix == ".json":
            return load_expert_trace(p)  # validated there

        where = repr(str(p))
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta_s = (f.metadata() or {}).get("moesift")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise MoesiftError(f"{where} is not a moesift trace ({_one_line(e)})") from None
        if not meta_s:
            raise MoesiftError(f"{where} is a safetensors file but not a moesift trace (no metadata)")
        try:
            meta = json.loads(meta_s)
        except (json.JSONDecodeError, RecursionError):
            raise MoesiftError(f"{where}: the trace metadata is not valid JSON; the file is damaged") from None
        if not isinstance(meta, dict):
            raise MoesiftError(f"{where}: the trace metadata is not a JSON object; the file is damaged")
        if meta.get("schema") != SCHEMA:
            raise MoesiftError(f"{where} has schema {str(meta.get('schema'))[:80]!r}; this moesift reads {SCHEMA}")
        validate_metadata(where, meta.get("model"), meta.get("workload"), meta.get("tool"), meta.get("extra"))
        t = cls(
            model=meta["model"],
            workload=meta["workload"],
            arrays=arrays,
            tool=meta.get("tool") or {},
            extra=meta.get("extra") or {},
        )
        return validate_trace(t, where)

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
        "documents": _total([t.workload.get("documents", 0) for t in traces]),
        "prefill_tokens": _total([t.workload.get("prefill_tokens", 0) for t in traces]),
        "decode_tokens": _total([t.workload.get("decode_tokens", 0) for t in traces]),
        "merged_from": [t.workload.get("token_sha256") or t.label for t in traces],
    }
    gens = [t.workload.get("generate") for t in traces if t.workload.get("generate") is not None]
    if gens:
        w["generate"] = max(int(g) for g in gens)  # the largest generation budget of the parts
    return Trace(model=dict(first.model), workload=w, arrays=arrays, tool=dict(first.tool))


def _total(values: list[Any]) -> int | None:
    """Sum of workload counts; None (unknown) when one trace does not know its count."""
    return None if any(v is None for v in values) else sum(int(v) for v in values)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def load_trace(path: str | os.PathLike) -> Trace:
    return Trace.load(path)


# ---- validation ------------------------------------------------------------------------------------

# Largest count an array may hold: more selections than any workload can make (2**53, where float64
# still counts exactly), so a bigger value is damage, not data.
MAX_COUNT = 2**53
# Largest router-weight / probability / saliency mass per expert (masses are sums of per-token values of
# order one, times at most MAX_COUNT tokens).
MAX_MASS = 1e18

# name -> (shape in symbols, kind). Symbols: L MoE layers, E experts, F folds, N logged tokens, K top-k,
# D documents; "L-1" is one less than L. Arrays named here are checked when present; any other array is
# kept as it is (a newer moesift may add some).
ARRAY_SPECS: dict[str, tuple[tuple[str, ...], str]] = {
    "prefill_counts": (("L", "E"), "count"),
    "decode_counts": (("L", "E"), "count"),
    "fold_counts": (("F", "L", "E"), "count"),
    "weight_mass": (("L", "E"), "mass"),
    "prob_mass": (("L", "E"), "mass"),
    "selected_prob_mass": (("L", "E"), "mass"),
    "coactivation": (("L", "E", "E"), "count"),
    "transitions": (("L-1", "E", "E"), "count"),
    "saliency_sum": (("L", "E"), "mass"),
    "saliency_count": (("L", "E"), "count"),
    "routing_log": (("N", "L", "K"), "ids"),
    "doc_offsets": (("D+1",), "offsets"),
    "log_phase": (("N",), "phase"),
}




def _meta_int(where: str, d: dict[str, Any], key: str, lo: int, required: bool = False,
              hi: int = MAX_COUNT) -> int | None:
    v = d.get(key)
    if v is None:
        if required:
            raise MoesiftError(f"{where}: metadata has no {key!r}; the file is damaged or not a moesift trace")
        return None
    if not is_int(v) or not lo <= int(v) <= hi:
        raise MoesiftError(f"{where}: metadata {key!r} must be an integer in {lo}..{hi} (got {v!r:.40}); "
                           "the file is damaged")
    return int(v)


def _int_list(where: str, v: Any, key: str, lo: int, hi: int) -> list[int]:
    if not isinstance(v, list) or any(not is_int(x) or not lo <= int(x) < hi for x in v):
        raise MoesiftError(f"{where}: metadata {key!r} must be a list of integers in {lo}..{hi - 1} (got {v!r})"[:300])
    if len(set(v)) != len(v):
        raise MoesiftError(f"{where}: metadata {key!r} repeats a value ({v!r})"[:300])
    return [int(x) for x in v]


def validate_metadata(where: str, model: Any, workload: Any, tool: Any = None, extra: Any = None) -> None:
    """Check the JSON sections of a trace: types and ranges of the fields moesift reads (unknown keys are
    allowed and kept)."""
    for name, sec in (("model", model), ("workload", workload)):
        if not isinstance(sec, dict):
            raise MoesiftError(f"{where}: metadata {name!r} must be a JSON object (got {type(sec).__name__})")
    for name, sec in (("tool", tool), ("extra", extra)):
        if sec is not None and not isinstance(sec, dict):
            raise MoesiftError(f"{where}: metadata {name!r} must be a JSON object (got {type(sec).__name__})")
    m = model
    E = _meta_int(where, m, "n_experts", 1, required=True, hi=1 << 20)
    assert E is not None
    _meta_int(where, m, "top_k", 1, required=True, hi=E)
    _meta_int(where, m, "n_shared", 0, hi=1 << 20)
    for key in ("hidden_size", "num_hidden_layers", "n_group", "topk_group"):
        _meta_int(where, m, key, 1, hi=1 << 24)
    g = m.get("n_group")
    if g is not None and E % int(g):
        raise MoesiftError(f"{where}: metadata n_group {g} does not divide n_experts {E}")
    for key in ("name", "model_type", "config_hash", "scoring"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise MoesiftError(f"{where}: metadata {key!r} must be a string (got {type(m[key]).__name__})")
    if m.get("moe_layers") is not None:
        _int_list(where, m["moe_layers"], "moe_layers", 0, 1 << 20)
    if m.get("config") is not None and not isinstance(m["config"], dict):
        raise MoesiftError(f"{where}: metadata 'config' must be a JSON object (got {type(m['config']).__name__})")
    w = workload
    for key in ("documents", "prefill_tokens", "decode_tokens"):  # None: not known (engine statistics)
        _meta_int(where, w, key, 0)
    if w.get("label") is not None and not isinstance(w["label"], str):
        raise MoesiftError(f"{where}: workload 'label' must be a string (got {type(w['label']).__name__})")
    if "sources" in w and not (
        isinstance(w["sources"], list) and all(isinstance(s, dict) for s in w["sources"])
    ):
        raise MoesiftError(f"{where}: workload 'sources' must be a list of objects")
    for key in ("token_sha256",):
        if w.get(key) is not None and not isinstance(w[key], str):
            raise MoesiftError(f"{where}: workload {key!r} must be a string")


def _check_array(where: str, name: str, a: np.ndarray, shape: tuple[int, ...], kind: str, E: int) -> None:
    if a.shape != shape:
        raise MoesiftError(
            f"{where}: array {name!r} has shape {list(a.shape)}; the model section says {list(shape)}; "
            "the file is damaged or was edited"
        )
    if kind == "mass":
        if a.dtype.kind not in "fiu":
            raise MoesiftError(f"{where}: array {name!r} must hold numbers (dtype {a.dtype})")
        if a.size:
            x = a.astype(np.float64, copy=False)
            if not np.isfinite(x).all():
                raise MoesiftError(f"{where}: array {name!r} holds NaN or infinite values; the trace is damaged")
            if x.min() < 0 or x.max() > MAX_MASS:
                raise MoesiftError(f"{where}: array {name!r} holds values outside 0..{MAX_MASS:g}; the trace is damaged")
        return
    if a.dtype.kind not in "iu":
        raise MoesiftError(f"{where}: array {name!r} must hold integers (dtype {a.dtype})")
    if not a.size:
        return
    lo, hi = int(a.min()), int(a.max())
    if kind == "count":
        if lo < 0 or hi > MAX_COUNT:
            raise MoesiftError(f"{where}: array {name!r} holds counts outside 0..2**53 (min {lo}, max {hi}); "
                               "the trace is damaged")
    elif kind == "ids":
        if lo < -1 or hi >= E:
            raise MoesiftError(f"{where}: array {name!r} holds expert ids outside 0..{E - 1} (min {lo}, max {hi}); "
                               "the trace is damaged or of another model")
    elif kind == "phase":
        if lo < 0 or hi > 1:
            raise MoesiftError(f"{where}: array {name!r} must hold 0 (prefill) or 1 (decode)")


def validate_trace(trace: Trace, where: str) -> Trace:
    """Check a trace read from a file: metadata types, every known array's shape against the model section
    (layers x experts, folds, co-activation, transitions, routing log), finite non-negative counts and
    masses of sane magnitude, logged expert ids below the expert count. Raises MoesiftError (one line)."""
    validate_metadata(where, trace.model, trace.workload, trace.tool, trace.extra)
    arrays = trace.arrays
    pc = arrays.get("prefill_counts")
    if pc is None:
        raise MoesiftError(f"{where}: no 'prefill_counts' array; the file is damaged or not a moesift trace")
    if pc.ndim != 2 or pc.shape[0] < 1:
        raise MoesiftError(f"{where}: 'prefill_counts' must be [MoE layers, experts] (shape {list(pc.shape)})")
    m = trace.model
    L, E, K = int(pc.shape[0]), int(m["n_experts"]), int(m["top_k"])
    moe = m.get("moe_layers")
    if moe is not None and len(moe) != L:
        raise MoesiftError(f"{where}: metadata names {len(moe)} MoE layers; the arrays have {L}")
    hl = m.get("hash_layers")
    if hl is not None:
        _int_list(where, hl, "hash_layers", 0, L)
    f = arrays.get("fold_counts")
    sym = {"L": L, "E": E, "K": K, "L-1": max(L - 1, 0), "F": 0 if f is None else int(f.shape[0]) if f.ndim else -1}
    log = arrays.get("routing_log")
    if log is not None:
        sym["N"] = int(log.shape[0]) if log.ndim else -1
        if log.ndim == 3:
            sym["K"] = int(log.shape[2])  # a log may keep fewer or more slots than top-k; ids are checked
    off = arrays.get("doc_offsets")
    if off is not None:
        sym["D+1"] = int(off.shape[0]) if off.ndim == 1 else -1
    for name, (dims, kind) in ARRAY_SPECS.items():
        a = arrays.get(name)
        if a is None:
            continue
        if name in ("log_phase", "doc_offsets") and log is None:
            raise MoesiftError(f"{where}: array {name!r} without a 'routing_log'; the file is damaged")
        if name == "fold_counts" and (a.ndim != 3 or a.shape[0] < 1):
            raise MoesiftError(f"{where}: array 'fold_counts' must be [folds, MoE layers, experts] "
                               f"(shape {list(a.shape)})")
        _check_array(where, name, a, tuple(sym[d] for d in dims), kind, E)
    if log is not None:
        if off is None:
            raise MoesiftError(f"{where}: a 'routing_log' without 'doc_offsets'; the file is damaged")
        if off.shape[0] < 1 or int(off[0]) != 0 or int(off[-1]) != log.shape[0] or (np.diff(off) < 0).any():
            raise MoesiftError(f"{where}: 'doc_offsets' must rise from 0 to the {log.shape[0]} logged tokens")
    if pc.size and float(pc.astype(np.float64).sum()) + (
        float(arrays["decode_counts"].astype(np.float64).sum()) if "decode_counts" in arrays else 0.0
    ) <= 0:
        raise MoesiftError(f"{where}: the trace records no routes (every count is zero); trace a workload first")
    total = float(pc.astype(np.float64).sum())
    if total > MAX_COUNT * 64:
        raise MoesiftError(f"{where}: the counts add up to {total:.3g} routes; the trace is damaged")
    return trace


def load_expert_trace(path: str | os.PathLike) -> Trace:
    """Import a WCER ``expert-trace/1`` JSON file as a Trace."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoesiftError(f"trace file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoesiftError(f"cannot read {str(p)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise MoesiftError(f"{str(p)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return from_expert_trace(d, str(p))


def from_expert_trace(d: Any, where: str = "expert-trace") -> Trace:
    """Trace from a parsed ``expert-trace/1`` object."""
    if not isinstance(d, dict):
        raise MoesiftError(f"{where!r} is not an {WCER_SCHEMA} object (top level is {type(d).__name__})")
    if d.get("schema_version") != WCER_SCHEMA:
        raise MoesiftError(
            f"{where!r} has schema_version {d.get('schema_version')!r}; expected {WCER_SCHEMA!r} "
            "(or a moesift-trace/1 safetensors file)"
        )
    for k in ("n_layers", "n_experts", "top_k", "per_layer_histogram"):
        if k not in d:
            raise MoesiftError(f"{where!r} is missing {k!r}; not a complete {WCER_SCHEMA} file")
    L, E, K = (_meta_count(where, d, k) for k in ("n_layers", "n_experts", "top_k"))
    hist = _number_array(where, d["per_layer_histogram"], "per_layer_histogram", integer=True)
    if hist.shape != (L, E) or L < 1 or E < 1 or not 1 <= K <= E:
        raise MoesiftError(
            f"{where!r}: per_layer_histogram has shape {list(hist.shape)}; n_layers={L}, n_experts={E}, top_k={K}"
        )
    arrays: dict[str, np.ndarray] = {"prefill_counts": hist}
    wm = d.get("per_layer_weight_mass")
    if wm is not None:
        w = _number_array(where, wm, "per_layer_weight_mass", integer=False)
        if w.shape != (L, E):
            raise MoesiftError(f"{where!r}: per_layer_weight_mass must be [n_layers][n_experts] numbers")
        arrays["selected_prob_mass"] = w

    def per_model(key: str) -> int:
        v = d.get(key, 0) or 0
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
            raise MoesiftError(f"{where!r}: {key} must be a non-negative integer (got {v!r:.40})")
        return int(round(v / L))

    hash_layers = d.get("hash_layers") or []
    if not isinstance(hash_layers, list) or any(not isinstance(h, int) or not 0 <= h < L for h in hash_layers):
        raise MoesiftError(f"{where!r}: hash_layers must be a list of layer positions below {L}")
    meta = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
    extra: dict[str, Any] = {"imported_from": WCER_SCHEMA, "wcer": meta}
    pairs = d.get("coactivation_top_pairs_per_layer")
    if isinstance(pairs, list) and len(pairs) == L:
        extra["coactivation_top_pairs_per_layer"] = pairs
    for key in ("model_id", "model_type", "config_hash", "workload_label"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise MoesiftError(f"{where!r}: {key} must be a string (got {type(d[key]).__name__})")
    if d.get("n_prompts") is not None and (not isinstance(d["n_prompts"], int) or isinstance(d["n_prompts"], bool)
                                           or not 0 <= d["n_prompts"] <= MAX_COUNT):
        raise MoesiftError(f"{where!r}: n_prompts must be a non-negative integer")
    shape = _shape_keys(d, L, where)
    t = Trace(
        model={
            **shape,
            "name": d.get("model_id"),
            "model_type": d.get("model_type"),
            "config_hash": d.get("config_hash"),
            "moe_layers": shape.get("moe_layers"),
            "n_experts": E,
            "top_k": K,
            "n_shared": None,
            "hash_layers": list(hash_layers),
        },
        workload={
            "label": str(d.get("workload_label") or Path(where).stem),
            "sources": [{"path": where}],
            "token_sha256": None,
            "documents": int(d.get("n_prompts", 0) or 0),
            "prefill_tokens": per_model("prefill_tokens"),
            "decode_tokens": per_model("decode_tokens"),
        },
        arrays=arrays,
        tool={"name": d.get("tool", "wcer expert_trace"), "schema_version": WCER_SCHEMA},
        extra=extra,
    )
    return validate_trace(t, repr(where))


def _meta_count(where: str, d: dict[str, Any], key: str) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 20:
        raise MoesiftError(f"{where!r}: {key} must be a positive integer (got {v!r:.40})")
    return v


def _number_array(where: str, v: Any, key: str, integer: bool) -> np.ndarray:
    """A rectangular array of JSON numbers: finite, non-negative, below the trace's magnitude limits;
    counts must be whole numbers."""
    bad = f"{where!r}: {key} must be a rectangular list of lists of non-negative {'integers' if integer else 'numbers'}"
    if not isinstance(v, list) or not all(
        isinstance(row, list) and all(type(x) in (int, float) for x in row) for row in v
    ):
        raise MoesiftError(bad)
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise MoesiftError(bad) from None
    if a.ndim != 2:
        raise MoesiftError(bad)
    if not np.isfinite(a).all():
        raise MoesiftError(f"{where!r}: {key} holds NaN or infinite values")
    if a.size and a.min() < 0:
        raise MoesiftError(f"{where!r}: {key} holds negative values")
    limit = MAX_COUNT if integer else MAX_MASS
    if a.size and a.max() > limit:
        raise MoesiftError(f"{where!r}: {key} holds values above {limit:.3g}; the file is damaged")
    if integer:
        if (a != np.floor(a)).any():
            raise MoesiftError(f"{where!r}: {key} holds fractional counts")
        return a.astype(np.int64)
    return a


def _shape_keys(d: dict[str, Any], L: int, where: str) -> dict[str, Any]:
    """The optional ``moe_layers`` / ``hidden_size`` / ``num_hidden_layers`` keys, checked."""
    out: dict[str, Any] = {}
    for k in ("hidden_size", "num_hidden_layers"):
        v = d.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MoesiftError(f"{where!r}: {k} must be a positive integer (got {v!r})")
            out[k] = v
    ml = d.get("moe_layers")
    if ml is not None:
        if (not isinstance(ml, list) or len(ml) != L or any(not isinstance(x, int) or isinstance(x, bool) for x in ml)
                or any(b <= a for a, b in zip(ml, ml[1:], strict=False)) or (ml and ml[0] < 0)):
            raise MoesiftError(f"{where!r}: moe_layers must list {L} increasing decoder layer ids")
        if ml and out.get("num_hidden_layers") is not None and ml[-1] >= out["num_hidden_layers"]:
            raise MoesiftError(f"{where!r}: moe_layers {ml[-1]} is not below num_hidden_layers "
                               f"{out['num_hidden_layers']}")
        out["moe_layers"] = ml
    return out
