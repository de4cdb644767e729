"""Workload readers: turn files into a deterministic list of documents to trace.

Accepted inputs (``read_documents(paths, field=None, max_samples=None)``):

- **Text files** (``.txt``, ``.md``, ``.text``, ``.rst``): one document per file. A file larger than
  ``LARGE_TEXT_BYTES`` (64 KiB) is split at blank lines into documents of about ``TEXT_CHUNK_CHARS``
  (16 KiB) each, read 1 MiB at a time; paragraphs are kept whole unless one alone is longer than a
  document (then it is cut at a line break or space), so a long book is traced as many prompts rather
  than truncated to its first ``max_length`` tokens, and a huge file never sits in memory whole.
- **JSONL** (``.jsonl``, ``.ndjson``; ``.json`` holding one object, a list of objects or one object per line): one
  document per object, from the first present of: ``text``; ``messages`` (a chat, rendered later with
  the tokenizer's chat template); ``prompt`` (+ ``completion`` when present, concatenated);
  ``input_ids`` (a list of token ids, already tokenized: traced as is). ``--field NAME`` picks the key;
  its value may be a string, a chat (list of {role, content}) or a list of token ids.
- **Parquet** (``.parquet``) and **saved Hugging Face datasets** (a directory written by
  ``Dataset.save_to_disk``): rows in order, the column named by ``--field`` (default ``text``).
  Needs the optional extra ``pip install 'moesift[data]'`` (pyarrow; ``datasets`` for saved datasets).

Documents keep their input order (files in the order given, rows in file order); ``max_samples`` keeps
the first N. Each document is a dict with exactly one of ``text`` / ``messages`` / ``input_ids``, plus
``source`` (index into the list of sources).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError
from ..core.io import sha256_file

TEXT_EXT = (".txt", ".md", ".text", ".rst")
JSONL_EXT = (".jsonl", ".ndjson", ".json")
PARQUET_EXT = (".parquet",)
LARGE_TEXT_BYTES = 64 * 1024
TEXT_CHUNK_CHARS = 16 * 1024


def read_documents(
    paths: str | os.PathLike | list[str | os.PathLike],
    field: str | None = None,
    max_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Documents of the workload files `paths`, in order (see the module docstring for formats)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise MoesiftError("no workload given; pass --data FILE (text, JSONL, parquet or a saved dataset)")
    if max_samples is not None and max_samples < 1:
        raise MoesiftError(f"--max-samples must be at least 1 (got {max_samples})")
    docs: list[dict[str, Any]] = []
    for i, p in enumerate(paths):
        for d in _read_one(Path(p), field):
            d["source"] = i
            docs.append(d)
            if max_samples is not None and len(docs) >= max_samples:
                return docs
    if not docs:
        names = ", ".join(repr(str(p)) for p in paths)
        raise MoesiftError(f"workload {names} holds no documents; give a file with at least one non-empty text")
    return docs


def source_info(paths: list[str | os.PathLike]) -> list[dict[str, str]]:
    """[{path, sha256}] of the workload sources (a saved dataset: hash over its files, sorted by name)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
            out.append({"path": str(p), "sha256": h.hexdigest()})
        else:
            out.append({"path": str(p), "sha256": sha256_file(p)})
    return out


# ---------------------------------------------------------------------------------------------------


