"""Workload readers: formats, field selection, order, limits, and one clear error per bad input."""

from __future__ import annotations

import json
import sys

import pytest

import moesift
from moesift.core.errors import MoesiftError
from moesift.formats.workload import LARGE_TEXT_BYTES, read_documents


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first paragraph\n\nsecond paragraph\n")
    assert read_documents(p) == [{"text": "first paragraph\n\nsecond paragraph\n", "source": 0}]


def test_large_text_file_splits_at_blank_lines(tmp_path):
    paras = [f"paragraph {i} " + "word " * 200 for i in range(200)]
    p = tmp_path / "book.md"
    p.write_text("\n\n".join(paras))
    assert p.stat().st_size > LARGE_TEXT_BYTES
    docs = read_documents(p)
    assert len(docs) > 1
    joined = "\n\n".join(d["text"] for d in docs)
    assert joined == "\n\n".join(paras), "no text lost, paragraphs never cut, order kept"


def test_jsonl_forms(tmp_path):
    p = _jsonl(tmp_path / "w.jsonl", [
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "Q: 1+1? ", "completion": "A: 2"},
        {"prompt": "only a prompt"},
        {"input_ids": [1, 2, 3]},
        "",
        {"text": "   "},  # blank documents are skipped
    ])
    docs = read_documents(p)
    assert [list(d)[0] for d in docs] == ["text", "messages", "text", "text", "input_ids"]
    assert docs[2]["text"] == "Q: 1+1? A: 2" and docs[4]["input_ids"] == [1, 2, 3]


def test_field_order_and_max_samples(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"body": f"a{i}", "text": "x"} for i in range(3)])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"body": f"b{i}"} for i in range(3)]))
    docs = read_documents([a, b], field="body")
    assert [d["text"] for d in docs] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert [d["source"] for d in docs] == [0, 0, 0, 1, 1, 1]
    assert [d["text"] for d in read_documents([a, b], field="body", max_samples=4)] == ["a0", "a1", "a2", "b0"]
    assert read_documents([a, b], field="body") == docs, "deterministic"


