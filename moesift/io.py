"""Atomic writes: nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import MoesiftError


def check_output_path(path: str | os.PathLike, force: bool = True) -> Path:
    """Check that `path` can be written: its directory exists and (unless `force`) it does not exist yet."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise MoesiftError(f"output directory {str(parent)!r} does not exist; create it first")
    if p.exists() and not force:
        raise MoesiftError(f"{str(p)!r} already exists; pass --force to overwrite it")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    p = check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, p)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any, force: bool = True) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = True) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
