"""Helpers of the hostile-input tests: in-process CLI calls, a Hugging Face hub cache folder, damaged copies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ERR = "moesift: error:"


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`moesift ARGS` in this process: (exit code, stdout, stderr of the command alone)."""
    from moesift.cli import main

    monkeypatch.setattr(sys, "argv", ["moesift", *[str(a) for a in args]])
    capsys.readouterr()  # drop what building the fixtures printed
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one `moesift: error:` line (no traceback), mentioning each needle."""
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.startswith(ERR)]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def cli_one_error_line(args: list[str], monkeypatch, capsys, *needles: str) -> str:
    """`moesift ARGS` exits 2 with nothing on stdout and one `moesift: error:` line alone on stderr,
    mentioning each needle; that line."""
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and not stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesift: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def with_tokenizer(dst: Path, vocab_size: int) -> None:
    """Save a word-level tokenizer over the vocabulary ("w2" .. "wN") into `dst`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(dst)


def hub_cache(root: Path, saved: Path, repo: str = "acme/q", commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay the saved model folder `saved` out as the hub cache does: `models--org--name/blobs/<sha256>` holds
    the files, `snapshots/<commit>/<name>` are relative links into blobs, `refs/main` names the commit.
    Returns the snapshot folder."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    snap = repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in sorted(saved.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / f.name)
    return snap


def sharded_copy(saved: Path, dst: Path) -> Path:
    shutil.copytree(saved, dst)
    return dst


def workload(path: Path, docs: int = 4, words: int = 12) -> Path:
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 90 + 2}" for j in range(words))})
                              for i in range(docs)) + "\n")
    return path


def plan_file(path: Path, resident: dict[int, list[int]]) -> Path:
    layers = [{"layer": k, "resident": v} for k, v in sorted(resident.items())]
    path.write_text(json.dumps({"schema": "moesift-plan/1", "model": {}, "layers": layers}))
    return path


def half_plan(spec) -> dict[int, list[int]]:
    n = max(spec.top_k, spec.n_experts // 2)
    return {layer: list(range(n)) for layer in spec.moe_layers}


def tree_digest(d: Path) -> dict[str, str]:
    """{relative path: sha256 or 'dir'} of every entry under `d` (to prove a folder was left untouched)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_saved(d: Path, max_shard_size: str = "40KB") -> Path:
    """A tiny qwen3_moe saved in several shards (with index) and a tokenizer."""
    from tiny import build

    m = build("qwen3_moe")
    m.save_pretrained(d, max_shard_size=max_shard_size)
    with_tokenizer(d, m.config.vocab_size)
    return d


def leftovers(folder: Path, name: str) -> list[str]:
    """Hidden temporary entries a writer of `folder/name` may have left (temp files, partial folders, locks)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))