@pytest.mark.parametrize(
    "name,content,field,match",
    [
        ("missing.jsonl", None, None, "not found"),
        ("w.csv", "a,b\n", None, "unknown extension"),
        ("w.jsonl", '{"text": "a"}\n{"body": "b"}\n', None, "line 2: no 'text', 'messages', 'prompt'"),
        ("w.jsonl", '{"text": "a"}\n', "body", "line 1: no field 'body'"),
        ("w.jsonl", '{"text": "a"}\n{oops\n', None, "line 2 is not valid JSON"),
        ("w.jsonl", '{"text": 5}\n', None, "must be a string"),
        ("w.jsonl", "\n\n", None, "holds no documents"),
        ("w.txt", "  \n", None, "holds no documents"),
    ],
)
def test_bad_inputs(tmp_path, name, content, field, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(MoesiftError, match=match):
        read_documents(p, field=field)


def test_unreadable_file(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MoesiftError, match="not UTF-8"):
        read_documents(p)
    with pytest.raises(MoesiftError, match="no workload"):
        read_documents([])


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    p = tmp_path / "w.parquet"
    pq.write_table(pa.table({"content": ["x", "y"], "n": [1, 2]}), p)
    assert [d["text"] for d in read_documents(p, field="content")] == ["x", "y"]
    with pytest.raises(MoesiftError, match="no column 'text'"):
        read_documents(p)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    for mod in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import pyarrow` raises ImportError, installed or not
    p = tmp_path / "w.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(MoesiftError, match=r"moesift\[data\]"):
        read_documents(p)


def test_saved_dataset_directory(tmp_path):
    try:
        import datasets
    except ImportError:
        d = tmp_path / "ds"
        d.mkdir()
        with pytest.raises(MoesiftError, match="datasets"):
            read_documents(d)
        return
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(d))
    assert [x["text"] for x in read_documents(d, max_samples=2)] == ["a", "b"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"] + [f"w{i}" for i in range(80)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        chat_template="{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                      "{% if add_generation_prompt %}<assistant> {% endif %}",
    )


def test_text_and_chat_are_tokenized(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3_moe"), dtype=torch.float32).eval()
    tok = _tokenizer()
    p = _jsonl(tmp_path / "w.jsonl", [
        {"text": "w1 w2 w3 w4"},
        {"messages": [{"role": "user", "content": "w5 w6"}]},
        {"prompt": "w7 ", "completion": "w8 w9"},
    ])
    t = moesift.trace(model, p, tokenizer=tok, progress=False, max_length=3)
    # truncation to max_length: 3 + 3 ("<user> w5 w6") + 3 tokens
    assert t.workload["prefill_tokens"] == 9 and t.workload["documents"] == 3
    assert (t.counts.sum(axis=1) == 9 * t.top_k).all()
    with pytest.raises(MoesiftError, match="no tokenizer"):
        moesift.trace(model, p, progress=False)
    bad = _jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 500]}])
    with pytest.raises(MoesiftError, match="outside the model's vocabulary"):
        moesift.trace(model, bad, progress=False)


# ---- bounded memory on huge inputs -------------------------------------------------------------------


def test_one_line_text_file_is_cut_into_bounded_documents(tmp_path):
    """A text file of one enormous line (no blank lines) is split into documents of at most 16 KiB, cut
    at spaces, losing nothing; asking for one document reads only the start of the file."""
    import tracemalloc

    from moesift.formats.workload import TEXT_CHUNK_CHARS

    words = " ".join(f"w{i % 997}é" for i in range(120_000))  # ~900 KB, multi-byte characters
    p = tmp_path / "line.txt"
    p.write_text(words, encoding="utf-8")
    docs = read_documents(p)
    assert len(docs) > 40 and max(len(d["text"]) for d in docs) <= TEXT_CHUNK_CHARS
    assert "".join(d["text"] for d in docs) == words
    assert all(d["text"].endswith(" ") for d in docs[:-1])  # cut at a space, never inside a word
    nospace = tmp_path / "nospace.txt"
    nospace.write_text("x" * 200_000)
    docs = read_documents(nospace)
    assert [len(d["text"]) for d in docs] == [TEXT_CHUNK_CHARS] * 12 + [200_000 - 12 * TEXT_CHUNK_CHARS]
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(24):
            f.write("word " * 200_000)  # 24 MB, one line
    tracemalloc.start()
    docs = read_documents(big, max_samples=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(docs) == 2 and peak < 16 * 2**20, peak


def test_blank_line_splitting_is_unchanged_for_ordinary_books(tmp_path):
    """Streaming gives the same documents as splitting the whole text at blank lines."""
    import random

    from moesift.formats.workload import TEXT_CHUNK_CHARS

    rng = random.Random(0)
    paras = [" ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(1, 900))) for _ in range(900)]
    text = "\n\n".join(paras) + "\n\n\n" + "tail"
    p = tmp_path / "book.md"
    p.write_text(text)
    expect, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if cur and size + len(para) > TEXT_CHUNK_CHARS:
            expect.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    expect.append("\n\n".join(cur))
    assert [d["text"] for d in read_documents(p)] == expect


def test_encode_prefix_matches_tokenizing_everything():
    """A long document is cut to max_length tokens without tokenizing the rest, with the same ids."""
    import random

    from transformers import AutoTokenizer

    from moesift.assets import ROOT
    from moesift.formats.workload import encode_prefix

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "qwen3moe-ref")
    rng = random.Random(1)
    vocab = ["the", "cat", "déjà", "vu", "ß", "12345", "\n", "  ", "tokenisation", "!", "日本語", "x" * 40]
    seen: list[int] = []

    def spy(text, **k):  # records how much text reaches the tokenizer
        seen.append(len(text))
        return tok(text, **k)

    for n in (1, 7, 32, 300, 2000):
        for _ in range(3):
            text = "".join(rng.choice(vocab) + rng.choice([" ", "", " "]) for _ in range(30_000))
            want = tok(text, truncation=True, max_length=n)["input_ids"]
            seen.clear()
            assert encode_prefix(spy, text, n) == want
            if n <= 300:
                assert max(seen) < len(text) // 4, (n, seen)
    nospace = "abcdefgh" * 50_000
    assert encode_prefix(tok, nospace, 64) == tok(nospace, truncation=True, max_length=64)["input_ids"]
