"""kill -9 at random moments of a trim of a checkpoint of a few hundred MB: the target is never a broken
checkpoint, the next trim to it succeeds and removes what the killed ones left. Two concurrent trims to one
--out: one succeeds, the other stops with "is being written by another moesift process (pid N)"."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
from hostile import ERR, assert_one_error, half_plan, leftovers, plan_file, run_cli

from moesift.core.io import file_checksum
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.trimmed import PLAN_FILE

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

MB = 1 << 20


def big_checkpoint(d: Path, experts: int = 32, hidden: int = 256, inter: int = 512, layers: int = 4) -> Path:
    """A qwen3_moe checkpoint of about 200 MB (float32, two shards with an index): names and shapes from the
    real model class built on the meta device, data random bytes (nothing here runs the model)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=inter, moe_intermediate_size=inter, num_hidden_layers=layers,
                         num_experts=experts, num_experts_per_tok=2, max_position_embeddings=64)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    d.mkdir()
    cfg.save_pretrained(d)
    sd = {k: (list(v.shape), v.numel() * 4) for k, v in m.state_dict().items()}
    names = sorted(sd)
    block = os.urandom(MB)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        header, off = {}, 0
        for k in part:
            header[k] = {"dtype": "F32", "shape": sd[k][0], "data_offsets": [off, off + sd[k][1]]}
            off += sd[k][1]
            weight_map[k] = fname
        hb = json.dumps(header).encode()
        hb += b" " * ((-len(hb)) % 8)
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            while off > 0:
                f.write(block[: min(off, MB)])
                off -= MB
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    src = big_checkpoint(d / "src")
    idx = CheckpointIndex.build(src)
    assert idx.total_bytes() > 150 * MB
    return src, plan_file(d / "p.json", half_plan(idx.spec))


def _fork_trim(args: list, pace: float = 0.0) -> int:
    """Run `moesift ARGS` in a forked child (this process's imports are already done: a start costs
    milliseconds, so the random moments fall inside the work). `pace`: seconds of pause before each copied
    range, so that the work spans many moments even where the file system copies by reference (reflinks
    on XFS or Btrfs finish a trim of this size in milliseconds)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            from moesift.cli import main

            if pace:
                from moesift.apply.writer import RangeWriter

                flush = RangeWriter.flush

                def paced(self):
                    if self.pending is not None:
                        time.sleep(pace)
                    flush(self)

                RangeWriter.flush = paced

            sys.argv = ["moesift", *[str(a) for a in args]]
            try:
                main()
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
        finally:
            os._exit(code)
    return pid


def _wait_for_claim(folder: Path, pid: int, timeout: float = 30.0) -> Path | None:
    """Wait until process `pid` has claimed the output: its own partial folder exists, which is returned (None
    if the process ended first). The lock file is no sign of it: a killed trim leaves its lock file behind,
    released, for the next one to take."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        for n in os.listdir(folder):
            if n.startswith(".out.") and f".{pid}." in n and n.endswith(".partial"):
                return folder / n
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return None
        time.sleep(0.002)
    return None


def _written(folder: Path) -> int | None:
    """Bytes in the files of a partial output folder; None once it is gone (committed or removed)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(folder))
    except FileNotFoundError:
        return None


def _wait_for_bytes(folder: Path, pid: int, target: int) -> bool:
    """Wait until the trim writing `folder` has written `target` bytes or has committed it: a moment chosen by
    progress, not by the clock (how fast a trim runs varies several-fold with the machine's load). False if
    the process ended (and was reaped) meanwhile."""
    while (n := _written(folder)) is not None and n < target:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    return True


def _valid(out: Path) -> None:
    """A complete trimmed checkpoint: headers check out and every file matches its recorded checksum."""
    rec = json.loads((out / PLAN_FILE).read_text())
    CheckpointIndex.build(out)
    for name, digest in rec["files"].items():
        assert file_checksum(out / name, rec.get("checksum", "sha256")) == digest, name


PACE = 0.002


def test_kill_9_during_trim_then_next_trim_cleans_up(big, tmp_path, monkeypatch, capsys):
    src, plan = big
    out = tmp_path / "out"
    args = ["trim", src, "--plan", plan, "--out", out, "--max-shard-size", "40MB", "--force"]
    # one undisturbed run: how many bytes the work writes once the output is claimed
    pid = _fork_trim(args, PACE)
    assert _wait_for_claim(tmp_path, pid)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _valid(out)
    total = sum(f.stat().st_size for f in out.iterdir())
    rng = random.Random(13)
    left_partial = 0
    for i in range(12):
        pid = _fork_trim(args, PACE)
        claimed = _wait_for_claim(tmp_path, pid)
        assert claimed
        # killed when a random share of the output is written (past the end: after the commit)
        running = _wait_for_bytes(claimed, pid, int(rng.uniform(0, 1.1) * total))
        sig = signal.SIGTERM if i == 5 else signal.SIGKILL
        if running:
            os.kill(pid, sig)
            os.waitpid(pid, 0)  # reaped: its pid is no longer running
        stale = [n for n in leftovers(tmp_path, "out") if n.endswith(".partial")]
        left_partial += any(f".{pid}." in n for n in stale)
        if sig == signal.SIGTERM:
            assert not [n for n in stale if f".{pid}." in n], stale  # a terminated trim cleans up after itself
        if out.exists():
            _valid(out)  # the previous complete checkpoint, or the new one: never a half-written one
    assert left_partial >= 4, left_partial  # most kills hit the work, not its start or end
    stale = [n for n in leftovers(tmp_path, "out") if not n.endswith(LOCK_TAIL)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and ERR not in err, err
    for name in stale:
        assert name in err
    _valid(out)
    assert leftovers(tmp_path, "out") == []


LOCK_TAIL = ".moesift-lock"


def test_two_concurrent_trims_one_wins(big, tmp_path, monkeypatch, capsys):
    src, plan = big
    out = tmp_path / "out"
    args = ["trim", src, "--plan", plan, "--out", out]
    pid = _fork_trim(args)
    assert _wait_for_claim(tmp_path, pid)
    os.kill(pid, signal.SIGSTOP)  # paused with the output claimed: the second trim meets it whatever the timing
    try:
        code, _, err = run_cli(args, monkeypatch, capsys)
    finally:
        os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert_one_error(code, err, f"{str(out)!r} is being written by another moesift process (pid {pid})")
    _valid(out)
    assert leftovers(tmp_path, "out") == []
