"""How the `moesift` command runs: every user error is one `moesift: error:` line and exit code 2, never a
traceback; Ctrl-C is one `moesift: interrupted` line and exit code 130; SIGTERM unwinds like an exception,
so temporary outputs are removed on the way out."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Any

import click
import typer

from ..core.errors import MoesiftError


def run_app(app: typer.Typer) -> None:
    """Run the typer `app` on sys.argv with moesift's error discipline; exits the process."""
    _exit_cleanly_on_sigterm()
    try:
        rc = _click_command(app)(standalone_mode=False)  # click returns typer.Exit(n)'s code instead of exiting
        if rc == 130:  # typer turns Ctrl-C into Exit(130); outputs were already cleaned up on the way out
            sys.stderr.write("moesift: interrupted\n")
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except MoesiftError as e:
        sys.stderr.write(f"moesift: error: {e}\n")
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code if code is not None else 0)
    except typer.Abort:
        sys.stderr.write("moesift: aborted\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.stderr.write("moesift: interrupted\n")
        sys.exit(130)
    except OSError as e:  # the system refused a read or write (disk full, I/O error, permissions)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.stderr.write(f"moesift: error: {e.strerror or e}{where}\n")
        sys.exit(2)
    except Exception as e:  # usage errors (missing argument, unknown option or command)
        if isinstance(e, _click_exception_types()):
            sys.stderr.write(f"moesift: error: {e.format_message()}\n")
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                sys.stderr.write(f"(see `{ctx.command_path} --help`)\n")
            sys.exit(2)
        raise


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM unwinds like an exception, so temporary outputs are removed (kill -9 cannot be caught: what it
    leaves is removed by the next write to the same target)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


@functools.cache
def _click_command(app: typer.Typer) -> Any:
    """The click command typer builds from `app` (built once per process: in-process callers such as the
    property tests run thousands of commands)."""
    return typer.main.get_command(app)


def _click_exception_types() -> tuple[type, ...]:
    """Click's exception class, and typer's vendored copy of it where typer ships one (typer >= 0.2x)."""
    vendored = getattr(getattr(typer, "_click", None), "exceptions", None)
    types: list[type] = [click.exceptions.ClickException]
    if vendored is not None:
        types.append(vendored.ClickException)
    return tuple(types)
