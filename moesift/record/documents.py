"""A workload's documents as token ids for a trace (pre-tokenized ``input_ids`` checked against the
vocabulary, chats through the tokenizer's chat template, text truncated to ``max_length``), and the
routing log of a batch split back into documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.identity import token_stream_hash
from ..formats.workload import encode_prefix


def tokenize_workload(docs: list[dict[str, Any]], tok: Any, max_length: int, vocab: int, longest: Any,
                      generate: int, paths: list) -> list[list[int]]:
    """Token ids of every document that has any (refuses a workload where none has, and documents longer
    than the model's `longest` positions, max_position_embeddings)."""
    ids_list = [tokenize_document(d, tok, max_length, vocab, generate > 0, paths) for d in docs]
    need = max((len(ids) for ids in ids_list), default=0) + generate
    if isinstance(longest, int) and longest > 0 and need > longest:
        raise MoesiftError(f"a document of {need - generate} tokens{f' plus --generate {generate}' if generate else ''} "
                           f"is longer than the {longest} positions this model was built for "
                           f"(max_position_embeddings); pass --max-length {max(1, longest - generate)} or less")
    keep = [i for i, ids in enumerate(ids_list) if ids]
    if not keep:
        raise MoesiftError("every document of the workload tokenized to zero tokens; check the files")
    return [ids_list[i] for i in keep]


def tokenize_document(doc: dict[str, Any], tok: Any, max_length: int, vocab: int, chat_prompt: bool,
                      paths: list) -> list[int]:
    """One document's token ids (at most `max_length`)."""
    if "input_ids" in doc:
        ids = doc["input_ids"][:max_length]
        bad = [i for i in ids if i < 0 or (vocab and i >= vocab)]
        if bad:
            raise MoesiftError(
                f"workload {str(paths[doc.get('source', 0)])!r}: token id {bad[0]} is outside the model's "
                f"vocabulary (0..{vocab - 1})"
            )
        return list(ids)
    if tok is None:
        raise MoesiftError(
            "the model has no tokenizer (no tokenizer files in its directory); give pre-tokenized JSONL "
            "with an 'input_ids' list per line, or a model directory with a tokenizer"
        )
    if "messages" in doc:
        if not getattr(tok, "chat_template", None):
            raise MoesiftError(
                f"workload {str(paths[doc.get('source', 0)])!r} holds chats ('messages') but the tokenizer has "
                "no chat template; use a 'text' field"
            )
        text = tok.apply_chat_template(doc["messages"], tokenize=False, add_generation_prompt=chat_prompt)
        return encode_prefix(tok, text, max_length, add_special_tokens=False)
    return encode_prefix(tok, doc["text"], max_length)


def split_log(fws: list, n_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per document of the batch: (ids int16 [n, L, K], phase uint8 [n]) from the forwards' logs, prompt
    tokens first, then generated tokens in order; padding and finished rows dropped."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    phases: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    for B, S, phase, valid, log in fws:
        v = valid.reshape(B, S)
        lg = log.reshape(B, S, *log.shape[1:])
        for r in range(B):
            sel = lg[r][v[r]]
            parts[r].append(sel)
            phases[r].append(np.full(len(sel), phase, np.uint8))
    return [(np.concatenate(p), np.concatenate(ph)) for p, ph in zip(parts, phases, strict=True)]


def log_arrays(log_docs: list[tuple[np.ndarray, np.ndarray]], n_layers: int, top_k: int) -> dict[str, np.ndarray]:
    """The trace's routing-log arrays from per-document (ids, phase) pairs (`split_log`), in document order:
    ``routing_log`` int16 [tokens, L, K], ``doc_offsets`` int64 [documents + 1], ``log_phase`` uint8 [tokens]."""
    lens = np.array([len(lg) for lg, _ in log_docs], dtype=np.int64)
    return {
        "routing_log": (np.concatenate([lg for lg, _ in log_docs]) if log_docs
                        else np.zeros((0, n_layers, top_k), np.int16)),
        "doc_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        "log_phase": np.concatenate([ph for _, ph in log_docs]) if log_docs else np.zeros(0, np.uint8),
    }


def model_section(name: str, spec: Any, chash: str, config: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any]:
    """The trace's model identity: name, shape of the MoE layers (`spec`), config and its hash, model shape."""
    moe = list(spec.moe_layers)
    return {
        "name": name,
        "model_type": spec.model_type,
        "config_hash": chash,
        "config": config,
        "moe_layers": moe,
        "n_experts": spec.n_experts,
        "top_k": spec.top_k,
        "n_shared": spec.n_shared,
        "hash_layers": [moe.index(h) for h in spec.hash_layers if h in moe],
        "scoring": spec.scoring,
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
        **shape,
    }


def workload_section(label: str | None, paths: list, sources: list, ids_list: list[list[int]],
                     tokens: tuple[int, int], max_length: int, generate: int, folds: int) -> dict[str, Any]:
    """The trace's workload description (`tokens`: prefill and decode tokens counted)."""
    return {
        "label": label or Path(str(paths[0])).stem,
        "sources": sources,
        "token_sha256": token_stream_hash(ids_list),
        "documents": len(ids_list),
        "prefill_tokens": tokens[0],
        "decode_tokens": tokens[1],
        "max_length": max_length,
        "generate": generate,
        "folds": folds,
    }
