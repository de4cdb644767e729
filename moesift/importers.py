"""Routing records from serving engines into `moesift-trace/1`.

vLLM (``--enable-return-routed-experts``)
    The OpenAI-compatible server adds ``prompt_routed_experts`` to a completion response (one row per prompt
    token) and ``routed_experts`` to each choice (one row per generated token that went through a forward
    pass), each row ``[MoE layer][top_k]`` expert ids. The offline API puts the same arrays on
    ``RequestOutput.prompt_routed_experts`` and ``CompletionOutput.routed_experts``. Accepted files: one
    response object, a JSON list of them, or JSON Lines (one per line); records saved from the offline API as
    ``{"prompt_routed_experts": ..., "outputs": [{"routed_experts": ...}]}`` are read too. Each request is one
    document: its prompt tokens (prefill) then the generated tokens of its first choice (decode); further
    choices become documents of generated tokens only.

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
    document (their order within a request is not recorded).
"""

from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoesiftError
from .tracefile import Trace

FORMATS = ("vllm", "sglang")


# ---------------------------------------------------------------------------------------------------------
# model identity
# ---------------------------------------------------------------------------------------------------------


def _model_info(model, n_experts, top_k, moe_layers, model_type) -> dict[str, Any]:
    info: dict[str, Any] = {"name": None, "model_type": model_type, "config_hash": None, "moe_layers": moe_layers,
                            "n_experts": n_experts, "top_k": top_k, "n_shared": None}
    if model is None:
        return info
    from .arch import adapter_for
    from .checkpoint import load_config_dict
    from .loading import resolve_model_dir
    from .tracer import model_config_hash

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
    from . import __version__

    return Trace(
        model=model,
        workload={"label": label, "sources": sources, "token_sha256": None, "documents": int(n_docs),
                  "prefill_tokens": int((phase == 0).sum()), "decode_tokens": int((phase == 1).sum()), "folds": folds},
        arrays=arrays,
        tool={"name": "moesift", "version": __version__, **(tool or {})},
    )


def _counts_trace(counts: np.ndarray, model: dict[str, Any], label: str, sources: list[dict], tool: dict) -> Trace:
    from . import __version__

    return Trace(
        model=model,
        workload={"label": label, "sources": sources, "token_sha256": None, "documents": 0,
                  "prefill_tokens": None, "decode_tokens": None},
        arrays={"prefill_counts": counts.astype(np.int64)},
        tool={"name": "moesift", "version": __version__, **tool},
    )


def _fit_layers(model: dict[str, Any], n_rows: int, where: str, all_layers: bool) -> list[int]:
    """Rows of the engine's layer axis that are MoE layers, and fill model["moe_layers"]."""
    moe = model.get("moe_layers")
    if moe is None:
        model["moe_layers"] = list(range(n_rows))
        return list(range(n_rows))
    if n_rows == len(moe):
        return list(range(n_rows))
    if all_layers and n_rows > max(moe):
        return list(moe)
    raise MoesiftError(f"{where}: the file has {n_rows} layers but the model has {len(moe)} MoE layers "
                       f"({list(moe)[:8]}...); pass the --model the records were made with")


# ---------------------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------------------


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


def read_vllm(path: Path) -> list[list[tuple[np.ndarray, int]]]:
    """Documents, each a list of (rows [T, L, K], phase) pieces."""
    recs = _read_json_records(path)
    docs = []
    for i, r in enumerate(recs):
        where = f"{str(path)!r} record {i}"
        if not isinstance(r, dict):
            raise MoesiftError(f"{where} is not a JSON object")
        if "prompt_routed_experts" not in r and "routed_experts" not in r and "choices" not in r and "outputs" not in r:
            raise MoesiftError(f"{where} has no prompt_routed_experts / routed_experts; serve with vLLM's "
                               "--enable-return-routed-experts")
        prompt = _rows(r.get("prompt_routed_experts"), where + " prompt_routed_experts")
        gens = []
        for key in ("choices", "outputs"):
            for j, c in enumerate(r.get(key) or []):
                if not isinstance(c, dict):
                    raise MoesiftError(f"{where} {key}[{j}] is not an object")
                gens.append(_rows(c.get("routed_experts"), f"{where} {key}[{j}].routed_experts"))
        if "routed_experts" in r:
            gens.append(_rows(r.get("routed_experts"), where + " routed_experts"))
        if prompt is None and all(g is None for g in gens):
            raise MoesiftError(f"{where} holds no routed experts (all null); serve with vLLM's "
                               "--enable-return-routed-experts and request them")
        first = [(prompt, 0)] if prompt is not None else []
        if gens and gens[0] is not None:
            first.append((gens[0], 1))
        if first:
            docs.append(first)
        for g in gens[1:]:
            if g is not None:
                docs.append([(g, 1)])
    return docs


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


def _import_vllm(paths, minfo, label, sources, folds) -> Trace:
    pieces, offs, phases = [], [0], []
    shape = None
    for p in paths:
        for doc in read_vllm(p):
            n = 0
            for rows, ph in doc:
                if shape is None:
                    shape = rows.shape[1:]
                elif rows.shape[1] != shape[0]:
                    raise MoesiftError(f"{str(p)!r}: records disagree on the number of MoE layers "
                                       f"({rows.shape[1]} vs {shape[0]})")
                pieces.append(rows)
                phases.append(np.full(len(rows), ph, dtype=np.uint8))
                n += len(rows)
            offs.append(offs[-1] + n)
    if shape is None:
        raise MoesiftError(f"{str(paths[0])!r} holds no vLLM routed experts")
    K = max(r.shape[2] for r in pieces)
    log = np.concatenate([np.pad(r, ((0, 0), (0, 0), (0, K - r.shape[2])), constant_values=-1) for r in pieces])
    _fit_layers(minfo, log.shape[1], str(paths[0]), all_layers=False)
    _finish_model(minfo, log, str(paths[0]))
    return trace_from_log(log, np.asarray(offs), np.concatenate(phases), minfo, label, sources, folds,
                          tool={"imported_from": "vllm routed experts"})


def _import_sglang(paths, minfo, label, sources, folds) -> Trace:
    logs, offs, phases, counts_total, kinds = [], [0], [], None, set()
    for p in paths:
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
    tool = {"imported_from": "sglang expert distribution recorder (" + ", ".join(sorted(kinds)) + ")"}
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
        return _fit_layers(minfo, n, where, all_layers=True)
    rows = [int(i) for i in np.flatnonzero(used)]
    if not rows:
        raise MoesiftError(f"{where!r} recorded no routing in any layer")
    minfo["moe_layers"] = rows
    return rows
