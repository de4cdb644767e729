"""`moesift` command line: a thin layer over the public functions (each command = one function)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from .errors import MoesiftError

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
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- commands: one section per area; each imports its function lazily so `--help` stays fast ----

# [foundation: trace, show, merge, export]


@app.command("families")
def families_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the supported MoE families (transformers model_type values)."""
    from .arch import supported_model_types

    names = supported_model_types()
    if json_out:
        emit_json({"model_types": names})
    else:
        for n in names:
            typer.echo(n)

# [analysis: report, compare]


@app.command("report")
def report_cmd(
    traces: list[str] = typer.Argument(..., help="Trace files (moesift traces or expert-trace/1 JSON) of one model."),
    model: str = typer.Option(None, "--model", help="Model directory or hub id (local cache): bytes from its headers."),
    out: str = typer.Option(None, "--out", help="Write a self-contained HTML report here."),
    locality_tokens: int = typer.Option(16384, "--locality-tokens", help="Logged tokens (whole documents) used for SRP/SCH."),
    cache_tokens: int = typer.Option(4096, "--cache-tokens", help="Logged tokens used for the LRU/LFU/Belady simulation."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with every figure."),
) -> None:
    """How concentrated routing is, what a resident set saves, and how far the trace can be trusted."""
    from .report import report

    res = report(traces, model=model, out=out, json=json_out, locality_tokens=locality_tokens, cache_tokens=cache_tokens)
    if json_out:
        emit_json(res)


@app.command("compare")
def compare_cmd(
    traces: list[str] = typer.Argument(..., help="Two or more trace files of one model."),
    keep: float = typer.Option(0.5, "--keep", help="Fraction of experts in each workload's resident set."),
    target: float = typer.Option(0.9, "--target", help="Coverage every workload must reach in the smallest union."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Cross-coverage, Jaccard of resident sets, and the smallest union that serves every workload."""
    from .report import compare

    res = compare(traces, keep=keep, json=json_out, target=target)
    if json_out:
        emit_json(res)

# [plan / trim / verify: plan, plan diff, trim, verify]

# [quality: eval, sweep, demo]

# [scale-out: place, cache, import]


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
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
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            sys.stderr.write(f"moesift: error: {e.format_message()}\n")
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
