"""Edges that cut: interrupts, full disks while claiming an output, long output names, folders a person
added files to, outputs that would replace the command's own input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from hostile import assert_one_error, half_plan, plan_file, run_cli

import moesift
from moesift.core.io import LOCK_SUFFIX, write_json

REF = Path(moesift.__file__).parent / "assets" / "models" / "qwen3moe-ref"
ROOT = Path(__file__).resolve().parents[1]


def _hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_ctrl_c_says_interrupted_and_leaves_nothing(tmp_path):
    """SIGINT during a long command: exit 130, one 'moesift: interrupted' line, no partial output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from moesift.cli import main; sys.argv = ['moesift', 'demo', '--quick', '--out', 'out']; main()")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    first = p.stderr.readline()  # the demo's first progress line: the command is running
    assert first, "the demo printed nothing"
    p.send_signal(signal.SIGINT)
    err = first + p.stderr.read()
    assert p.wait(timeout=120) == 130, err
    assert "moesift: interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_a_full_disk_while_claiming_names_the_target_and_leaves_no_lock(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "plan.json"
    try:
        write_json(out, {"a": 1})
        raise AssertionError("the write succeeded")
    except moesift.MoesiftError as e:
        msg = str(e)
    assert repr(str(out)) in msg and "No space left on device" in msg and "left as it was" in msg
    assert not out.exists() and _hidden(tmp_path) == []


def test_a_long_legal_output_name_is_written(tmp_path, monkeypatch, capsys):
    name = "p" * 240 + ".json"  # 245 characters: the filesystem takes it, hidden names must too
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", REF.parent.parent / "workloads" / "code.trace.jsonl",
                            "--max-samples", 4, "--max-length", 32, "--out", trace], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["plan", trace, "--keep", 0.5, "--out", tmp_path / name], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / name).read_text())["schema"] == "moesift-plan/1"
    code, _, err = run_cli(["plan", trace, "--keep", 0.5, "--out", tmp_path / name, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert _hidden(tmp_path) == [] and not any(n.endswith(LOCK_SUFFIX) for n in os.listdir(tmp_path))


def test_trim_force_keeps_a_folder_someone_added_files_to(tmp_path, monkeypatch, capsys):
    spec = moesift.checkpoint_index(REF).spec
    plan = plan_file(tmp_path / "p.json", half_plan(spec))
    out = tmp_path / "T"
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", out, "--force"], monkeypatch, capsys)
    assert code == 0, err  # a folder moesift wrote is replaced
    (out / "NOTES.txt").write_text("mine")
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", out, "--force"], monkeypatch, capsys)
    assert_one_error(code, err, "NOTES.txt", "moesift did not write")
    assert (out / "NOTES.txt").read_text() == "mine"


def test_no_command_writes_over_its_own_input(tmp_path, monkeypatch, capsys):
    """Every writer refuses an --out that is one of its inputs, --force or not."""
    data = REF.parent.parent / "workloads" / "code.trace.jsonl"
    trace = tmp_path / "in.trace"
    code, _, err = run_cli(["trace", REF, "--data", data, "--max-samples", 4, "--max-length", 32, "--out", trace],
                           monkeypatch, capsys)
    assert code == 0, err
    before = trace.read_bytes()
    copy = tmp_path / "data.jsonl"
    copy.write_bytes(data.read_bytes())
    for args in (["report", trace, "--out", trace, "--force"],
                 ["plan", trace, "--keep", 0.5, "--out", trace, "--force"],
                 ["place", trace, "--gpus", 2, "--out", trace, "--force"],
                 ["calibrate", REF, "--data", copy, "--out", copy, "--force", "--max-samples", 2],
                 ["sweep", REF, "--trace", trace, "--data", copy, "--out", copy, "--force"],
                 ["merge", trace, trace, "--out", trace, "--force"],
                 ["export", trace, "--out", trace, "--format", "moesift-trace/1", "--force"],
                 ["trace", REF, "--data", copy, "--max-samples", 2, "--out", copy, "--force"]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err, "a file this command reads")
    assert trace.read_bytes() == before
    assert copy.read_bytes() == data.read_bytes()


def test_a_fifo_as_data_is_refused_not_waited_on(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    code, _, err = run_cli(["trace", REF, "--data", fifo, "--out", tmp_path / "t.trace"], monkeypatch, capsys)
    assert_one_error(code, err, "not a regular file")


def test_a_binary_file_as_vllm_records_is_one_line(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "records.jsonl"
    junk.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(["import", junk, "--format", "vllm", "--model", REF, "--out", tmp_path / "t.trace"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "not UTF-8 text")


def test_a_plan_layer_given_as_a_string_is_quoted(tmp_path, monkeypatch, capsys):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "moesift-plan/1", "model": {}, "layers": [{"layer": "0", "resident": [0]}]}))
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", tmp_path / "T"], monkeypatch, capsys)
    assert_one_error(code, err, "(got '0')")


def test_report_refuses_a_negative_token_count(tmp_path, monkeypatch, capsys):
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", REF.parent.parent / "workloads" / "code.trace.jsonl",
                            "--max-samples", 4, "--max-length", 32, "--out", trace], monkeypatch, capsys)
    assert code == 0, err
    for flag in ("--locality-tokens", "--cache-tokens"):
        code, _, err = run_cli(["report", trace, flag, -1], monkeypatch, capsys)
        assert_one_error(code, err, flag, "integer >= 1")


