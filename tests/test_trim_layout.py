"""Where a trim puts its bytes: one output shard per source shard that keeps tensors, its tensors in source
order and the first at the same offset within a 4 KiB page as in the source (the header is padded with
spaces, as safetensors allows), so that the kernel copies pages whole; packed shards otherwise."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch
from hostile import make_saved
from safetensors import safe_open

from moesift.apply.trim import trim
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.trimmed import INDEX_FILE, PLAN_FILE, plan_layout


def _offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(bytes before the data, {tensor: (absolute start, length)}) from a safetensors header, read here."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    return base, {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                  for k, v in header.items() if k != "__metadata__"}


def _source_name(name: str, id_map: dict[str, list[int]]) -> str:
    """The source tensor a trimmed per-expert tensor was copied from (new expert id -> original id)."""
    parts = name.split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        i = parts.index("experts")
        parts[i + 1] = str(id_map[parts[2]][int(parts[i + 1])])
    return ".".join(parts)


def test_one_shard_per_source_shard_and_page_offsets_kept(tmp_path):
    src = make_saved(tmp_path / "src", max_shard_size="60KB")
    idx = CheckpointIndex.build(src)
    spec = idx.spec
    keep = max(spec.top_k, spec.n_experts // 2)
    resident = {layer: list(range(1, 1 + 2 * keep, 2))[:keep] for layer in spec.moe_layers}
    out = trim(src, resident, tmp_path / "out", progress=False)
    src_files = sorted({t.file for t in idx.tensors})
    out_files = sorted(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())
    assert len(src_files) >= 3 and len(set(out_files)) == len(src_files)
    id_map = json.loads((out / PLAN_FILE).read_text())["id_map"]
    where = {}
    for f in src_files:
        where.update({k: (f, *v) for k, v in _offsets(src / f)[1].items()})
    for f in sorted(set(out_files)):
        _, tensors = _offsets(out / f)
        with safe_open(str(out / f), "pt") as so:  # the padded header reads as any other
            assert sorted(so.keys()) == sorted(tensors)
        order = sorted(tensors, key=lambda k: tensors[k][0])
        srcs = [where[_source_name(k, id_map)] for k in order]
        assert len({s[0] for s in srcs}) == 1 and [s[1] for s in srcs] == sorted(s[1] for s in srcs), f
        # the first tensor copied whole lands at its source's offset within a page; the rest follow in source
        # order, so they keep it wherever what was left out between them is whole pages (real experts are)
        first = next(k for k, s in zip(order, srcs, strict=True) if s[2] == tensors[k][1])
        assert (tensors[first][0] - where[_source_name(first, id_map)][1]) % 4096 == 0, f
    # a shard size below the source's packs the tensors in order, as before
    small = trim(src, resident, tmp_path / "small", progress=False, max_shard_size="20KB")
    assert len(set(json.loads((small / INDEX_FILE).read_text())["weight_map"].values())) > len(src_files)
    for f in sorted(small.glob("*.safetensors")):
        with safe_open(str(f), "pt") as a:
            for k in a.keys():
                with safe_open(str(out / json.loads((out / INDEX_FILE).read_text())["weight_map"][k]), "pt") as b:
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def _joined(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sorted (file, offset, length) ranges with neighbours joined; an overlap fails."""
    out: list[tuple[int, int, int]] = []
    for f, off, n in ranges:
        if out and out[-1][0] == f:
            assert out[-1][1] + out[-1][2] <= off, "a byte hinted twice"
            if out[-1][1] + out[-1][2] == off:
                out[-1] = (f, out[-1][1], out[-1][2] + n)
                continue
        out.append((f, off, n))
    return out


def test_read_ahead_hints_change_nothing_and_their_absence_is_fine(tmp_path, monkeypatch):
    """The writer asks the kernel for the ranges ahead of the copy; where the hint is missing (macOS) or
    refused by the file system, the same bytes are written."""
    import moesift.apply.writer as writer

    src = make_saved(tmp_path / "src", max_shard_size="60KB")
    spec = CheckpointIndex.build(src).spec
    resident = {layer: list(range(0, spec.n_experts, 2)) for layer in spec.moe_layers}
    asked: list[tuple[int, int, int]] = []
    real = writer._ADVISE

    def stop_when_done(self):  # the hint thread gives up once its file is copied: here it may finish first
        if self.hinter is not None:
            self.hinter.join()
            self.hinter = None

    monkeypatch.setattr(writer.RangeWriter, "_stop_hints", stop_when_done)
    monkeypatch.setattr(writer, "_ADVISE", lambda fd, off, n, advice: (asked.append((os.fstat(fd).st_ino, off, n)),
                                                                     real(fd, off, n, advice)))
    base = trim(src, resident, tmp_path / "base", progress=False)
    layout = plan_layout(CheckpointIndex.build(src), resident)
    copied = sorted(((src / t.src_file).stat().st_ino, off, k) for t in layout if t.slice_keep is None
                    for off, k in t.ranges)
    assert _joined(sorted(asked)) == _joined(copied)  # every copied byte hinted, none twice
    assert len(_joined(sorted(asked))) == len(asked) < len(copied)  # one hint per run of neighbouring ranges
    outs = [base]

    def refuse(fd, off, n, advice):
        raise OSError("not supported")

    for i, hint in enumerate((None, refuse)):
        monkeypatch.setattr(writer, "_ADVISE", hint)
        outs.append(trim(src, resident, tmp_path / f"o{i}", progress=False))
    for f in sorted(base.glob("*.safetensors")):
        assert all((o / f.name).read_bytes() == f.read_bytes() for o in outs[1:]), f.name


