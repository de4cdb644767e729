"""Choose a serving engine by name for `verify --engine`: check that its packages import (else one line
naming the extra to install), then ask its module to check or open a trimmed checkpoint."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError
from ..formats.gguf import is_gguf
from . import llamacpp, mlx
from .runner import ENGINES, NAMES, Runner

MODULES = {"mlx": mlx, "llama.cpp": llamacpp}


def require(engine: str) -> Any:
    """The engine module, after checking that its packages import; else one line naming the extra."""
    if engine not in ENGINES:
        raise MoesiftError(f"unknown engine {engine!r}; choose one of {', '.join(NAMES)}")
    _module, extra, packages = ENGINES[engine]
    for pkg in packages:
        try:
            importlib.import_module(pkg)
        except ImportError as e:
            raise MoesiftError(
                f"--engine {engine} needs the Python package {pkg!r}, which is not installed ({e}); "
                f"install it with: pip install \"moesift[{extra}]\""
            ) from None
    return MODULES[engine]


def runs_in_llamacpp(model: Any, engine: str, verb: str) -> bool:
    """Whether `model` runs in llama.cpp: `engine` "llama.cpp", or "auto" and a GGUF file. One error line when
    llama.cpp is asked for something that is not a GGUF file (`verb`: what the command does with it)."""
    gguf = isinstance(model, (str, os.PathLike)) and is_gguf(model)
    if engine != "llama.cpp" and not (engine == "auto" and gguf):
        return False
    if not gguf:
        raise MoesiftError(f"--engine llama.cpp {verb} a GGUF file; {str(model)!r} is not one")
    return True


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
