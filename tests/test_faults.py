"""Full disks and I/O errors: every write at the file layer (os.write, copy_file_range, sendfile, Python file
objects, renames) can fail with ENOSPC or EIO at any point; each writer then prints one error line, exits 2,
leaves its target as it was and no temporary file behind."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import random
import threading
from pathlib import Path

import pytest
from hostile import (
    assert_one_error,
    half_plan,
    leftovers,
    make_saved,
    plan_file,
    run_cli,
    tree_digest,
    workload,
)

from moesift.formats.checkpoint import CheckpointIndex


class Faults:
    """Counts write calls; from call number `at` on, writes fail with `code` (a full disk stays full) after
    writing half of what they were given; a rename fails only when it is call number `at`."""

    def __init__(self, at: int | None = None, code: int = errno.ENOSPC):
        self.at, self.code, self.n = at, code, 0
        self.lock = threading.Lock()
        self.fired = False

    def hit(self, persistent: bool = True) -> bool:
        with self.lock:
            self.n += 1
            fire = self.at is not None and (self.n >= self.at if persistent else self.n == self.at)
            self.fired |= fire
            return fire

    def error(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))


class _File:
    """A file object whose write() goes through `Faults`."""

    def __init__(self, f, faults: Faults):
        self._f, self._faults = f, faults

    def write(self, data):
        if self._faults.hit():
            self._f.write(data[: len(data) // 2])
            raise self._faults.error()
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def inject(faults: Faults, monkeypatch):
    real_open, real_write, real_cfr, real_sendfile = builtins.open, os.write, os.copy_file_range, os.sendfile
    real_replace, real_rename = os.replace, os.rename

    def opener(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _File(f, faults) if any(c in mode for c in "wax+") else f

    def write(fd, data):
        if faults.hit():
            real_write(fd, bytes(data[: len(data) // 2]))
            raise faults.error()
        return real_write(fd, data)

    def cfr(src, dst, count, offset_src=None, offset_dst=None):
        if faults.hit():
            raise faults.error()
        return real_cfr(src, dst, count, offset_src, offset_dst)

    def sendfile(out_fd, in_fd, offset, count):
        if faults.hit():
            raise faults.error()
        return real_sendfile(out_fd, in_fd, offset, count)

    def renamer(real):
        def f(a, b, *rest, **k):
            if faults.hit(persistent=False):
                raise faults.error()
            return real(a, b, *rest, **k)

        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", opener)
        m.setattr(io, "open", opener)
        m.setattr(os, "write", write)
        m.setattr(os, "copy_file_range", cfr)
        m.setattr(os, "sendfile", sendfile)
        m.setattr(os, "replace", renamer(real_replace))
        m.setattr(os, "rename", renamer(real_rename))
        yield faults


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moesift.record.tracer import trace
    from moesift.selection.planner import plan

    d = tmp_path_factory.mktemp("faults")
    src = make_saved(d / "src")
    data = workload(d / "w.jsonl")
    t = d / "w.trace"
    trace(src, data, out=t, max_length=16, progress=False)
    p = plan_file(d / "p.json", half_plan(CheckpointIndex.build(src).spec))
    plan(t, keep=0.5)  # warm imports
    return src, data, t, p


def _commands(setup, out: Path) -> dict[str, list]:
    src, data, t, p = setup
    return {
        "trim": ["trim", src, "--plan", p, "--out", out],
        "trace": ["trace", src, "--data", data, "--max-length", "8", "--out", out],
        "plan": ["plan", t, "--keep", "0.5", "--out", out],
        "report": ["report", t, "--out", out],
        "merge": ["merge", t, t, "--out", out],
    }


def _state(p: Path):
    if not p.exists():
        return None
    return tree_digest(p) if p.is_dir() else p.read_bytes()


@pytest.mark.parametrize("command", ["trim", "trace", "plan", "report", "merge"])
def test_write_failures_leave_the_target_untouched(command, setup, tmp_path, monkeypatch, capsys):
    rng = random.Random(hash(command) % 1000)
    out = tmp_path / "target"
    args = _commands(setup, out)[command]
    with inject(Faults(), monkeypatch) as dry:  # count the write calls of a successful run
        code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    total = dry.n
    assert total >= 2, total
    cases = 0
    points = sorted({1, total, *rng.sample(range(1, total + 1), min(total, 6))})
    for i, at in enumerate(points):
        for code_ in (errno.ENOSPC, errno.EIO):
            overwrite = (i + code_) % 2 == 0
            if not overwrite and out.exists():
                (__import__("shutil").rmtree(out) if out.is_dir() else out.unlink())
            if overwrite and not out.exists():
                assert run_cli(args, monkeypatch, capsys)[0] == 0
            before = _state(out)
            with inject(Faults(at, code_), monkeypatch) as f:
                rc, _, err = run_cli([*args, "--force"] if overwrite else args, monkeypatch, capsys)
            assert f.fired, (at, total)
            assert_one_error(rc, err, os.strerror(code_))
            assert _state(out) == before, (command, at, code_)
            assert leftovers(tmp_path, "target") == [], (command, at, code_, leftovers(tmp_path, "target"))
            cases += 1
    assert cases >= 4
    code, _, err = run_cli([*args, "--force"], monkeypatch, capsys)  # nothing stale blocks the next write
    assert code == 0, err
