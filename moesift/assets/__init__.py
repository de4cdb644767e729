"""Bundled reference MoE models and workloads (shipped inside the package, usable offline).

- ``reference_model(name)``: directory of a small trained MoE (config.json, model.safetensors, tokenizer files,
  README.md model card). Names in ``MODELS``: ``qwen3moe-ref`` (Qwen3-MoE: softmax routing, no shared expert),
  ``deepseekv3-ref`` (DeepSeek-V3: shared expert, sigmoid routing with a selection bias, group-limited),
  ``olmoe-ref`` (OLMoE: 64 small experts, top-8, no shared expert) and ``qwen2moe-ref`` (Qwen2-MoE: a gated
  shared expert, un-normalised top-k weights).
- ``workload(domain, split)``: JSONL file with a ``text`` field. Domains in ``DOMAINS``: code, prose,
  literature, math. Splits in ``SPLITS``: ``trace`` (prompts for tracing) and ``eval`` (held-out texts, disjoint
  from the trace prompts and from the models' training data).

Both are built by ``tools/build_corpus.py`` and ``tools/train_reference.py`` in the source repository.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import MoesiftError

ROOT = Path(__file__).resolve().parent
MODELS = ("qwen3moe-ref", "deepseekv3-ref", "olmoe-ref", "qwen2moe-ref")
DOMAINS = ("code", "prose", "literature", "math")
SPLITS = ("trace", "eval")


def reference_model(name: str = "qwen3moe-ref") -> Path:
    """Directory of a bundled reference model (load it with transformers' Auto classes or moesift.load_model)."""
    if name not in MODELS:
        raise MoesiftError(f"unknown reference model {name!r}; choose one of {', '.join(MODELS)}")
    d = ROOT / "models" / name
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise MoesiftError(
            f"reference model {name!r} is missing from {d}; reinstall moesift, or rebuild it with "
            f"tools/train_reference.py"
        )
    return d


def workload(domain: str, split: str = "trace") -> Path:
    """JSONL file (field ``text``) of a bundled workload: ``split`` is "trace" or "eval"."""
    if domain not in DOMAINS:
        raise MoesiftError(f"unknown workload domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise MoesiftError(f"unknown workload split {split!r}; choose one of {', '.join(SPLITS)}")
    p = ROOT / "workloads" / f"{domain}.{split}.jsonl"
    if not p.is_file():
        raise MoesiftError(f"bundled workload {p} is missing; reinstall moesift, or rebuild it with "
                           f"tools/build_corpus.py --workloads")
    return p


def workloads(split: str = "trace") -> dict[str, Path]:
    """{domain: path} for every bundled domain."""
    return {d: workload(d, split) for d in DOMAINS}
