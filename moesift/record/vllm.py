"""vLLM routing records (``--enable-return-routed-experts``) into `moesift-trace/1`.

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
"""

from __future__ import annotations

import base64
import binascii
import io
import json as _json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.values import is_int
from ..formats.trace import Trace
from .logtrace import finish_model, trace_from_log

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
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoesiftError(f"{str(p)!r} is not UTF-8 text, so not vLLM JSON records (a binary file? vLLM's "
                           "routed_experts arrays are read from .npy files)") from None
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
    """A non-negative integer count as an int; None for anything else."""
    return int(x) if is_int(x) and x >= 0 else None


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


def import_vllm(paths, minfo, label, sources, folds) -> Trace:
    """One trace from the vLLM files `paths` (model identity `minfo`, filled in where the records tell)."""
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
    finish_model(minfo, log, str(paths[0]))
    layouts = sorted({"0.22+" if pc.axis == DECODER else "0.21" for pc in pieces})
    return trace_from_log(log, offs, phases, minfo, label, sources, folds,
                          tool={"imported_from": f"vllm routed experts ({', '.join(layouts)})"})
