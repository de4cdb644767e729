"""The README and docs/ are tests: every `moesift` command and Python block they show runs as written in the
README's quick-start folder, page by page in order, against the bundled reference model.

The quick-start setup block of the README is run by bash (paths moved into a temporary folder); each page of
docs/ then starts where the README's quick start ends (its five commands have run). The substitutions are:
hub ids become the bundled model (`MODEL`, with sizes written for them scaled down),
and tracing, evaluation, calibration and the demo get small sizes (flags appended, never changed). A command
or Python block that needs a GPU, a serving engine's files or an optional engine says so with a
`# needs: ...` comment and is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import run_cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/tracing.md", "docs/reports.md", "docs/planning.md", "docs/trimming.md",
         "docs/offload.md", "docs/evaluation.md", "docs/engines.md", "docs/multi-gpu.md", "docs/lm-eval.md"]
HUB_IDS = ("Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3")
# sizes written for those hub models, scaled to the bundled one (7.5 MiB)
HUB_SIZES = {"--memory 24 ": "--memory 0.005 "}
# flags appended so each command runs in seconds on the tiny bundled model
SMALL = {
    "trace": ["--max-samples", "8", "--max-length", "64"],
    "eval": ["--max-samples", "2", "--max-length", "64"],
    "verify": ["--max-samples", "2"],
    "sweep": ["--max-samples", "2", "--max-length", "64", "--no-timing"],
    "calibrate": ["--max-samples", "4", "--max-length", "32"],
    "demo": ["--quick"],
    "generate": ["--max-new-tokens", "4"],
}
SETUP_MARK = "mkdir -p /tmp/moesift-try"


def _blocks(page: str) -> list[tuple[str, str]]:
    """(language, text) of the fenced blocks of `page`, in order."""
    text = (ROOT / page).read_text()
    return re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, re.S | re.M)


def steps(page: str) -> list[tuple[str, str, str | None]]:
    """(kind, text, reason to skip) of every moesift command line and Python block on `page`."""
    out = []
    for lang, body in _blocks(page):
        if lang == "python":
            m = re.search(r"#\s*needs:\s*(.+)", body)
            out.append(("python", body, m.group(1).strip() if m else None))
            continue
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*", "", line)  # environment settings before the command
            if not line.startswith("moesift "):
                continue
            m = re.search(r"#\s*needs:\s*(.+)$", line)
            out.append(("cli", line, m.group(1).strip() if m else None))
    return out


def _argv(line: str) -> list[str]:
    """The command's arguments (comment cut off, hub ids replaced by the bundled model, small sizes)."""
    if any(hub in line for hub in HUB_IDS):
        for hub in HUB_IDS:
            line = line.replace(hub, "MODEL")
        for big, small in HUB_SIZES.items():
            line = line.replace(big, small)
    args = shlex.split(line, comments=True)[1:]
    return args + SMALL.get(args[0], []) if args else args


def _world(tmp: Path) -> Path:
    """Run the README's quick-start setup block with its folder moved to `tmp`."""
    setup = next(body for _, body in _blocks("README.md") if SETUP_MARK in body)
    script = "\n".join(ln for ln in setup.splitlines() if not ln.startswith(". .venv"))
    script = script.replace("/tmp/moesift-try", str(tmp / "try"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, check=True)
    return tmp / "try"


def _run_cli_step(page: str, text: str, monkeypatch, capsys) -> None:
    code, _, err = run_cli(_argv(text), monkeypatch, capsys)
    assert code == 0, f"{page}: `{text}` exited {code}:\n{err[-1500:]}"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs_as_written(page, tmp_path, monkeypatch, capsys):
    work = _world(tmp_path)
    monkeypatch.chdir(work)
    if page != "README.md":  # the docs continue from the README's quick start
        for kind, text, reason in steps("README.md"):
            if kind == "cli" and not reason:
                _run_cli_step("README.md", text, monkeypatch, capsys)
    todo = steps(page)
    skipped = []
    namespace: dict = {"__name__": "__docs__"}  # one Python session per page
    for kind, text, reason in todo:
        if reason:
            skipped.append(f"{text.splitlines()[0][:60]}: {reason}")
            continue
        if kind == "python":
            code = text
            for hub in HUB_IDS:
                code = code.replace(hub, "MODEL")
            exec(compile(code, f"{page} (python block)", "exec"), namespace)
            continue
        _run_cli_step(page, text, monkeypatch, capsys)
    ran = len(todo) - len(skipped)
    assert page == "docs/lm-eval.md" or ran > 0, f"{page} shows no command that runs here"
    if skipped:
        sys.stderr.write(f"{page}: skipped {len(skipped)}: " + "; ".join(skipped) + "\n")


def test_the_harness_finds_the_quick_start():
    cmds = [t for k, t, reason in steps("README.md") if k == "cli" and not reason]
    assert [shlex.split(c, comments=True)[1] for c in cmds] == ["trace", "report", "plan", "trim", "verify"]
    assert os.path.basename(PAGES[0]) == "README.md"


@pytest.mark.parametrize("page", PAGES)
def test_no_command_of_the_page_is_missed(page):
    """Every line of a code block that runs `moesift COMMAND` is one of the page's steps (none slips past the
    harness because of its layout)."""
    import typer.main

    from moesift.cli import app

    names = set(typer.main.get_command(app).commands)
    found = {t for k, t, _ in steps(page) if k == "cli"}
    for lang, body in _blocks(page):
        if lang == "python":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|\s)moesift (\S+)", line)
            if m and m.group(1) in names:
                assert any(m.group(0).strip() in t for t in found), f"{page}: not run: {line.strip()}"
