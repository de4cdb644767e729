"""Serving engines that run a trimmed checkpoint for `verify --engine`: each one loads the checkpoint with
the engine's own loader (for llama.cpp: after its own converter) and answers two questions about a token
sequence: the logits at every position, and the greedy continuation of N tokens (`Runner.run`).

An engine lives in its own module and imports its package lazily; a missing package is one error line that
names the extra to install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from ..arch import adapter_for
from ..core.errors import MoesiftError
from ..formats.checkpoint import checked_headers

# engine name -> (module in this package, pip extra, packages it imports)
ENGINES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mlx": ("mlx", "mlx", ("mlx", "mlx_lm")),
    "llama.cpp": ("llamacpp", "gguf", ("llama_cpp", "gguf")),
}
NAMES = ("transformers", *ENGINES)


class Runner(Protocol):
    """A trimmed checkpoint loaded in an engine."""

    name: str  # engine and version, e.g. "mlx-lm 0.32.2"
    notes: list[str]  # what the conversion changed that the comparison does not look at (may be empty)

    def run(self, ids: list[int], n: int) -> tuple[Any, list[int]]:
        """(logits, greedy): float32 numpy array [len(ids), vocab] of next-token logits at every position, and
        the n tokens greedy decoding appends to `ids` (argmax every step; end-of-sequence not special)."""

    def close(self) -> None: ...


def standard_config(trimmed: Path, record: dict[str, Any] | None, engine: str) -> dict[str, Any]:
    """config.json of a trimmed checkpoint a stock engine can read, or one error line saying why not."""
    p = trimmed / "config.json"
    if not p.is_file():
        raise MoesiftError(f"{str(trimmed)!r} has no config.json; is it a trimmed checkpoint directory?")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise MoesiftError(f"{str(p)!r} is not valid JSON; the trimmed checkpoint is damaged") from None
    if (record is not None and not record.get("standard", True)) or "moesift" in cfg and isinstance(cfg["moesift"], dict):
        counts = sorted({int(v) for v in (record or {}).get("experts_per_layer", {}).values()}) or "several"
        raise MoesiftError(
            f"{str(trimmed)!r} keeps a different number of experts per layer ({counts}); {engine} builds every "
            "MoE layer with one expert count, so it cannot load it: trim with a uniform plan (plan --uniform)"
        )
    ad = adapter_for(cfg)
    stored = {name for header, _ in checked_headers(trimmed).values() for name in header if name != "__metadata__"}
    problems = ad.engine_problems(engine, cfg) + ad.config_engine_problems(engine, cfg, stored)
    if problems:
        raise MoesiftError(f"{engine} cannot run {str(trimmed)!r} ({cfg.get('model_type')}): {'; '.join(problems)}")
    return cfg
