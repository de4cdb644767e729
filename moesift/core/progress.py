"""The one progress display of moesift: a transient rich bar on stderr.

It is drawn only when `enabled` and stderr is a terminal; otherwise the same object accepts the same calls
and draws nothing, so callers never test for it. Counting bars show `done/total` and an optional unit;
byte bars (`transfer=True`) show bytes and speed.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def progress_bar(enabled: bool, unit: str = "", transfer: bool = False, remaining: bool = False) -> Progress:
    """A rich `Progress` (use as a context manager, `add_task`, `advance`)."""
    console = Console(stderr=True)
    cols: list = [TextColumn("[progress.description]{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    if unit:
        cols.append(TextColumn(unit))
    cols.append(TimeElapsedColumn())
    if remaining:
        cols.append(TimeRemainingColumn())
    return Progress(*cols, console=console, transient=True, disable=not (enabled and console.is_terminal))