def test_report_speaks_binary_units_like_every_other_command(tmp_path, monkeypatch, capsys):
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", REF.parent.parent / "workloads" / "code.trace.jsonl",
                            "--max-samples", 4, "--max-length", 32, "--out", trace], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", trace, "--model", REF], monkeypatch, capsys)
    assert code == 0, err
    assert "MiB" in out and " MB" not in out and " GB" not in out


def test_trace_refuses_documents_longer_than_the_model_positions(tmp_path, monkeypatch, capsys):
    long_doc = tmp_path / "long.jsonl"
    long_doc.write_text(json.dumps({"input_ids": [1 + i % 50 for i in range(1500)]}) + "\n")
    code, _, err = run_cli(["trace", REF, "--data", long_doc, "--max-length", 100000, "--out", tmp_path / "t.trace"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "max_position_embeddings", "--max-length 1024")


def test_a_plan_file_missing_a_moe_layer_is_refused(tmp_path, monkeypatch, capsys):
    spec = moesift.checkpoint_index(REF).spec
    half = half_plan(spec)
    half.pop(spec.moe_layers[-1])
    plan = plan_file(tmp_path / "p.json", half)
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", tmp_path / "T"], monkeypatch, capsys)
    assert_one_error(code, err, f"MoE layer [{spec.moe_layers[-1]}]")
    assert not (tmp_path / "T").exists()


def test_bad_numbers_are_one_line_each(tmp_path, monkeypatch, capsys):
    """Values the commands once took silently, or died on with a traceback."""
    data = REF.parent.parent / "workloads" / "code.trace.jsonl"
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", data, "--max-samples", 4, "--max-length", 32, "--log-routing",
                            "--out", trace], monkeypatch, capsys)
    assert code == 0, err
    spec = moesift.checkpoint_index(REF).spec
    plan = plan_file(tmp_path / "p.json", half_plan(spec))
    cases = [
        (["cache", trace, "--memory", "nan", "--model", REF], "--memory"),
        (["generate", REF, "--plan", plan, "--prompt", "x", "--max-new-tokens", -5], "--max-new-tokens"),
        (["verify", REF, "--plan", plan, "--data", data, "--max-new-tokens", -1], "--max-new-tokens"),
        (["place", trace, "--gpus", 2, "--time-limit", "nan"], "--time-limit"),
        (["place", trace, "--gpus", 2, "--hidden", -1], "--hidden"),
        (["trim", REF, "--plan", plan, "--out", tmp_path / "T", "--max-shard-size", 0], "--max-shard-size"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert_one_error(code, err, needle)
    assert not (tmp_path / "T").exists()


def test_verify_names_the_model_a_plan_does_not_fit(tmp_path, monkeypatch, capsys, tiny_dir):
    """A trim of one model verified against another names that model (not 'None')."""
    other = tiny_dir("qwen3_moe")
    spec = moesift.checkpoint_index(REF).spec
    plan = plan_file(tmp_path / "p.json", half_plan(spec))
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", REF.parent.parent / "workloads" / "code.trace.jsonl",
                            "--max-samples", 4, "--max-length", 32, "--out", trace], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["plan", trace, "--keep", 0.5, "--out", plan, "--force"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["trim", REF, "--plan", plan, "--out", tmp_path / "T"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["verify", other, tmp_path / "T"], monkeypatch, capsys)
    assert_one_error(code, err)
    assert "None" not in err and str(other) in err


def test_cache_refuses_a_plan_of_another_model(tmp_path, monkeypatch, capsys):
    trace = tmp_path / "t.trace"
    code, _, err = run_cli(["trace", REF, "--data", REF.parent.parent / "workloads" / "code.trace.jsonl",
                            "--max-samples", 4, "--max-length", 32, "--log-routing", "--out", trace],
                           monkeypatch, capsys)
    assert code == 0, err
    plan = tmp_path / "other.json"
    plan.write_text(json.dumps({"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": 8},
                                "layers": [{"layer": la, "resident": [0, 1, 2, 3]} for la in range(4)]}))
    code, _, err = run_cli(["cache", trace, "--resident", plan, "--capacity", 4], monkeypatch, capsys)
    assert_one_error(code, err, "another model", "n_experts")


def test_tokenizer_files_missing_or_damaged_say_which(tmp_path, monkeypatch, capsys):
    data = REF.parent.parent / "workloads" / "code.trace.jsonl"
    gone = tmp_path / "gone"
    shutil.copytree(REF, gone)
    for f in gone.glob("tokenizer*"):
        f.unlink()
    code, _, err = run_cli(["trace", gone, "--data", data, "--max-samples", 2], monkeypatch, capsys)
    assert_one_error(code, err, "no tokenizer files")
    cut = tmp_path / "cut"
    shutil.copytree(REF, cut)
    (cut / "tokenizer.json").write_text((REF / "tokenizer.json").read_text()[:300])
    code, _, err = run_cli(["trace", cut, "--data", data, "--max-samples", 2], monkeypatch, capsys)
    assert_one_error(code, err, "cannot read the tokenizer", "tokenizer.json")
