"""Hostile inputs and shared outputs: hub-cache checkpoints, concurrent writers, modes, model folders,
stale temporary outputs, damaged safetensors, bad devices, links in a source folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import (
    ERR,
    assert_one_error,
    half_plan,
    hub_cache,
    make_saved,
    plan_file,
    run_cli,
    tree_digest,
    workload,
)

from moesift.core.io import claim
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.trimmed import PLAN_FILE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    d = make_saved(tmp_path_factory.mktemp("hostile") / "src")
    assert len(list(d.glob("*.safetensors"))) > 1
    return d


@pytest.fixture(scope="module")
def spec(saved):
    return CheckpointIndex.build(saved).spec


@pytest.fixture(scope="module")
def traced(saved, tmp_path_factory) -> Path:
    from moesift.record.tracer import trace

    d = tmp_path_factory.mktemp("traced")
    out = d / "w.trace"
    trace(saved, workload(d / "w.jsonl"), out=out, max_length=16, progress=False)
    return out


@pytest.fixture
def hub(saved, tmp_path, monkeypatch) -> Path:
    """The saved model as `acme/q` in a hub cache folder that HF_HUB_CACHE points to."""
    import huggingface_hub.constants as hc

    root = tmp_path / "hub"
    snap = hub_cache(root, saved)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))
    return snap


# ---- hub cache ----------------------------------------------------------------------------------------


def test_hub_cache_sharded_checkpoint_works_with_every_command(hub, tmp_path, monkeypatch, capsys):
    assert all(p.is_symlink() for p in hub.iterdir())
    data = workload(tmp_path / "w.jsonl")
    t = tmp_path / "w.trace"
    code, _, err = run_cli(["trace", "acme/q", "--data", data, "--out", t, "--max-length", "16"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", t, "--model", "acme/q", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["savings"]["total_bytes"] > 0
    p = tmp_path / "p.json"
    code, _, err = run_cli(["plan", t, "--model", "acme/q", "--keep", "0.5", "--out", p], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["trim", "acme/q", "--plan", p, "--out", tmp_path / "small"], monkeypatch, capsys)
    assert code == 0, err
    small = tmp_path / "small"
    assert (small / "tokenizer.json").is_file() and not (small / "tokenizer.json").is_symlink()
    code, out, err = run_cli(["verify", "acme/q", small, "--max-new-tokens", "3", "--max-samples", "2", "--json"],
                             monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["top1_agreement"] == 1.0


def test_hub_cache_trim_then_verify_from_the_command_line(saved, tmp_path, monkeypatch, capsys):
    """`HF_HUB_CACHE=... moesift trim acme/q` as a user types it (a new process reads the variable); then
    verify (in this process, pointed at the same cache)."""
    import huggingface_hub.constants as hc

    root = tmp_path / "hub"
    hub_cache(root, saved)
    (tmp_path / "p.json").write_text(json.dumps({"schema": "moesift-plan/1", "model": {}, "layers": [
        {"layer": layer, "resident": ids} for layer, ids in half_plan(CheckpointIndex.build(saved).spec).items()]}))
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "moesift.cli"]
    r = subprocess.run(cmd + ["trim", "acme/q", "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "t")],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))
    code, _, err = run_cli(["verify", "acme/q", tmp_path / "t", "--max-new-tokens", "2", "--max-samples", "2"],
                           monkeypatch, capsys)
    assert code == 0, err


def test_hub_cache_links_leaving_the_repository_are_refused(hub, spec, tmp_path, monkeypatch, capsys):
    # one shard now links into another repository's blobs: still "outside the model directory"
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    shard = sorted(hub.glob("model-0000*.safetensors"))[1]
    shutil.copyfile(shard, other / "b")
    shard.unlink()
    os.symlink(os.path.join("..", "..", "..", "models--evil--x", "blobs", "b"), shard)
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    code, _, err = run_cli(["trim", "acme/q", "--plan", p, "--out", tmp_path / "o"], monkeypatch, capsys)
    assert_one_error(code, err, "outside")
    assert not (tmp_path / "o").exists()


def test_plain_folder_links_outside_are_refused(saved, tmp_path, monkeypatch, capsys, spec):
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    shard = sorted(d.glob("model-0000*.safetensors"))[0]
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", shard)
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    code, _, err = run_cli(["trim", d, "--plan", p, "--out", tmp_path / "o"], monkeypatch, capsys)
    assert_one_error(code, err, "outside")


# ---- one writer at a time -----------------------------------------------------------------------------


def test_second_writer_of_a_target_is_refused(saved, spec, traced, tmp_path, monkeypatch, capsys):
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    data = workload(tmp_path / "w.jsonl")
    cases = {
        "trim": ["trim", saved, "--plan", p, "--out"],
        "plan": ["plan", traced, "--keep", "0.5", "--out"],
        "report": ["report", traced, "--out"],
        "trace": ["trace", saved, "--data", data, "--max-length", "8", "--out"],
        "merge": ["merge", traced, traced, "--out"],
        "export": ["export", traced, "--out"],
    }
    for name, args in cases.items():
        out = tmp_path / f"{name}.out"
        with claim(out):
            code, _, err = run_cli([*args, out], monkeypatch, capsys)
        assert_one_error(code, err, f"{str(out)!r} is being written by another moesift process (pid {os.getpid()})")
        assert not out.exists(), name
        code, _, err = run_cli([*args, out], monkeypatch, capsys)  # claim released: now it works
        assert code == 0 and out.exists(), (name, err)
        assert not [q.name for q in tmp_path.iterdir() if q.name.startswith(f".{name}.out")], name


# ---- modes follow the umask ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_follow_the_umask(saved, spec, traced, tmp_path, monkeypatch, capsys, umask):
    old = os.umask(umask)
    try:
        p = tmp_path / "p.json"
        outs = {
            "plan": ["plan", traced, "--keep", "0.5", "--out", p],
            "trim": ["trim", saved, "--plan", p, "--out", tmp_path / "t"],
            "report": ["report", traced, "--out", tmp_path / "r.html"],
            "merge": ["merge", traced, traced, "--out", tmp_path / "m.trace"],
            "export": ["export", traced, "--out", tmp_path / "e.json"],
            "trace": ["trace", saved, "--data", workload(tmp_path / "w.jsonl"), "--max-length", "8", "--out",
                      tmp_path / "n.trace"],
        }
        for name, args in outs.items():
            code, _, err = run_cli(args, monkeypatch, capsys)
            assert code == 0, (name, err)
    finally:
        os.umask(old)
    fmode, dmode = 0o666 & ~umask, 0o777 & ~umask
    for f in ["p.json", "r.html", "m.trace", "e.json", "n.trace", *[f"t/{q.name}" for q in (tmp_path / "t").iterdir()]]:
        assert (tmp_path / f).stat().st_mode & 0o777 == fmode, (f, oct((tmp_path / f).stat().st_mode))
    assert (tmp_path / "t").stat().st_mode & 0o777 == dmode


# ---- never into a model folder ------------------------------------------------------------------------


def test_no_command_writes_into_a_model_directory(saved, spec, traced, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(saved, src)
    other = tmp_path / "other_model"
    shutil.copytree(saved, other)
    before, before_other = tree_digest(src), tree_digest(other)
    weights = sorted(src.glob("*.safetensors"))[0]
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    data = workload(tmp_path / "w.jsonl")
    cases = [
        ["trace", src, "--data", data, "--max-length", "8", "--out", weights, "--force"],
        ["report", traced, "--out", src / "r.html", "--force"],
        ["plan", traced, "--keep", "0.5", "--out", src / "p.json", "--force"],
        ["merge", traced, traced, "--out", src / "m.trace", "--force"],
        ["export", traced, "--out", src / "config.json", "--force"],
        ["trim", src, "--plan", p, "--out", src / "sub", "--force"],
        ["trim", src, "--plan", p, "--out", src, "--force"],
        ["trim", src, "--plan", p, "--out", other, "--force"],  # a model folder moesift did not write
    ]
    for args in cases:
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err)
        assert any(w in err for w in ("model directory", "overlaps")), err
    assert tree_digest(src) == before and tree_digest(other) == before_other


# ---- stale temporary outputs --------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_of_dead_writers_are_removed(saved, spec, traced, tmp_path, monkeypatch, capsys):
    dead = _dead_pid()
    stale = [tmp_path / f".t.{dead}.0badf00d.partial", tmp_path / f".p.json.{dead}.0badf00d.tmp",
             tmp_path / f".t.{dead}.0badf00d.old"]
    stale[0].mkdir()
    (stale[0] / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    stale[1].write_text("{")
    stale[2].mkdir()
    alive = tmp_path / f".t.{os.getpid()}.00000001.partial"  # a running writer's: kept
    alive.mkdir()
    p = plan_file(tmp_path / "p0.json", half_plan(spec))
    code, _, err = run_cli(["trim", saved, "--plan", p, "--out", tmp_path / "t"], monkeypatch, capsys)
    assert code == 0, err
    assert not stale[0].exists() and not stale[2].exists() and alive.exists()
    assert stale[0].name in err and str(dead) in err
    code, _, err = run_cli(["plan", traced, "--keep", "0.5", "--out", tmp_path / "p.json"], monkeypatch, capsys)
    assert code == 0 and not stale[1].exists() and stale[1].name in err


# ---- odd --out values ----------------------------------------------------------------------------------


def test_out_that_is_a_directory_or_the_current_one(saved, spec, traced, tmp_path, monkeypatch, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    for args in (["report", traced, "--out", d, "--force"], ["plan", traced, "--keep", "0.5", "--out", d, "--force"],
                 ["export", traced, "--out", d, "--force"]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err, "is a directory")
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    code, _, err = run_cli(["trim", saved, "--plan", p, "--out", d, "--force"], monkeypatch, capsys)
    assert_one_error(code, err, "did not write")
    assert (d / "keep.txt").read_text() == "mine"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, _, err = run_cli(["trim", saved, "--plan", p, "--out", out, "--force"], monkeypatch, capsys)
        assert_one_error(code, err)
    assert list(work.iterdir()) == [] and not [q for q in tmp_path.iterdir() if q.name.startswith("..")]


# ---- damaged checkpoints -------------------------------------------------------------------------------


def _rewrite_header(f: Path, edit) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = edit(header)
    hb = (new if isinstance(new, bytes) else json.dumps(new).encode())
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def _tensors(h):
    return [k for k in h if k != "__metadata__"]


def _overlap(h):
    ks = sorted(_tensors(h), key=lambda k: h[k]["data_offsets"][0])
    a, b = ks[0], ks[1]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
    return h


def _set(h, key, value):
    h[_tensors(h)[0]][key] = value
    return h


def _drop_offsets(h):
    del h[_tensors(h)[0]]["data_offsets"]
    return h


def _index(d: Path, edit) -> None:
    idx = d / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    edit(obj)
    idx.write_text(json.dumps(obj))


def _shard(d: Path) -> Path:
    return sorted(d.glob("model-0000*.safetensors"))[1]


DAMAGE = {
    "bad_header": lambda d: _rewrite_header(_shard(d), lambda h: b"{not json" + b" " * 7),
    "length_past_end": lambda d: _shard(d).write_bytes(struct.pack("<Q", 1 << 40) + _shard(d).read_bytes()[8:]),
    "truncated": lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-100]),
    "list_header": lambda d: _rewrite_header(_shard(d), lambda h: [h]),
    "no_data_offsets": lambda d: _rewrite_header(_shard(d), _drop_offsets),
    "overlapping": lambda d: _rewrite_header(_shard(d), _overlap),
    "unknown_dtype": lambda d: _rewrite_header(_shard(d), lambda h: _set(h, "dtype", "Q7")),
    "size_not_shape": lambda d: _rewrite_header(_shard(d), lambda h: _set(h, "shape", [3, 3])),
    "index_weight_map_list": lambda d: _index(d, lambda o: o.__setitem__("weight_map", list(o["weight_map"]))),
    "index_weight_map_number": lambda d: _index(d, lambda o: o["weight_map"].__setitem__(next(iter(o["weight_map"])), 3)),
    "index_names_missing_tensor": lambda d: _index(d, lambda o: o["weight_map"].__setitem__("ghost.weight",
                                                                                            _shard(d).name)),
}


@pytest.fixture(scope="module")
def trimmed(saved, spec, tmp_path_factory) -> tuple[Path, Path]:
    from moesift.apply.trim import trim

    d = tmp_path_factory.mktemp("trimmed")
    p = plan_file(d / "p.json", half_plan(spec))
    return trim(saved, p, d / "t", progress=False), p


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_give_one_error_line(damage, saved, trimmed, traced, tmp_path, monkeypatch, capsys):
    d = tmp_path / "bad"
    shutil.copytree(saved, d)
    DAMAGE[damage](d)
    small, p = trimmed
    data = workload(tmp_path / "w.jsonl")
    commands = [
        ["trim", d, "--plan", p, "--out", tmp_path / "o"],
        ["report", traced, "--model", d],
        ["plan", traced, "--keep", "0.5", "--model", d],
        ["verify", d, small, "--max-samples", "1", "--max-new-tokens", "1"],
        ["trace", d, "--data", data, "--max-length", "8"],
    ]
    for args in commands:
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err)
        assert str(d) in err, (args[0], err)
    assert not (tmp_path / "o").exists()


# ---- devices ------------------------------------------------------------------------------------------


def test_unusable_devices_give_one_error_line(saved, trimmed, tmp_path, monkeypatch, capsys):
    import torch

    data = workload(tmp_path / "w.jsonl")
    devices = ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for dev in devices:
        code, _, err = run_cli(["trace", saved, "--data", data, "--device", dev], monkeypatch, capsys)
        assert_one_error(code, err, dev)
        code, _, err = run_cli(["verify", saved, trimmed[0], "--device", dev], monkeypatch, capsys)
        assert_one_error(code, err, dev)


# ---- links in a source folder -------------------------------------------------------------------------


def test_trim_does_not_follow_links_out_of_the_source(saved, spec, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(saved, src)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    os.symlink(secret, src / "notes.txt")
    os.symlink("../secret.txt", src / "relative_notes.md")
    (src / "README.md").write_text("model card")
    os.symlink("README.md", src / "MODEL_CARD.md")  # inside the folder: copied (as a file)
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    code, _, err = run_cli(["trim", src, "--plan", p, "--out", tmp_path / "t"], monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "t"
    assert not (out / "notes.txt").exists() and not (out / "relative_notes.md").exists()
    assert "notes.txt" in err and "relative_notes.md" in err and ERR not in err
    assert (out / "MODEL_CARD.md").read_text() == "model card" and not (out / "MODEL_CARD.md").is_symlink()
    rec = json.loads((out / PLAN_FILE).read_text())
    assert rec["skipped_links"] == ["notes.txt", "relative_notes.md"]


def test_claim_without_flock_uses_the_pid_in_the_lock_file(saved, spec, tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    p = plan_file(tmp_path / "p.json", half_plan(spec))
    lock = tmp_path / ".t.moesift-lock"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{writer.pid}\n")  # a running writer
        code, _, err = run_cli(["trim", saved, "--plan", p, "--out", tmp_path / "t"], monkeypatch, capsys)
        assert_one_error(code, err, f"being written by another moesift process (pid {writer.pid})")
    finally:
        writer.kill()
        writer.wait()
    lock.write_text(f"{_dead_pid()}\n")  # a writer that died: its claim is taken over
    code, _, err = run_cli(["trim", saved, "--plan", p, "--out", tmp_path / "t"], monkeypatch, capsys)
    assert code == 0, err
    assert not lock.exists() and (tmp_path / "t" / PLAN_FILE).is_file()