def test_hint_thread_stops_with_its_file(tmp_path, monkeypatch):
    """The hints run in their own thread, at most a window ahead of the copy, and end when the file is
    finished, before its source files may close."""

    import moesift.apply.writer as writer

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    gate = threading.Event()
    asked: list[tuple[int, int]] = []

    def slow(fd, off, n, advice):
        gate.wait(5)
        asked.append((off, n))

    monkeypatch.setattr(writer, "_ADVISE", slow)
    monkeypatch.setattr(writer, "_AHEAD", 64 << 10)
    fd = os.open(src, os.O_RDONLY)
    try:
        w = writer.RangeWriter(tmp_path / "out.bin", checksum=None)
        ranges = [(fd, off, 64 << 10) for off in range(0, 1 << 20, 128 << 10)]  # 8 separate runs
        w.expect(ranges)
        for f, off, n in ranges[:2]:
            w.copy(f, off, n, "t")
        gate.set()
        w.finish()
        assert w.hinter is None
        assert all(not t.name.startswith("moesift-hints") for t in threading.enumerate())
    finally:
        os.close(fd)
    assert asked == [(off, n) for _, off, n in ranges[: len(asked)]] and 1 <= len(asked) < len(ranges)
    data = src.read_bytes()
    assert (tmp_path / "out.bin").read_bytes() == data[: 64 << 10] + data[128 << 10: 192 << 10]


def test_shards_written_at_once_give_the_same_files(tmp_path, monkeypatch):
    """Output shards are written by several threads at once (one per core, at most 4): one thread, four, and
    four with plain reads and writes (no kernel copy) give the same files and the same recorded checksums;
    a truncated source is one error that stops every writer and leaves no output."""
    import moesift.apply.trim as trim_mod
    from moesift.core.errors import MoesiftError

    src = make_saved(tmp_path / "src", max_shard_size="60KB")
    spec = CheckpointIndex.build(src).spec
    resident = {layer: list(range(1, spec.n_experts, 2)) for layer in spec.moe_layers}
    assert len(list(src.glob("*.safetensors"))) >= 4
    outs = []
    for i, (n, kernel) in enumerate(((1, True), (4, True), (4, False))):
        monkeypatch.setattr(trim_mod, "files_at_once", lambda files, n=n: min(n, files))
        if not kernel:
            monkeypatch.delattr(os, "copy_file_range")
        outs.append(trim(src, resident, tmp_path / f"o{i}", progress=False))
    base = sorted(p.name for p in outs[0].iterdir())
    for o in outs[1:]:
        assert sorted(p.name for p in o.iterdir()) == base
        for name in base:
            assert (o / name).read_bytes() == (outs[0] / name).read_bytes(), name
    shard = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size - 5000)  # the header still claims the bytes
    import moesift.formats.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "check_header", lambda *a: None)  # past the check, into the copy
    try:
        trim(src, resident, tmp_path / "bad", progress=False)
    except MoesiftError as e:
        assert "ended early" in str(e)
    else:
        raise AssertionError("a truncated source was trimmed")
    assert not (tmp_path / "bad").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("moesift-")]


def test_a_stop_cut_short_is_completed(tmp_path, monkeypatch):
    """SIGTERM unwinds as an exception, also while a writer is stopping its threads: the checksum thread is
    still told to end and the file is closed, so the clean-up after it returns instead of waiting for the
    checksum thread forever."""
    import moesift.apply.writer as writer

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 18))
    real = writer.RangeWriter._stop_hints
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as a signal handler's exception would, mid-teardown
        real(self)

    monkeypatch.setattr(writer.RangeWriter, "_stop_hints", interrupted)
    fd = os.open(src, os.O_RDONLY)
    try:
        w = writer.RangeWriter(tmp_path / "out.bin", checksum="sha256")
        w.copy(fd, 0, 1 << 18, "t")
        try:
            w.finish()
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the interrupt was lost")
        done = threading.Event()
        threading.Thread(target=lambda: (w.close(), done.set()), daemon=True).start()
        assert done.wait(10), "close() waited for a checksum thread that was never told to end"
        assert w.fd == -1 and not w.t.is_alive()
    finally:
        os.close(fd)
