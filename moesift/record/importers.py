"""Routing records from serving engines into `moesift-trace/1`.

vLLM (``--enable-return-routed-experts``)
    Two layouts, told apart record by record:

    * 0.22 and later (checked through 0.33): each choice of a completion or chat-completion response has
      ``routed_experts``, a base64 string of ``.npy`` bytes (``np.save``; read here with
      ``allow_pickle=False``) of shape ``[num_tokens - 1, num_hidden_layers, top_k]``, uint8 (uint16 above
      256 experts; int32 is accepted too). It covers prompt and generated tokens together (the last sampled
      token never went through the model); the layer axis is every decoder layer, dense layers all-zero rows.
      The prompt length comes from ``usage.prompt_tokens`` (or ``prompt_token_ids``): that many leading
      rows are prompt tokens, the rest generated ones. When the generated length is known too (one choice,
      or ``token_ids`` on the choice) a response made with ``routed_experts_prompt_start`` (fewer rows) is
      split correctly. The offline API's ``CompletionOutput.routed_experts`` saved with ``np.save`` as a
      ``.npy`` file is read as one document; it carries no prompt length, so all its rows count as prompt
      tokens. Decoder-layer rows are mapped to MoE layers with the model's config (``--model``), or
      ``--moe-layers``, or (top-k >= 2) the layers whose rows are not all zero; a dense layer's rows must be
      all zero, and a record with a different number of decoder layers than the model is refused.
    * 0.21: ``prompt_routed_experts`` on the response (one row per prompt token) and ``routed_experts`` on
      each choice (one row per generated token that went through a forward pass) as JSON lists
      ``[token][MoE layer][top_k]``; records saved from the offline API as ``{"prompt_routed_experts": ...,
      "outputs": [{"routed_experts": ...}]}`` are read too. This layer axis counts MoE layers but ignores
      ``first_k_dense_replace``, so a dense-first model's records end with all-zero rows: they must be zero
      and are dropped. A choice's list of prompt + generated - 1 rows with no ``prompt_routed_experts``
      beside it is a 0.22+ array saved with ``.tolist()`` and is read as one.

    Accepted files: one response object, a JSON list of them, JSON Lines (one per line; lines of the batch
    API's output, ``{"custom_id", "response": {"body": ...}}``, are unwrapped), or ``.npy``. Each
    request is one document: its prompt tokens (prefill) then the generated tokens of its first choice
    (decode); further choices become documents of their generated tokens only (their prompt rows repeat
    the first choice's).

SGLang expert distribution recorder (``--expert-distribution-recorder-mode``)
    Dumps written with ``torch.save`` and read here with ``torch.load(weights_only=True)`` (no pickle code
    runs). ``stat`` mode: ``{"rank", "logical_count": [steps, layers, logical experts] (or [layers, E]),
    "average_utilization_rate_over_window"}``; imported as counts only. ``per_token`` mode (one file per
    rank): ``{"records": [{"forward_pass_id", "rank", "input_ids", "positions", "extend_seq_lens",
    "forward_mode", "topk_ids_of_layer": [layers, tokens, 8] (physical ids, -1 padded),
    "global_physical_count": [layers, physical]}, ...], "last_physical_to_logical_map": [layers, physical]}``;
    imported with a routing log (physical ids mapped to logical ids). Records with only
    ``global_physical_count`` (``per_pass``) are imported as counts. SGLang's layer axis counts every decoder
    layer; rows of dense layers are dropped using the model's MoE layers (``model``) or, without a model,
    the layers that recorded no routing. Prefill passes are split into one document per request with
    ``extend_seq_lens``; a decode pass batches one token of many requests, so each decode token is its own
    document (their order within a request is not recorded). ``per_token`` and ``per_pass`` dumps are
    written once per rank: a forward pass found in several files (same ``forward_pass_id``, token count and
    tokens, as every tensor-parallel rank records it) is counted once, and ranks whose records of one pass
    disagree are refused (pass one rank's file); passes with other tokens under the same id (data-parallel
    ranks) all count. ``stat`` dumps already sum over ranks: identical dumps of several ranks count once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json as _json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import model_config_hash
from ..core.version import __version__
from ..formats.checkpoint import load_config_dict, resolve_model_dir
from ..formats.trace import Trace

FORMATS = ("vllm", "sglang")


# ---------------------------------------------------------------------------------------------------------
# model identity
# ---------------------------------------------------------------------------------------------------------


def _model_info(model, n_experts, top_k, moe_layers, model_type) -> dict[str, Any]:
    info: dict[str, Any] = {"name": None, "model_type": model_type, "config_hash": None, "moe_layers": moe_layers,
                            "n_experts": n_experts, "top_k": top_k, "n_shared": None}
    if model is None:
        return info

    d = resolve_model_dir(model)
    cfg = load_config_dict(d)
    spec = adapter_for(cfg).spec(cfg)
    info.update({
        "name": str(model), "model_type": spec.model_type, "config_hash": model_config_hash(d),
        "moe_layers": [int(x) for x in spec.moe_layers], "n_experts": int(spec.n_experts), "top_k": int(spec.top_k),
        "n_shared": spec.n_shared, "n_group": spec.n_group, "topk_group": spec.topk_group,
    })
    if cfg.get("hidden_size"):
        info["hidden_size"] = int(cfg["hidden_size"])
    if cfg.get("num_hidden_layers"):
        info["num_hidden_layers"] = int(cfg["num_hidden_layers"])
    return info


# ---------------------------------------------------------------------------------------------------------
# building a trace from a log
# ---------------------------------------------------------------------------------------------------------


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


def _counts_trace(counts: np.ndarray, model: dict[str, Any], label: str, sources: list[dict], tool: dict) -> Trace:

    return Trace(
        model=model,
        workload={"label": label, "sources": sources, "token_sha256": None, "documents": 0,
                  "prefill_tokens": None, "decode_tokens": None},
        arrays={"prefill_counts": counts.astype(np.int64)},
        tool={"name": "moesift", "version": __version__, **tool},
    )


def _fit_layers(model: dict[str, Any], n_rows: int, where: str) -> list[int]:
    """Rows of SGLang's layer axis (every decoder layer) that are the model's MoE layers."""
    moe = list(model["moe_layers"])
    nh = model.get("num_hidden_layers")
    if nh is not None and n_rows > nh:
        raise MoesiftError(f"{where}: the file has {n_rows} layers but the model has {nh} decoder layers; pass the "
                           "--model the records were made with")
    if n_rows == len(moe):
        return list(range(n_rows))
    if n_rows > max(moe):
        if nh is None:
            model["num_hidden_layers"] = n_rows
        return moe
    raise MoesiftError(f"{where}: the file has {n_rows} layers but the model has {len(moe)} MoE layers "
                       f"({moe[:8]}...); pass the --model the records were made with")


# ---------------------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------------------

# layer axis of a piece of vLLM records: every decoder layer (0.22+), MoE layers (0.21), or not yet known
# (a bare .npy array: decoder layers unless the model says the axis is its MoE layers)
DECODER, MOE, UNKNOWN = "decoder", "moe", "npy"
VLLM_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))


@dataclass
class _Piece:
    rows: np.ndarray  # [T, layer axis, K] int64
    phase: int  # 0 prompt, 1 generated
    axis: str  # DECODER | MOE | UNKNOWN
    where: str


def _read_json_records(p: Path) -> list[Any]:
    text = p.read_text()
    try:
        d = _json.loads(text)
        return d if isinstance(d, list) else [d]
    except ValueError:
        pass
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            out.append(_json.loads(line))
        except ValueError as e:
            raise MoesiftError(f"{str(p)!r} line {i + 1} is not JSON ({e}); expected vLLM responses as JSON or "
                               "JSON Lines") from None
    return out


def _rows(x: Any, where: str) -> np.ndarray | None:
    """0.21 JSON lists [tokens][layers][top_k]."""
    if x is None:
        return None
    try:
        a = np.asarray(x)
    except ValueError:
        raise MoesiftError(f"{where}: routed experts must be a [tokens][layers][top_k] array") from None
    if a.size == 0:
        return None
    if a.ndim != 3 or not (np.issubdtype(a.dtype, np.integer)):
        raise MoesiftError(f"{where}: routed experts must be a [tokens][layers][top_k] array of integers, "
                           f"got shape {a.shape} of {a.dtype}")
    return a.astype(np.int64)


def _npy_array(a: Any, where: str) -> np.ndarray:
    """Check an array in vLLM's 0.22+ routed-experts form and widen it to int64."""
    if not isinstance(a, np.ndarray):
        raise MoesiftError(f"{where}: expected one .npy array of routed experts (np.save), got {type(a).__name__}")
    if a.dtype not in VLLM_DTYPES:
        raise MoesiftError(f"{where}: routed experts have dtype {a.dtype}; vLLM writes uint8 (uint16 above 256 "
                           "experts, int32 in some releases), so this is not a vLLM routed-experts array")
    if a.ndim != 3:
        raise MoesiftError(f"{where}: routed experts must have shape [tokens, layers, top_k], got {list(a.shape)}")
    return a.astype(np.int64)