def _read_one(p: Path, field: str | None) -> Iterator[dict[str, Any]]:
    """Documents of one workload file, read lazily (a large text file is never held whole)."""
    if not p.exists():
        raise MoesiftError(f"workload file {str(p)!r} not found")
    if p.is_dir():
        yield from _read_saved_dataset(p, field)
        return
    if not p.is_file():  # a FIFO with no writer would block forever, a device would never end
        raise MoesiftError(f"workload {str(p)!r} is not a regular file (a pipe, socket or device); save the "
                           "documents to a file and pass that")
    ext = p.suffix.lower()
    if ext not in TEXT_EXT + JSONL_EXT + PARQUET_EXT:
        raise MoesiftError(
            f"workload file {str(p)!r} has an unknown extension {ext or '(none)'!r}; use .txt/.md (text), "
            ".jsonl/.json (JSON lines), .parquet, or a directory saved with datasets' save_to_disk"
        )
    try:
        if ext in TEXT_EXT:
            yield from _read_text(p)
        elif ext in JSONL_EXT:
            yield from _read_jsonl(p, field)
        else:
            yield from _read_parquet(p, field)
    except OSError as e:
        raise MoesiftError(f"cannot read workload file {str(p)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MoesiftError(f"workload file {str(p)!r} is not UTF-8 text") from None


READ_CHUNK_BYTES = 1 << 20


def _paragraphs(p: Path) -> Iterator[str]:
    """Paragraphs (text between blank lines) of a text file, read 1 MiB at a time. A paragraph longer than
    ``TEXT_CHUNK_CHARS`` is cut into pieces of at most that many characters, at the last line break or
    space before the limit when there is one, so no piece of the file is ever held whole."""
    dec = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    with open(p, "rb") as f:
        while True:
            raw = f.read(READ_CHUNK_BYTES)
            buf += dec.decode(raw, final=not raw)
            parts = buf.split("\n\n")
            buf = parts.pop()
            yield from (q for part in parts for q in _cut_long(part))
            while len(buf) > TEXT_CHUNK_CHARS:  # a paragraph longer than a document: cut it
                piece, buf = _cut_once(buf)
                yield piece
            if not raw:
                break
    if buf:
        yield buf


def _cut_once(text: str) -> tuple[str, str]:
    """(head of at most TEXT_CHUNK_CHARS characters, ending at a line break or space when possible, rest)."""
    lim = TEXT_CHUNK_CHARS
    cut = max(text.rfind("\n", lim // 2, lim), text.rfind(" ", lim // 2, lim))
    cut = cut + 1 if cut > 0 else lim
    return text[:cut], text[cut:]


def _cut_long(text: str) -> Iterator[str]:
    while len(text) > TEXT_CHUNK_CHARS:
        head, text = _cut_once(text)
        yield head
    yield text


def _read_text(p: Path) -> Iterator[dict[str, Any]]:
    if p.stat().st_size <= LARGE_TEXT_BYTES:
        text = p.read_text(encoding="utf-8")
        if text.strip():
            yield {"text": text}
        return
    cur: list[str] = []
    size = 0
    for para in _paragraphs(p):
        if not para.strip():
            continue
        if cur and size + len(para) > TEXT_CHUNK_CHARS:
            yield {"text": "\n\n".join(cur)}
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        yield {"text": "\n\n".join(cur)}


def encode_prefix(tok: Any, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
    """``tok(text, truncation=True, max_length=max_tokens)["input_ids"]`` without tokenizing the whole text:
    growing prefixes (cut at a space) are tokenized until one yields comfortably more than `max_tokens`
    tokens; the tokens before the cut do not depend on what follows it."""
    n = max(1024, 8 * max_tokens)
    while n < len(text):
        cut = text.rfind(" ", n // 2, n)
        head = text[: cut if cut > 0 else n]
        got = len(tok(head, add_special_tokens=False)["input_ids"])
        if got > max_tokens + 16:
            return list(tok(head, add_special_tokens=add_special_tokens, truncation=True,
                            max_length=max_tokens)["input_ids"])
        n *= 4
    return list(tok(text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_tokens)["input_ids"])


def _doc_from_value(v: Any, where: str, key: str) -> dict[str, Any] | None:
    if isinstance(v, str):
        return {"text": v} if v.strip() else None
    if isinstance(v, list):
        if not v:
            return None
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return {"input_ids": [int(x) for x in v]}
        if all(isinstance(x, dict) and "role" in x and "content" in x for x in v):
            return {"messages": v}
    raise MoesiftError(
        f"{where}: field {key!r} must be a string, a chat (list of {{role, content}}) or a list of token ids"
    )


def _doc_from_record(rec: Any, field: str | None, where: str) -> dict[str, Any] | None:
    if not isinstance(rec, dict):
        raise MoesiftError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if field is not None:
        if field not in rec:
            raise MoesiftError(f"{where}: no field {field!r} (fields: {', '.join(map(str, rec)) or 'none'})")
        return _doc_from_value(rec[field], where, field)
    if "text" in rec:
        return _doc_from_value(rec["text"], where, "text")
    if "messages" in rec:
        return _doc_from_value(rec["messages"], where, "messages")
    if "prompt" in rec:
        prompt, completion = rec["prompt"], rec.get("completion")
        if not isinstance(prompt, str) or not (completion is None or isinstance(completion, str)):
            raise MoesiftError(f"{where}: 'prompt' and 'completion' must be strings")
        return _doc_from_value(prompt + (completion or ""), where, "prompt")
    if "input_ids" in rec:
        return _doc_from_value(rec["input_ids"], where, "input_ids")
    raise MoesiftError(
        f"{where}: no 'text', 'messages', 'prompt' or 'input_ids' field (fields: {', '.join(map(str, rec)) or 'none'}); "
        "pass --field NAME"
    )


def _read_jsonl(p: Path, field: str | None) -> Iterator[dict[str, Any]]:
    """Documents of a JSON-lines file, read line by line (a `.json` holding one object or a list is read
    whole)."""
    if p.suffix.lower() == ".json":
        raw = p.read_text(encoding="utf-8")
        stripped = raw.lstrip()
        if stripped.startswith("["):
            try:
                arr = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MoesiftError(f"{str(p)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
            yield from _docs_of(((f"{str(p)!r} item {i}", r) for i, r in enumerate(arr)), field)
            return
        if stripped.startswith("{") and _whole_json(raw) is not None:
            yield from _docs_of([(repr(str(p)), _whole_json(raw))], field)  # one (possibly multi-line) object
            return
        del raw, stripped
    yield from _docs_of(_json_lines(p), field)


def _json_lines(p: Path) -> Iterator[tuple[str, Any]]:
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{str(p)!r} line {n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise MoesiftError(f"{where} is not valid JSON ({e.msg}); write one JSON object per line") from None


def _docs_of(records: Any, field: str | None) -> Iterator[dict[str, Any]]:
    for where, rec in records:
        d = _doc_from_record(rec, field, where)
        if d is not None:
            yield d


def _whole_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _read_parquet(p: Path, field: str | None) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoesiftError(
            f"reading {str(p)!r} needs pyarrow: pip install 'moesift[data]'"
        ) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise MoesiftError(f"{str(p)!r} is not a readable parquet file ({e})") from None
    return _rows_to_docs(table.column_names, lambda name: table.column(name).to_pylist(), field, str(p))


def _read_saved_dataset(p: Path, field: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MoesiftError(
            f"{str(p)!r} is a directory; reading a saved Hugging Face dataset needs the datasets package: "
            "pip install 'moesift[data]' datasets"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise MoesiftError(f"{str(p)!r} is not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    return _rows_to_docs(list(ds.column_names), lambda name: ds[name], field, str(p))


def _rows_to_docs(columns: list[str], column, field: str | None, name: str) -> list[dict[str, Any]]:
    key = field or next((c for c in ("text", "messages", "input_ids") if c in columns), None)
    if key is None or key not in columns:
        raise MoesiftError(
            f"{name!r} has no column {field or 'text'!r} (columns: {', '.join(columns)}); pass --field NAME"
        )
    docs = []
    for i, v in enumerate(column(key)):
        d = _doc_from_value(v, f"{name!r} row {i}", key)
        if d is not None:
            docs.append(d)
    return docs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def encode_documents(docs: list[dict[str, Any]], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document (pre-tokenized ``input_ids`` as they are; chats through the
    tokenizer's chat template)."""
    out = []
    for d in docs:
        if "input_ids" in d:
            out.append([int(x) for x in d["input_ids"]])
            continue
        if tokenizer is None:
            raise MoesiftError(
                "this model has no tokenizer, so the data must be pre-tokenized: JSONL with an 'input_ids' list"
            )
        if "messages" in d:
            ids = tokenizer.apply_chat_template(d["messages"], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append([int(x) for x in ids])
        else:
            out.append([int(x) for x in tokenizer(d["text"])["input_ids"]])
    return out


def windows(token_lists: list[list[int]], max_length: int) -> list[list[int]]:
    """Consecutive windows of at most `max_length` tokens; windows with fewer than 2 tokens score nothing
    and are dropped."""
    if max_length < 2:
        raise MoesiftError(f"--max-length must be at least 2 (got {max_length})")
    out = []
    for ids in token_lists:
        for i in range(0, len(ids), max_length):
            w = ids[i : i + max_length]
            if len(w) >= 2:
                out.append(w)
    return out


def batch_order(wins: list[list[int]]) -> list[int]:
    """The order in which `batches` lays out the windows, row after row: longest first, ties in order."""
    return sorted(range(len(wins)), key=lambda i: (-len(wins[i]), i))


def batches(wins: list[list[int]], batch_size: int, pad_id: int = 0) -> list[tuple[Any, Any]]:
    """(input_ids [B, S], attention_mask [B, S]) batches, right-padded, longest windows first (`batch_order`)."""
    import torch

    if batch_size < 1:
        raise MoesiftError(f"--batch-size must be at least 1 (got {batch_size})")
    order = batch_order(wins)
    out = []
    for s in range(0, len(order), batch_size):
        group = [wins[i] for i in order[s : s + batch_size]]
        n = max(len(w) for w in group)
        ids = torch.full((len(group), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), n), dtype=torch.long)
        for r, w in enumerate(group):
            ids[r, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[r, : len(w)] = 1
        out.append((ids, mask))
    return out


def token_windows(docs: list[dict[str, Any]], tokenizer: Any, vocab: int, max_length: int) -> tuple[list, int]:
    """(windows, pad id) of the documents to score: their token ids (checked against a vocabulary of `vocab`
    ids when known) cut into `max_length` windows; the tokenizer's pad id, else 0."""
    token_lists = encode_documents(docs, tokenizer)
    for i, ids in enumerate(token_lists):
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise MoesiftError(f"document {i + 1} of the data has token id {bad[0]}, outside the model's "
                               f"vocabulary (0..{vocab - 1})")
    wins = windows(token_lists, max_length)
    if not wins:
        raise MoesiftError("the data holds no document with at least 2 tokens; nothing to score")
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return wins, (int(pad) if pad is not None else 0)
