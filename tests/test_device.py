"""One device rule: --device defaults to auto everywhere (CUDA if available, else MPS, else CPU), the chosen
device is what the command runs on and records, and --device cpu is always available."""

from __future__ import annotations

import re

import pytest
import torch

import moesift
import moesift.record.tracer as tracer
from moesift.cli import app
from moesift.engines.hf import resolve_device

COMMANDS = ("trace", "verify", "generate", "eval", "calibrate", "sweep", "plan")


def _no_mps(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)


def test_auto_picks_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device(None) == "cuda"


def test_auto_falls_back_to_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_mps(monkeypatch)
    assert resolve_device("auto") == "cpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)
        assert resolve_device("auto") == "mps"


def test_explicit_devices_are_kept_or_refused():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("spread") == "spread"
    with pytest.raises(moesift.MoesiftError, match="unknown device"):
        resolve_device("tpu:0")


def test_trace_picks_cuda_when_one_is_available(tiny_dir, tmp_path, monkeypatch):
    """With the default device, trace asks the loader for CUDA when torch sees a GPU."""
    seen = {}

    def fake_load(model, device=None, dtype=None, trust_remote_code=False):
        seen["device"] = device
        raise moesift.MoesiftError("stop before loading")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tracer, "load_model", fake_load)
    data = tmp_path / "ids.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n')
    with pytest.raises(moesift.MoesiftError, match="stop before loading"):
        moesift.trace(str(tiny_dir("qwen3_moe")), str(data), progress=False)
    assert seen["device"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback on machines without CUDA")
def test_trace_records_the_device_it_ran_on(tiny_dir, tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4, 5]}\n{"input_ids": [6, 7, 8]}\n')
    t = moesift.trace(str(tiny_dir("qwen3_moe")), str(data), folds=2, progress=False)
    assert t.tool["device"] == "cpu"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_device_flag_defaults_to_auto(command):
    import typer.main

    click_cmd = typer.main.get_command(app).commands[command]
    opts = {o.name: o for o in click_cmd.params}
    assert opts["device"].default == "auto", command
    assert re.search(r"\bcpu\b", opts["device"].help) and "auto" in opts["device"].help