def _load_npy(data: bytes | Path, where: str) -> np.ndarray:
    src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    try:
        a = np.load(src, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - object (pickled) arrays, bad headers, truncated data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoesiftError(f"{where}: not a .npy array readable without pickle ({msg}); vLLM writes numeric "
                           "arrays with np.save") from None
    if not isinstance(a, np.ndarray):  # an .npz archive
        raise MoesiftError(f"{where}: expected one .npy array (np.save), not an .npz archive")
    return _npy_array(a, where)


def _b64_npy(s: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise MoesiftError(f"{where}: routed_experts is a string but not base64 (vLLM 0.22+ sends base64 of "
                           ".npy bytes)") from None
    return _load_npy(raw, where)


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0 else None


def _split_rows(a: np.ndarray, n_prompt: int | None, n_gen: int | None, where: str) -> int:
    """How many leading rows of a 0.22+ array (prompt and generated tokens) are prompt tokens."""
    R = len(a)
    if n_prompt is None:
        return R
    if n_gen is not None:
        expected = n_prompt + n_gen - 1
        if R > expected:
            raise MoesiftError(f"{where}: {R} rows of routed experts but the response has {n_prompt} prompt + "
                               f"{n_gen} generated tokens (at most {expected} rows); the record is not from "
                               "this response")
        skipped = expected - R  # routed_experts_prompt_start left out the first prompt rows
        if skipped > n_prompt:
            raise MoesiftError(f"{where}: {R} rows of routed experts cannot cover {n_gen} generated tokens")
        return n_prompt - skipped
    if R < n_prompt:
        raise MoesiftError(f"{where}: {R} rows of routed experts but {n_prompt} prompt tokens; cannot tell prompt "
                           "from generated rows (request return_token_ids so each choice lists its tokens)")
    return n_prompt


def _vllm_record(r: dict, where: str) -> list[list[_Piece]]:
    """Documents of one response / offline RequestOutput."""
    if "prompt_routed_experts" not in r and "routed_experts" not in r and "choices" not in r and "outputs" not in r:
        raise MoesiftError(f"{where} has no prompt_routed_experts / routed_experts; serve with vLLM's "
                           "--enable-return-routed-experts")
    usage = r.get("usage") if isinstance(r.get("usage"), dict) else {}
    n_prompt = _int_or_none(usage.get("prompt_tokens"))
    if n_prompt is None and isinstance(r.get("prompt_token_ids"), list):
        n_prompt = len(r["prompt_token_ids"])
    choices: list[tuple[str, Any, dict]] = []
    for key in ("choices", "outputs"):
        cs = r.get(key) or []
        if not isinstance(cs, list):
            raise MoesiftError(f"{where} {key} is not a list")
        for j, c in enumerate(cs):
            if not isinstance(c, dict):
                raise MoesiftError(f"{where} {key}[{j}] is not an object")
            choices.append((f"{where} {key}[{j}].routed_experts", c.get("routed_experts"), c))
    if "routed_experts" in r:
        choices.append((where + " routed_experts", r.get("routed_experts"), r))
    prompt = _rows(r.get("prompt_routed_experts"), where + " prompt_routed_experts")
    first: list[_Piece] = [_Piece(prompt, 0, MOE, where)] if prompt is not None else []
    others: list[list[_Piece]] = []
    for i, (w, v, c) in enumerate(choices):
        if v is None:
            continue
        n_p = n_prompt
        if n_p is None and isinstance(c.get("prompt_token_ids"), list):
            n_p = len(c["prompt_token_ids"])
        n_gen = len(c["token_ids"]) if isinstance(c.get("token_ids"), list) else None
        if n_gen is None and len(choices) == 1:
            n_gen = _int_or_none(usage.get("completion_tokens"))
        if isinstance(v, str):  # 0.22+: prompt and generated tokens, every decoder layer
            if prompt is not None:
                raise MoesiftError(f"{w}: a base64 routed_experts (vLLM 0.22+) beside prompt_routed_experts "
                                   "(vLLM 0.21); one response has one layout")
            a = _b64_npy(v, w)
        elif isinstance(v, list):
            a = _rows(v, w)
            if a is None:
                continue
            # 0.21 lists hold generated tokens only (at most n_gen rows); a 0.22+ array saved as lists
            # (.tolist()) holds prompt + generated - 1 rows and has no prompt_routed_experts beside it
            if not (prompt is None and n_p is not None and n_gen is not None and n_p > 1
                    and len(a) == n_p + n_gen - 1):
                pieces = [_Piece(a, 1, MOE, w)]
                a = None
        else:
            raise MoesiftError(f"{w}: expected a base64 .npy string (vLLM 0.22+) or nested lists (vLLM 0.21), "
                               f"got {type(v).__name__}")
        if a is not None:
            k = _split_rows(a, n_p, n_gen, w)
            pieces = [_Piece(a[:k], 0, DECODER, w), _Piece(a[k:], 1, DECODER, w)]
            if i:  # a further choice: its prompt rows repeat the first choice's
                pieces = pieces[1:]
        pieces = [pc for pc in pieces if len(pc.rows)]
        if i == 0:
            first.extend(pieces)
        elif pieces:
            others.append(pieces)
    docs = ([first] if first else []) + others
    if not docs:
        raise MoesiftError(f"{where} holds no routed experts (all null); serve with vLLM's "
                           "--enable-return-routed-experts and request them")
    return docs


def read_vllm(path: Path) -> list[list[_Piece]]:
    """Documents of one vLLM file, each a list of pieces (rows [T, layer axis, K], phase, layer axis)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        a = _load_npy(path, repr(str(path)))
        return [[_Piece(a, 0, UNKNOWN, repr(str(path)))]] if len(a) else []
    docs = []
    for i, r in enumerate(_read_json_records(path)):
        where = f"{str(path)!r} record {i}"
        if not isinstance(r, dict):
            raise MoesiftError(f"{where} is not a JSON object")
        body = r.get("response", {}).get("body") if isinstance(r.get("response"), dict) else None
        if isinstance(body, dict):  # a line of the batch API's output: {"custom_id", "response": {"body"}}
            r = body
        docs.extend(_vllm_record(r, where))
    return docs


def _nonzero_rows(pieces: list[_Piece], rows: list[int]) -> list[int]:
    """Of `rows` (layer-axis positions), those where some piece has a non-zero id."""
    return [li for li in rows if any((p.rows[:, li, :] != 0).any() for p in pieces)]


def _vllm_layers(minfo: dict[str, Any], pieces: list[_Piece]) -> None:
    """Decide every piece's layer axis and replace its rows by the MoE layers [T, L, K]; fill minfo."""
    moe = minfo.get("moe_layers")
    nh = minfo.get("num_hidden_layers")
    known = minfo.get("config_hash") is not None  # a --model was given
    for p in pieces:
        if p.axis == UNKNOWN:
            n = p.rows.shape[1]
            p.axis = MOE if (moe is not None and n == len(moe) and n != nh) else DECODER
    for axis in (DECODER, MOE):
        group = [p for p in pieces if p.axis == axis]
        if not group:
            continue
        ns = {p.rows.shape[1] for p in group}
        if len(ns) > 1:
            raise MoesiftError(f"{group[0].where}: vLLM records disagree on the number of layers ({sorted(ns)})")
        n = ns.pop()
        where = group[0].where
        if nh is not None and n > nh:
            raise MoesiftError(f"{where}: the record has {n} layers but the model has {nh} decoder layers; pass the "
                               "--model the records were made with")
        if axis == DECODER:
            if known and nh is not None and n != nh:
                raise MoesiftError(f"{where}: the record has {n} decoder layers but the model has {nh}; pass the "
                                   "--model the records were made with")
            if moe is not None:
                if max(moe) >= n:
                    raise MoesiftError(f"{where}: the record has {n} decoder layers; MoE layer {max(moe)} is "
                                       "outside it (check --moe-layers)")
                rows = list(moe)
            else:
                K = max(p.rows.shape[2] for p in group)
                if K < 2:
                    raise MoesiftError(f"{where}: top-1 records cannot tell a dense layer (all-zero rows) from a "
                                       "MoE layer whose tokens all chose expert 0; pass --model or --moe-layers")
                rows = _nonzero_rows(group, list(range(n)))
                if not rows:
                    raise MoesiftError(f"{where}: every routed-experts row is zero; no MoE layer recorded")
                minfo["moe_layers"] = moe = rows
            bad = _nonzero_rows(group, [li for li in range(n) if li not in set(rows)])
            if bad:
                raise MoesiftError(f"{where}: decoder layer {bad[0]} is dense in this model but its routed-experts "
                                   "rows are not all zero; the records are not from this model (pass the --model "
                                   "they were made with, or check --moe-layers)")
            if nh is None:
                minfo["num_hidden_layers"] = nh = n
        else:  # 0.21: MoE layers first, then all-zero rows for a dense-first model
            m = len(moe) if moe is not None else None
            if m is None:
                K = max(p.rows.shape[2] for p in group)
                m = n
                if K >= 2:
                    used = _nonzero_rows(group, list(range(n)))
                    m = max(used) + 1 if used else n
            if n < m:
                raise MoesiftError(f"{where}: the file has {n} layers but the model has {m} MoE layers "
                                   f"({list(moe or [])[:8]}...); pass the --model the records were made with")
            bad = _nonzero_rows(group, list(range(m, n)))
            if bad:
                raise MoesiftError(f"{where}: the record has {n} layers but the model has {m} MoE layers, and the "
                                   f"extra row {bad[0]} is not all zero; pass the --model the records were made with")
            rows = list(range(m))
        for p in group:
            p.rows = p.rows[:, rows, :]
    Ls = {p.rows.shape[1] for p in pieces}
    if len(Ls) > 1:
        raise MoesiftError(f"{pieces[0].where}: vLLM records of different layouts disagree on the number of MoE "
                           f"layers ({sorted(Ls)})")


def _import_vllm(paths, minfo, label, sources, folds) -> Trace:
    docs = [doc for p in paths for doc in read_vllm(p)]
    pieces = [pc for doc in docs for pc in doc]
    if not pieces:
        raise MoesiftError(f"{str(paths[0])!r} holds no vLLM routed experts")
    _vllm_layers(minfo, pieces)
    K = max(pc.rows.shape[2] for pc in pieces)
    log = np.concatenate([np.pad(pc.rows, ((0, 0), (0, 0), (0, K - pc.rows.shape[2])), constant_values=-1)
                          for pc in pieces])
    phases = np.concatenate([np.full(len(pc.rows), pc.phase, dtype=np.uint8) for pc in pieces])
    offs = np.concatenate([[0], np.cumsum([sum(len(pc.rows) for pc in doc) for doc in docs])])
    _finish_model(minfo, log, str(paths[0]))
    layouts = sorted({"0.22+" if pc.axis == DECODER else "0.21" for pc in pieces})
    return trace_from_log(log, offs, phases, minfo, label, sources, folds,
                          tool={"imported_from": f"vllm routed experts ({', '.join(layouts)})"})


# ---------------------------------------------------------------------------------------------------------
# SGLang
# ---------------------------------------------------------------------------------------------------------


def _torch_load(p: Path) -> Any:
    import torch

    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means a file we cannot read safely
        raise MoesiftError(f"{str(p)!r} is not an SGLang expert distribution dump readable without running "
                           f"pickled code ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _np(x: Any) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def import_trace(path, format: str, model=None, out=None, n_experts: int | None = None, top_k: int | None = None,
                 moe_layers=None, label: str | None = None, folds: int = 8, force: bool = False,
                 json: bool = False) -> Trace:
    """Import a serving engine's routing records (``format`` "vllm" or "sglang") into a moesift trace.

    Model identity comes from ``model`` (a model directory or cached hub id: MoE layers, experts, top-k and the
    config hash, so the trace merges with traces of the same model) or from ``n_experts`` / ``top_k`` /
    ``moe_layers``. Several files (e.g. one per rank or per machine) may be given as a list; they are read in
    order into one trace. Writes ``out`` when given.
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise MoesiftError(f"unknown --format {format!r}; choose vllm or sglang")
    for p in paths:
        if not p.is_file():
            raise MoesiftError(f"{str(p)!r} not found")
    if out is not None and Path(out).exists() and not force:
        raise MoesiftError(f"{str(out)!r} exists; pass --force to overwrite")
    if moe_layers is not None and isinstance(moe_layers, str):
        moe_layers = [int(x) for x in moe_layers.split(",") if x.strip()]
    minfo = _model_info(model, n_experts, top_k, list(moe_layers) if moe_layers is not None else None, None)
    label = label or paths[0].stem
    sources = [{"path": str(p)} for p in paths]
    if fmt == "vllm":
        t = _import_vllm(paths, minfo, label, sources, folds)
    else:
        t = _import_sglang(paths, minfo, label, sources, folds)
    if out is not None:
        t.save(out, force=force)
    return t


def _finish_model(minfo: dict[str, Any], log: np.ndarray, where: str) -> None:
    mx = int(log.max()) if log.size else -1
    if minfo.get("n_experts") is None:
        minfo["n_experts"] = mx + 1
    if minfo.get("top_k") is None:
        minfo["top_k"] = int((log >= 0).sum(-1).max()) if log.size else 0
    if mx >= int(minfo["n_experts"]):
        raise MoesiftError(f"{where}: expert id {mx} is outside a model with {minfo['n_experts']} experts")


def _digest(*xs: Any) -> bytes | None:
    """sha256 of arrays (None when any is missing)."""
    h = hashlib.sha256()
    for x in xs:
        if x is None:
            return None
        a = np.ascontiguousarray(_np(x).astype(np.int64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


class _RankDedup:
    """Forward passes recorded by several ranks: the same pass (same ``forward_pass_id``, token count and
    tokens) in another rank's file is counted once; the same pass with different routing is refused."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.seen: dict[tuple, tuple[int, bytes | None, bytes | None]] = {}
        self.skipped = 0

    def duplicate(self, kind: str, fi: int, rec: dict, n_tokens: int | None, routing: np.ndarray, where: str) -> bool:
        fpid = rec.get("forward_pass_id")
        if fpid is None:
            return False
        key = (kind, int(_np(fpid)), n_tokens)
        tokens = _digest(rec.get("input_ids"), rec.get("positions"))
        route = _digest(routing)
        prev = self.seen.get(key)
        if prev is None:
            self.seen[key] = (fi, tokens, route)
            return False
        pfi, ptokens, proute = prev
        if pfi == fi or (tokens is not None and ptokens is not None and tokens != ptokens):
            return False  # another pass of the same rank, or other tokens (a data-parallel rank)
        if route == proute:
            self.skipped += 1
            return True
        raise MoesiftError(f"{where}: forward pass {int(_np(fpid))} ({n_tokens} tokens) is also in "
                           f"{str(self.paths[pfi])!r} with different routing; these ranks disagree, so moesift "
                           "cannot count the pass once: pass one rank's file")


def _import_sglang(paths, minfo, label, sources, folds) -> Trace:
    logs, offs, phases, counts_total, kinds = [], [0], [], None, set()
    dedup = _RankDedup(paths)
    stat_ranks: dict[Any, tuple[bytes | None, Path]] = {}
    for fi, p in enumerate(paths):
        d = _torch_load(p)
        where = str(p)
        if not isinstance(d, dict):
            raise MoesiftError(f"{where!r} is not an SGLang expert distribution dump (expected a dict)")
        if "logical_count" in d:
            kinds.add("stat")
            c = _np(d["logical_count"])
            if c.ndim == 3:
                c = c.sum(0)
            if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer):
                raise MoesiftError(f"{where!r}: logical_count must be an integer [steps, layers, experts] tensor")
            rank = d.get("rank")
            rank = int(_np(rank)) if rank is not None else None
            dg = _digest(c)
            others = {r: v for r, v in stat_ranks.items() if r != rank and rank is not None and r is not None}
            if any(v[0] == dg for v in others.values()):  # stat counts are summed over ranks: one rank's is enough
                dedup.skipped += 1
                continue
            if others:
                r0, (_, p0) = next(iter(others.items()))
                raise MoesiftError(f"{where!r} (rank {rank}) and {str(p0)!r} (rank {r0}) hold different stat counts; "
                                   "stat dumps already sum over ranks: pass one rank's file")
            stat_ranks.setdefault(rank, (dg, p))
            counts_total = c.astype(np.int64) if counts_total is None else counts_total + c
        elif "records" in d:
            recs = d["records"]
            p2l = d.get("last_physical_to_logical_map")
            if not isinstance(recs, list):
                raise MoesiftError(f"{where!r}: records must be a list")
            p2l = _np(p2l).astype(np.int64) if p2l is not None else None
            for i, r in enumerate(recs):
                if not isinstance(r, dict):
                    raise MoesiftError(f"{where!r} record {i} is not a dict")
                if "topk_ids_of_layer" in r:
                    kinds.add("per_token")
                    ids = _np(r["topk_ids_of_layer"]).astype(np.int64)  # [L, T, K]
                    if ids.ndim != 3:
                        raise MoesiftError(f"{where!r} record {i}: topk_ids_of_layer must be [layers, tokens, k]")
                    if p2l is not None:
                        if p2l.shape[0] != ids.shape[0] or (ids.max(initial=-1) >= p2l.shape[1]):
                            raise MoesiftError(f"{where!r}: last_physical_to_logical_map {tuple(p2l.shape)} does "
                                               f"not fit topk_ids_of_layer {tuple(ids.shape)}")
                        lay = np.arange(ids.shape[0])[:, None, None]
                        ids = np.where(ids >= 0, p2l[lay, np.maximum(ids, 0)], -1)
                    T = ids.shape[1]
                    if dedup.duplicate("per_token", fi, r, T, ids, f"{where!r} record {i}"):
                        continue
                    ext = r.get("extend_seq_lens")
                    ext = [int(x) for x in ext] if ext is not None else None
                    logs.append(ids.transpose(1, 0, 2))
                    if ext and sum(ext) == T and len(ext) < T:  # prefill pass: one document per request
                        for n in ext:
                            offs.append(offs[-1] + n)
                        phases.append(np.zeros(T, dtype=np.uint8))
                    else:  # decode pass (one token of each running request): one document per token
                        offs.extend(offs[-1] + np.arange(1, T + 1))
                        phases.append(np.ones(T, dtype=np.uint8))
                elif "global_physical_count" in r:
                    kinds.add("per_pass")
                    g = _np(r["global_physical_count"]).astype(np.int64)
                    if p2l is None or g.ndim != 2 or p2l.shape != g.shape:
                        raise MoesiftError(f"{where!r} record {i}: global_physical_count needs a matching "
                                           "last_physical_to_logical_map")
                    n_tok = len(_np(r["input_ids"])) if r.get("input_ids") is not None else None
                    if dedup.duplicate("per_pass", fi, r, n_tok, g, f"{where!r} record {i}"):
                        continue
                    E = int(p2l.max()) + 1
                    c = np.zeros((g.shape[0], E), dtype=np.int64)
                    for li in range(g.shape[0]):
                        np.add.at(c[li], p2l[li], g[li])
                    counts_total = c if counts_total is None else counts_total + c
                else:
                    raise MoesiftError(f"{where!r} record {i} has neither topk_ids_of_layer nor "
                                       "global_physical_count")
        else:
            raise MoesiftError(f"{where!r} is not an SGLang expert distribution dump (no logical_count or records); "
                               "dump it with POST /dump_expert_distribution_record")
    if "per_token" in kinds and kinds != {"per_token"}:
        raise MoesiftError("mix of per-token and aggregate SGLang dumps; import them separately")
    tool: dict[str, Any] = {"imported_from": "sglang expert distribution recorder (" + ", ".join(sorted(kinds)) + ")"}
    if dedup.skipped:
        tool["duplicate_rank_records"] = dedup.skipped
    if logs:
        log = np.concatenate(logs)  # [N, layers, K]
        rows = _moe_rows(minfo, log.max(axis=(0, 2)) >= 0, str(paths[0]))
        log = log[:, rows, :]
        # drop padding columns that no token uses
        K = max(int((log >= 0).sum(-1).max()), 1)
        log = _compact(log, K)
        _finish_model(minfo, log, str(paths[0]))
        return trace_from_log(log, np.asarray(offs), np.concatenate(phases), minfo, label, sources, folds, tool)
    rows = _moe_rows(minfo, counts_total.sum(1) > 0, str(paths[0]))
    c = counts_total[rows]
    if minfo.get("n_experts") is None:
        minfo["n_experts"] = c.shape[1]
    if minfo.get("top_k") is None:
        raise MoesiftError("aggregate SGLang dumps do not say top-k; pass --model or --top-k")
    if c.shape[1] != int(minfo["n_experts"]):
        raise MoesiftError(f"{str(paths[0])!r} counts {c.shape[1]} experts; the model has {minfo['n_experts']}")
    return _counts_trace(c, minfo, label, sources, tool)


def _compact(log: np.ndarray, K: int) -> np.ndarray:
    """Keep each row's ids in order, padding (-1) moved to the end, K columns."""
    order = np.argsort(log < 0, axis=-1, kind="stable")
    return np.take_along_axis(log, order, axis=-1)[:, :, :K]


def _moe_rows(minfo: dict[str, Any], used: np.ndarray, where: str) -> list[int]:
    n = len(used)
    if minfo.get("moe_layers") is not None:
        return _fit_layers(minfo, n, where)
    rows = [int(i) for i in np.flatnonzero(used)]
    if not rows:
        raise MoesiftError(f"{where!r} recorded no routing in any layer")
    minfo["moe_layers"] = rows
    minfo["num_hidden_layers"] = n  # SGLang's layer axis is every decoder layer
    return rows
