"""llama.cpp: convert a trimmed checkpoint to an F32 GGUF file with llama.cpp's own converter
(`convert_hf_to_gguf.py`, run in a subprocess) and run it with llama-cpp-python on the CPU.

The converter is not part of the llama-cpp-python wheel: `MOESIFT_LLAMA_CPP` names a directory holding it (a
llama.cpp checkout, or `vendor/llama.cpp` of the llama-cpp-python sdist, whose converter matches the bundled
llama.cpp). The converter refuses a byte-pair tokenizer whose pre-tokenizer it does not recognise (it knows
the ones of published models by a hash); then the GGUF file gets llama.cpp's "default" pre-tokenizer, which
changes how text would be split into tokens but nothing the comparison looks at: verify feeds token ids."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from .llamacpp_child import LlamaChild
from .runner import standard_config

ENV = "MOESIFT_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"

# Runs llama.cpp's converter as its own script would, except that an unrecognised BPE pre-tokenizer becomes
# "default" (with a note on stderr) instead of an error.
_DRIVER = r"""
import sys
conv, src, out, outtype = sys.argv[1:5]
sys.path.insert(0, conv)
sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", out]
import convert_hf_to_gguf as c
try:
    from conversion import base as b
    owner = b.TextModel
except ImportError:  # older single-file converters
    owner = c.TextModel if hasattr(c, "TextModel") else c.Model
orig = owner.get_vocab_base_pre

def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        print("moesift-note: BPE pre-tokenizer not recognised by llama.cpp; written as 'default'", file=sys.stderr)
        return "default"

owner.get_vocab_base_pre = pre
c.main()
"""


def converter_dir() -> Path:
    d = os.environ.get(ENV)
    hint = (f"set {ENV} to a directory holding llama.cpp's {CONVERTER} (a llama.cpp checkout, or vendor/llama.cpp "
            "of the llama-cpp-python sdist: pip download --no-binary :all: --no-deps llama-cpp-python==VERSION)")
    if not d:
        raise MoesiftError(f"--engine llama.cpp converts with llama.cpp's own converter; {hint}")
    p = Path(d)
    if p.is_file() and p.name == CONVERTER:
        p = p.parent
    if not (p / CONVERTER).is_file():
        raise MoesiftError(f"{ENV}={d!r} holds no {CONVERTER}; {hint}")
    return p


def _version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "?"


def check(trimmed: Path, record: dict[str, Any] | None) -> dict[str, Any]:
    cfg = standard_config(trimmed, record, "llama.cpp")
    converter_dir()
    if not any((trimmed / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MoesiftError(f"{str(trimmed)!r} has no tokenizer files; llama.cpp's converter writes the vocabulary "
                           "into the GGUF file and needs them (copy the source model's tokenizer files there)")
    return cfg


def convert(trimmed: Path, out: Path, outtype: str = "f32") -> list[str]:
    """Write `out` (GGUF, `outtype`: f32, f16 or bf16) from `trimmed` with llama.cpp's converter; returns its
    notes."""
    conv = converter_dir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(conv), str(trimmed), str(out), outtype], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0 or not out.is_file():
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        last = " ".join(lines[-1].split())[:300] if lines else f"exit code {r.returncode}"
        raise MoesiftError(f"llama.cpp's converter ({conv / CONVERTER}) could not convert {str(trimmed)!r}: {last}")
    return [x.split("moesift-note: ", 1)[1] for x in r.stderr.splitlines() if x.startswith("moesift-note: ")]


# Runs the GGUF file with llama-cpp-python in a child process (llama.cpp aborts the whole process on a failed
# internal check), one JSON request per line on stdin: {"ids": [...], "n": N, "out": PATH} -> the logits at
# every position saved to PATH (.npy, float32) and {"greedy": [N tokens]} on stdout.
_WORKER = r"""
import json, os, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

ERRORS = []

@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):  # keep llama.cpp's error lines for the message, print nothing
    if level == 4:
        ERRORS.append(text.decode(errors="replace").strip())

llama_cpp.llama_log_set(_quiet, None)
path, n_ctx = sys.argv[1], int(sys.argv[2])
try:
    # the KV cache in float32 too (llama.cpp keeps it in float16 unless told)
    llm = Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                n_threads=max(1, min(4, os.cpu_count() or 1)),
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
except Exception as e:
    print(json.dumps({"error": "; ".join(ERRORS[-2:]) or str(e)}), flush=True)
    sys.exit(1)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = req["ids"]
    llm.reset()
    llm.eval(ids)
    np.save(req["out"], np.array(llm.scores[: len(ids)], dtype=np.float32))
    out = []
    for _ in range(req["n"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    print(json.dumps({"greedy": out}), flush=True)
llm.close()
"""


class LlamaCppRunner:
    def __init__(self, gguf_path: Path, work_dir: Path, n_ctx: int = 512):
        self.name = f"llama.cpp (llama-cpp-python {_version()}, F32 GGUF)"
        self.notes: list[str] = []
        self.work = work_dir
        self.n = 0
        self.child = LlamaChild(["-c", _WORKER, str(gguf_path), str(n_ctx)], work_dir / "llama.stderr",
                                "the converted checkpoint")
        msg = self.child.read()
        if "error" in msg:
            self.close()
            raise MoesiftError(f"llama.cpp cannot load the GGUF file converted from the checkpoint: {msg['error']}")

    def run(self, ids: list[int], n: int) -> tuple[Any, list[int]]:
        self.n += 1
        out = self.work / f"logits-{self.n}.npy"
        self.child.send({"ids": list(ids), "n": n, "out": str(out)})
        greedy = self.child.read()["greedy"]
        logits = np.load(out)
        out.unlink()
        return logits, greedy

    def close(self) -> None:
        self.child.close()


def open(trimmed: Path, record: dict[str, Any] | None, work_dir: Path, max_tokens: int) -> LlamaCppRunner:  # noqa: A001
    check(trimmed, record)
    out = work_dir / "model-f32.gguf"
    notes = convert(trimmed, out)
    n_ctx = max(64, max_tokens + 8)
    runner = LlamaCppRunner(out, work_dir, n_ctx=n_ctx)
    runner.notes = notes
    return runner
