"""Checksums a trim records of its files: the algorithm is named in the record, the digests equal an
independent computation, and `moesift verify TRIMMED --files` re-computes them (old records: sha256)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import pytest
from hostile import run_cli

from moesift.apply.trim import trim
from moesift.core.errors import MoesiftError
from moesift.formats.checkpoint import CheckpointIndex
from moesift.formats.trimmed import PLAN_FILE


def _digest(path: Path, algorithm: str) -> str:
    data = path.read_bytes()
    return (blake3.blake3(data) if algorithm == "blake3" else hashlib.sha256(data)).hexdigest()


@pytest.fixture(scope="module")
def source(tiny_dir, tmp_path_factory):
    """A tiny qwen3_moe checkpoint and a plan file keeping half of the experts of every MoE layer."""
    src = tiny_dir("qwen3_moe")
    spec = CheckpointIndex.build(src).spec
    keep = max(spec.top_k, spec.n_experts // 2)
    plan = {"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": spec.n_experts},
            "layers": [{"layer": layer, "resident": list(range(1, keep + 1))} for layer in spec.moe_layers]}
    p = tmp_path_factory.mktemp("plan") / "plan.json"
    p.write_text(json.dumps(plan))
    return src, p


def _record(out: Path) -> dict:
    return json.loads((out / PLAN_FILE).read_text())


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_record_names_algorithm_and_digests_are_independent(source, tmp_path, algorithm):
    src, plan = source
    out = trim(src, plan, tmp_path / "out", progress=False, checksum=algorithm, max_shard_size="20KB")
    rec = _record(out)
    assert rec["checksum"] == algorithm
    assert len([f for f in rec["files"] if f.endswith(".safetensors")]) >= 2  # several shards, each hashed
    assert {"config.json", "model.safetensors.index.json"} <= set(rec["files"])
    for name, digest in rec["files"].items():
        assert digest == _digest(out / name, algorithm), name


def test_default_is_blake3_and_none_records_nothing(source, tmp_path, monkeypatch, capsys):
    src, plan = source
    assert _record(trim(src, plan, tmp_path / "a", progress=False))["checksum"] == "blake3"
    for flags in (["--no-checksums"], ["--checksum", "none"]):
        out = tmp_path / flags[-1].lstrip("-")
        code, _, err = run_cli(["trim", src, "--plan", plan, "--out", out, *flags], monkeypatch, capsys)
        assert code == 0, err
        rec = _record(out)
        assert rec["checksum"] is None and not any(rec["files"].values())
        code, _, err = run_cli(["verify", out, "--files"], monkeypatch, capsys)
        assert code == 2 and "without checksums" in err and len(err.strip().splitlines()) == 1
    assert _record(trim(src, plan, tmp_path / "b", progress=False, checksums=False, checksum="sha256"))["checksum"] \
        is None
    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", tmp_path / "c", "--checksum", "md5"],
                           monkeypatch, capsys)
    assert code == 2 and "md5" in err and not (tmp_path / "c").exists()
    with pytest.raises(MoesiftError, match="unknown checksum"):
        trim(src, plan, tmp_path / "d", progress=False, checksum="crc32")


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_verify_files_passes_then_names_a_flipped_shard(source, tmp_path, monkeypatch, capsys, algorithm):
    src, plan = source
    out = tmp_path / "out"
    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", out, "--checksum", algorithm,
                            "--max-shard-size", "20KB"], monkeypatch, capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["verify", out, "--files"], monkeypatch, capsys)
    n = len(_record(out)["files"])
    assert code == 0 and f"OK: all {n} files" in stdout and algorithm in stdout
    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, stdout, _ = run_cli(["verify", out, "--files"], monkeypatch, capsys)
    assert code == 1
    assert f"MISMATCH {shard.name}" in stdout and stdout.strip().splitlines()[-1].endswith(shard.name)
    code, stdout, _ = run_cli(["verify", out, "--files", "--json"], monkeypatch, capsys)
    r = json.loads(stdout)
    assert code == 1 and not r["ok"] and [f["file"] for f in r["files"] if f["status"] != "ok"] == [shard.name]
    (out / "config.json").unlink()
    code, stdout, _ = run_cli(["verify", out, "--files"], monkeypatch, capsys)
    assert code == 1 and "MISSING  config.json" in stdout


def test_verify_files_accepts_old_record_without_algorithm(source, tmp_path, monkeypatch, capsys):
    src, plan = source
    out = trim(src, plan, tmp_path / "out", progress=False, checksum="sha256")
    rec = _record(out)
    del rec["checksum"]  # records written before the algorithm was named hold sha256
    (out / PLAN_FILE).write_text(json.dumps(rec, indent=2) + "\n")
    code, stdout, _ = run_cli(["verify", out, "--files"], monkeypatch, capsys)
    assert code == 0 and "recorded sha256" in stdout


def test_verify_files_without_record_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, stdout, err = run_cli(["verify", tmp_path, "--files"], monkeypatch, capsys)
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1 and PLAN_FILE in err
