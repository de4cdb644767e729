"""Serving engines that run a trimmed checkpoint for `verify --engine`: each one loads the checkpoint with
the engine's own loader (for llama.cpp: after its own converter) and answers two questions about a token
sequence: the logits at every position, and the greedy continuation of N tokens (`Runner.run`).

An engine lives in its own module and imports its package lazily; a missing package is one error line that
names the extra to install."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from ..errors import MoesiftError

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


def require(engine: str) -> Any:
    """The engine module, after checking that its packages import; else one line naming the extra."""
    if engine not in ENGINES:
        raise MoesiftError(f"unknown engine {engine!r}; choose one of {', '.join(NAMES)}")
    module, extra, packages = ENGINES[engine]
    for pkg in packages:
        try:
            importlib.import_module(pkg)
        except ImportError as e:
            raise MoesiftError(
                f"--engine {engine} needs the Python package {pkg!r}, which is not installed ({e}); "
                f"install it with: pip install \"moesift[{extra}]\""
            ) from None
    return importlib.import_module(f".{module}", __name__)


def check_engine(engine: str, trimmed: str | Path, record: dict[str, Any] | None) -> None:
    """Everything that can be said against running `trimmed` in `engine` without loading a model: the
    package is installed, the checkpoint is a standard trim of a family the engine implements."""
    require(engine).check(Path(trimmed), record)


def open_engine(engine: str, trimmed: str | Path, record: dict[str, Any] | None, work_dir: Path,
                max_tokens: int = 512) -> Runner:
    """Load `trimmed` in `engine` (float32, CPU). `record`: its moesift_plan.json (None when absent).
    `work_dir`: a private temporary directory the engine may write converted files into. `max_tokens`: the
    longest sequence (prompt and generated tokens) it will be asked to run."""
    mod = require(engine)
    return mod.open(Path(trimmed), record, work_dir, max_tokens)


def standard_config(trimmed: Path, record: dict[str, Any] | None, engine: str) -> dict[str, Any]:
    """config.json of a trimmed checkpoint a stock engine can read, or one error line saying why not."""
    import json

    from ..arch import adapter_for

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
    problems = ad.engine_problems(engine, cfg)
    if problems:
        raise MoesiftError(f"{engine} cannot run {str(trimmed)!r} ({cfg.get('model_type')}): {'; '.join(problems)}")
    return cfg
