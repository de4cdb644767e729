"""`moesift` command line: a thin layer over the public functions (each command = one function).

Commands are grouped by stage (record, analyze, plans, apply, quality); importing a group registers its
commands on `app`, in the order `moesift --help` lists them."""

from __future__ import annotations

from ..surfaces.entry import run_app

# isort: off
from . import record, analyze, plans, apply, quality  # noqa: F401  (registers the commands, in this order)
# isort: on
from .app import app, emit_json

__all__ = ["app", "emit_json", "main"]


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    run_app(app)
