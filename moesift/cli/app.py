"""The `moesift` Typer application and what its commands share."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from ..core.errors import MoesiftError
from ..core.io import json_default

app = typer.Typer(
    name="moesift",
    help="Shrink a Mixture-of-Experts model to the experts a workload uses, and prove the result matches "
    "the full model restricted the same way.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (for --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")


def split_values(values: list[str] | None, cast: Any, flag: str) -> list[Any]:
    """Values of a repeatable option that also takes comma-separated lists ("--top-k 4,2 --top-k 1")."""
    out = []
    for v in values or []:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise MoesiftError(f"{flag}: cannot read {part.strip()!r} as a number") from None
    return out
