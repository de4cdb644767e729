"""Property tests: damaged trace files (safetensors with JSON metadata), plans (JSON) and WCER
expert-trace/1 JSON, fed to every command that reads them through the real CLI entry point in this
process. Each case must either succeed with a valid output or exit 2 with one `moesift: error:` line;
never a traceback, never exit 0 with a broken output. Cases per kind: MOESIFT_FUZZ_EXAMPLES (2000)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from validcases import assert_clean_error, cli, plan_dict, trace_parts, wcer_dict, write_trace

EXAMPLES = int(os.environ.get("MOESIFT_FUZZ_EXAMPLES", "2000"))
STATS: dict[str, dict[str, int]] = {}  # file kind -> {"ok": n, "error": n}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MOESIFT_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))

# Values a damaged or hand-edited file may hold where a number, string, list or object was.
ODD_VALUES: list[Any] = [float("nan"), float("inf"), -1, -7.5, 0, 1e30, -1e30, 2**63, 2**70, 1.5, True, None, "",
                         "x", "8", [], [1, 2], [[-1]], {}, {"a": 1}, 999, 3]


# ---- mutations ---------------------------------------------------------------------------------------


def _paths(obj: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    out = [prefix]
    if depth > 5:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):  # a few items of long lists are enough
            out += _paths(v, prefix + (i,), depth + 1)
    return out


def _mutate_json(obj: Any, draw: Any) -> Any:
    """One structural change: replace a value with an odd one, drop a key or item, or cut a list."""
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
    path = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = draw(st.sampled_from(["replace", "replace", "replace", "drop", "cut", "scale"]))
    if op == "drop":
        del parent[key]
    elif op == "cut" and isinstance(parent[key], list):
        parent[key] = parent[key][: draw(st.integers(0, max(len(parent[key]) - 1, 0)))]
    elif op == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * draw(st.sampled_from([-1, 2, 10**20, 0.5]))
    else:
        parent[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))  # never share one list between places
    return obj


def _mutate_bytes(data: bytes, draw: Any) -> bytes:
    op = draw(st.sampled_from(["truncate", "flip", "flip", "splice"]))
    n = len(data)
    if op == "truncate":
        return data[: draw(st.integers(0, n - 1))]
    if op == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            # bias to the start: the header and metadata are where damage changes meaning
            i = draw(st.one_of(st.integers(0, min(n - 1, 2000)), st.integers(0, n - 1)))
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    i = draw(st.integers(0, n))
    return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]


def _mutate_array(arrays: dict[str, np.ndarray], draw: Any) -> dict[str, np.ndarray]:
    arrays = dict(arrays)
    name = draw(st.sampled_from(sorted(arrays) + ["selected_prob_mass", "something_new"]))
    if name not in arrays:
        arrays[name] = np.ones(draw(st.sampled_from([(3, 8), (3, 3), (2,)])), np.float64)
        return arrays
    a = arrays[name].copy()
    op = draw(st.sampled_from(["value", "value", "value", "dtype", "shape", "drop"]))
    if op == "drop":
        del arrays[name]
        return arrays
    if op == "dtype":
        arrays[name] = a.astype(draw(st.sampled_from([np.float32, np.float64, np.int8, np.uint8, np.int32, np.bool_])))
        return arrays
    if op == "shape":
        if a.ndim and a.shape[0] > 1:
            arrays[name] = a[: draw(st.integers(0, a.shape[0] - 1))]
        else:
            arrays[name] = a.reshape(-1)[:0]
        return arrays
    if a.size:
        v = draw(st.sampled_from([float("nan"), float("inf"), -1, -(2**40), 2**62, 2**53 + 1, 999, 32767, 1e300]))
        flat = a.reshape(-1)
        i = draw(st.integers(0, flat.size - 1))
        if a.dtype.kind in "iu" and (isinstance(v, float) and not math.isfinite(v) or not
                                     np.iinfo(a.dtype).min <= v <= np.iinfo(a.dtype).max):
            flat = flat.astype(np.float64)
            a = flat.reshape(a.shape)
        flat[i] = v
        arrays[name] = flat.reshape(a.shape)
    return arrays


# ---- checking one command ----------------------------------------------------------------------------


def _check(kind: str, args: list[Any], outputs: list[Path], validate) -> None:
    for o in outputs:
        if o.is_dir():
            shutil.rmtree(o)
        elif o.exists():
            o.unlink()
    code, out, err = cli(args)
    what = " ".join(str(a) for a in args)
    tally = STATS.setdefault(kind, {"ok": 0, "error": 0})
    tally["ok" if code == 0 else "error"] += 1
    if code == 0:
        assert "Traceback" not in err, what
        validate(out)
    else:
        assert_clean_error(code, out, err, what)
        for o in outputs:
            assert not o.exists(), f"{what}: exit {code} but {o} was written"


def _json_out(out: str) -> None:
    json.loads(out)


def _trace_out(path: Path):
    def v(out: str) -> None:
        from moesift.formats.trace import Trace

        Trace.load(path)  # validates: a written trace must read back
    return v


def _plan_out(path: Path | None, top_k: int, n_experts: int):
    def v(out: str) -> None:
        from moesift.formats.plan import Plan

        p = Plan.load(path) if path is not None else Plan.from_dict(json.loads(out))
        for e in p.layers:
            assert top_k <= len(e["resident"]) <= n_experts and e["resident"][-1] < n_experts
            c = e.get("coverage")
            assert c is None or 0 <= c <= 1 + 1e-9
    return v


# ---- the fixed material ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="moesift-fuzz-"))
    meta, arrays = trace_parts()
    ok = write_trace(d / "ok.trace", meta, arrays)
    (d / "ok_plan.json").write_text(json.dumps(plan_dict()))
    from moesift.assets import ROOT
    from moesift.core.identity import model_config_hash
    from moesift.formats.checkpoint import CheckpointIndex

    ref = ROOT / "models" / "qwen3moe-ref"
    spec = CheckpointIndex.build(ref).spec
    ref_plan = {"schema": "moesift-plan/1",
                "model": {"name": str(ref), "model_type": spec.model_type, "config_hash": model_config_hash(ref),
                          "config": json.loads((ref / "config.json").read_text()), "n_experts": spec.n_experts,
                          "top_k": spec.top_k, "moe_layers": list(spec.moe_layers)},
                "layers": [{"layer": layer, "moe_index": i, "resident": list(range(i % 2, spec.n_experts, 2))}
                           for i, layer in enumerate(spec.moe_layers)],
                "provenance": {"strategy": "frequency"}, "predictions": {"coverage": 0.5}}
    (d / "ref_plan.json").write_text(json.dumps(ref_plan))
    yield {"dir": d, "meta": meta, "arrays": arrays, "ok": ok, "ref": ref, "ref_plan": ref_plan, "spec": spec}
    shutil.rmtree(d, ignore_errors=True)


def _valid_inputs_pass(work):
    """The unmutated files pass every command (else the fuzz tests below would prove nothing)."""
    d = work["dir"]
    for args in (["show", work["ok"], "--json"], ["plan", work["ok"], "--keep", "0.5", "--json"],
                 ["plan", "diff", d / "ref_plan.json", d / "ref_plan.json", "--model", work["ref"], "--json"],
                 ["cache", work["ok"], "--capacity", "4", "--resident", d / "ok_plan.json", "--json"]):
        code, out, err = cli(args)
        assert code == 0, (args, err)


def test_valid_inputs_pass(work):
    _valid_inputs_pass(work)


# ---- traces ------------------------------------------------------------------------------------------

TRACE_COMMANDS = ["show", "show-json", "plan-out", "plan-weighted", "report", "cache", "place", "merge", "export",
                  "export-moesift"]


@FUZZ
@given(data=st.data())
def test_fuzz_trace_files(work, data):
    draw = data.draw
    d = work["dir"]
    meta, arrays = json.loads(json.dumps(work["meta"])), work["arrays"]
    kind = draw(st.sampled_from(["meta", "meta", "array", "array", "bytes"]))
    p = d / "t.trace"
    if kind == "meta":
        for _ in range(draw(st.integers(1, 2))):
            meta = _mutate_json(meta, draw)
        write_trace(p, meta, arrays, raw_meta=json.dumps(meta))
    elif kind == "array":
        write_trace(p, meta, _mutate_array(arrays, draw))
    else:
        p.write_bytes(_mutate_bytes(work["ok"].read_bytes(), draw))
    cmd = draw(st.sampled_from(TRACE_COMMANDS))
    o_trace, o_json = d / "o.trace", d / "o.json"
    if cmd == "show":
        _check("trace", ["show", p], [], lambda out: None)
    elif cmd == "show-json":
        _check("trace", ["show", p, "--json"], [], _json_out)
    elif cmd == "plan-out":
        _check("trace", ["plan", p, "--keep", "0.5", "--out", o_json], [o_json], _plan_out(o_json, 2, 8))
    elif cmd == "plan-weighted":
        _check("trace", ["plan", p, "--coverage", "0.8", "--strategy", "weighted", "--json"], [], _plan_out(None, 2, 8))
    elif cmd == "report":
        _check("trace", ["report", p, "--json"], [], _json_out)
    elif cmd == "cache":
        _check("trace", ["cache", p, "--capacity", "4", "--json"], [], _json_out)
    elif cmd == "place":
        _check("trace", ["place", p, "--gpus", "2", "--json"], [], _json_out)
    elif cmd == "merge":
        _check("trace", ["merge", p, work["ok"], "--out", o_trace], [o_trace], _trace_out(o_trace))
    elif cmd == "export":
        _check("trace", ["export", p, "--out", o_json], [o_json], _trace_out(o_json))
    else:
        _check("trace", ["export", p, "--out", o_trace, "--format", "moesift-trace/1"], [o_trace], _trace_out(o_trace))


# ---- WCER expert-trace/1 JSON ------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_wcer_json(work, data):
    draw = data.draw
    d = work["dir"]
    base = wcer_dict() if "wcer" not in work else json.loads(work["wcer"])
    work.setdefault("wcer", json.dumps(base))
    p = d / "w.json"
    if draw(st.integers(0, 4)) == 0:
        p.write_bytes(_mutate_bytes(work["wcer"].encode(), draw))
    else:
        for _ in range(draw(st.integers(1, 2))):
            base = _mutate_json(base, draw)
        p.write_text(json.dumps(base))  # NaN / Infinity written as JSON's non-standard literals
    cmd = draw(st.sampled_from(["show", "plan", "report", "export", "merge"]))
    o_trace, o_json = d / "wo.trace", d / "wo.json"
    if cmd == "show":
        _check("wcer", ["show", p, "--json"], [], _json_out)
    elif cmd == "plan":
        _check("wcer", ["plan", p, "--keep", "0.5", "--out", o_json], [o_json], _plan_out(o_json, 2, 8))
    elif cmd == "report":
        _check("wcer", ["report", p, "--json"], [], _json_out)
    elif cmd == "export":
        _check("wcer", ["export", p, "--out", o_trace, "--format", "moesift-trace/1"], [o_trace], _trace_out(o_trace))
    else:
        _check("wcer", ["merge", p, p, "--out", o_trace], [o_trace], _trace_out(o_trace))


# ---- plans -------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_plan_json(work, data):
    draw = data.draw
    d = work["dir"]
    ref_side = draw(st.booleans())
    base = json.loads(json.dumps(work["ref_plan"] if ref_side else plan_dict()))
    p = d / "p.json"
    if draw(st.integers(0, 4)) == 0:
        p.write_bytes(_mutate_bytes(json.dumps(base).encode(), draw))
    else:
        for _ in range(draw(st.integers(1, 2))):
            base = _mutate_json(base, draw)
        p.write_text(json.dumps(base))
    if ref_side:
        spec = work["spec"]
        out = d / "trimmed"
        cmd = draw(st.sampled_from(["diff", "trim"]))
        if cmd == "diff":
            _check("plan", ["plan", "diff", p, d / "ref_plan.json", "--model", work["ref"], "--json"], [], _json_out)
        else:
            def trimmed_ok(_: str) -> None:
                from safetensors import safe_open

                from moesift.formats.trimmed import read_trimmed_record

                rec = read_trimmed_record(out)
                assert rec is not None and set(rec["id_map"]) == {str(x) for x in spec.moe_layers}
                for ids in rec["id_map"].values():
                    assert len(set(ids)) == len(ids) >= spec.top_k and all(0 <= i < spec.n_experts for i in ids)
                for f in rec["files"]:
                    assert (out / f).is_file()
                    if f.endswith(".safetensors"):
                        with safe_open(str(out / f), framework="numpy") as fh:
                            assert list(fh.keys())
            _check("plan", ["trim", work["ref"], "--plan", p, "--out", out, "--no-checksums", "--json"], [out], trimmed_ok)
    else:
        cmd = draw(st.sampled_from(["cache", "diff"]))
        if cmd == "cache":
            _check("plan", ["cache", work["ok"], "--capacity", "4", "--resident", p, "--json"], [], _json_out)
        else:
            _check("plan", ["plan", "diff", p, d / "ok_plan.json", "--json"], [], _json_out)


def test_safetensors_header_length_is_what_the_mutations_break(work):
    """The byte mutations above reach the header: its 8-byte length leads the file."""
    raw = work["ok"].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert 8 + n < len(raw) and raw[8:9] == b"{"


def test_fuzz_reached_both_outcomes():
    """Each kind's cases both succeeded and failed cleanly (mutations that never break, or never leave a
    usable file, would test nothing). Prints the tally (pytest -s)."""
    if not STATS:
        pytest.skip("the fuzz tests did not run in this session")
    print("\nfuzz cases per kind:", json.dumps(STATS))
    for kind, tally in STATS.items():
        assert tally["ok"] > 0 and tally["error"] > 0, (kind, tally)
