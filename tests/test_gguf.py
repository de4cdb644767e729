"""GGUF models (llama.cpp): trim, plan identity, report bytes and verify on tiny files of several families
written with gguf-py under llama.cpp's tensor names, in F32 and quantized types. Every slice is checked
against gguf-py's own reader (GGUFReader), an independent parser of the same files."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf_models import write_model  # noqa: E402
from hostile import assert_one_error, run_cli  # noqa: E402
from test_plan import make_trace  # noqa: E402

import moesift  # noqa: E402
from moesift.evaluation.verify import verify, verify_files  # noqa: E402
from moesift.formats.gguf import GGML_TYPES, read_gguf  # noqa: E402
from moesift.selection.planner import plan as make_plan  # noqa: E402
from moesift.surfaces.report import savings  # noqa: E402

EXPERT = re.compile(r"^blk\.(\d+)\.(ffn_(gate|up|down)_exps|ffn_gate_inp|exp_probs_b)\.(weight|bias)$")
COUNTS = {"expert_count", "expert_group_count", "expert_group_used_count"}


def _plan(path, uniform=True, seed=0):
    """{block: resident ids}: half the experts of every MoE block (group-limited: whole groups)."""
    idx = read_gguf(path)
    sp = idx.spec
    rng = np.random.default_rng(seed)
    out = {}
    for j, b in enumerate(sp.moe_layers):
        if sp.n_group:
            per = sp.n_experts // sp.n_group
            groups = sorted(rng.choice(sp.n_group, sp.n_group // 2, replace=False).tolist())
            out[b] = [g * per + i for g in groups for i in range(per)]
        else:
            n = sp.n_experts // 2 + (0 if uniform or j % 2 == 0 else 1)
            out[b] = sorted(rng.choice(sp.n_experts, n, replace=False).tolist())
    return out


def _fields(r: GGUFReader) -> dict:
    return {k: (f.types, [np.asarray(p).tobytes() for p in f.parts[f.data[0]:]] if f.data else [])
            for k, f in r.fields.items() if not k.startswith("GGUF.")}


def check_trim(src, out, keep, floats=None):
    """The trim against GGUFReader's view of both files: every expert tensor is the base's rows of the resident
    experts (numpy order: the expert axis first), every other tensor and metadata entry identical but the counts;
    with `floats`, quantizing the resident experts' float weights gives the trimmed bytes."""
    a, b = GGUFReader(src), GGUFReader(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    align = b.alignment
    sliced = 0
    for name, t in ta.items():
        u = tb[name]
        assert u.tensor_type == t.tensor_type and u.data_offset % align == 0
        m = EXPERT.match(name)
        if m and int(m.group(1)) in keep:
            ids = keep[int(m.group(1))]
            assert list(u.shape) == [*t.shape[:-1], len(ids)]
            assert np.array_equal(np.asarray(u.data), np.asarray(t.data)[ids]), name
            if floats is not None and name in floats:
                q = gguf.quants.quantize(floats[name][ids], t.tensor_type)
                assert np.array_equal(np.asarray(u.data), q), f"{name}: quantize(slice) != slice(quantize)"
            sliced += 1
        else:
            assert np.array_equal(np.asarray(u.data), np.asarray(t.data)) and list(u.shape) == list(t.shape), name
    fa, fb = _fields(a), _fields(b)
    assert list(fa) == list(fb)
    changed = {k for k in fa if fa[k] != fb[k]}
    assert {k.split(".", 1)[1] for k in changed} <= COUNTS, changed
    arch = a.fields["general.architecture"].contents()
    n = len(next(iter(keep.values())))
    assert b.fields[f"{arch}.expert_count"].contents() == n
    return sliced


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q5_0"])
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe", "llama", "deepseek2", "gpt-oss"])
def test_trim_slices_every_expert_tensor(arch, qtype, tmp_path):
    floats: dict = {}
    src = write_model(tmp_path / "m.gguf", arch, qtype, keep_floats=floats)
    keep = _plan(src)
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    n = check_trim(src, out, keep, floats)
    per_block = 4 + (4 if arch == "gpt-oss" else 0) + (1 if arch == "deepseek2" else 0)
    assert n == per_block * len(keep)
    assert verify(src, out, progress=False)["ok"]


def test_k_quant_blocks_of_256(tmp_path):
    """Q4_K (gguf-py dequantizes it but cannot quantize it; random blocks): an expert is still a byte range."""
    src = write_model(tmp_path / "m.gguf", "qwen3moe", "Q4_K", hidden=256, ff=256, n_layers=2)
    keep = _plan(src)
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    check_trim(src, out, keep)
    r = verify(src, out, progress=False)
    blocks = next(x for x in r["links"] if x["link"] == "blocks")
    assert r["ok"] and "Q4_K: dequantize commute" in blocks["detail"], blocks


def test_group_limited_router_counts(tmp_path):
    src = write_model(tmp_path / "ds.gguf", "deepseek2", "Q8_0")  # 8 experts in 4 groups, 2 selectable
    whole = _plan(src)  # two whole groups: group limiting over the 2 kept groups is a no-op -> one group
    out = moesift.trim(src, whole, tmp_path / "w.gguf", progress=False)
    r = GGUFReader(out)
    assert [r.fields[f"deepseek2.{k}"].contents() for k in ("expert_count", "expert_group_count",
                                                             "expert_group_used_count")] == [4, 1, 1]
    equal = {b: [0, 2, 4, 6] for b in whole}  # the same count (1) in every group: a group needs 0 or >= 2
    code_err = pytest.raises(moesift.MoesiftError, moesift.trim, src, equal, tmp_path / "e.gguf", progress=False)
    assert "group" in str(code_err.value)
    equal = {b: list(range(8)) for b in whole}
    out = moesift.trim(src, equal, tmp_path / "f.gguf", progress=False)
    assert GGUFReader(out).fields["deepseek2.expert_group_count"].contents() == 4
    assert not (tmp_path / "e.gguf").exists()


def test_split_model_in_and_out(tmp_path, monkeypatch, capsys):
    first = write_model(tmp_path / "s.gguf", "qwen3moe", "Q8_0", split_max_tensors=10)
    assert first.name == "s-00001-of-00003.gguf"
    keep = _plan(first)
    out = moesift.trim(first, keep, tmp_path / "t.gguf", progress=False)
    assert out.name == "t-00001-of-00003.gguf"
    for i in (1, 2, 3):
        a = GGUFReader(tmp_path / f"s-0000{i}-of-00003.gguf")
        b = GGUFReader(tmp_path / f"t-0000{i}-of-00003.gguf")
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        assert b.fields["split.no"].contents() == i - 1
    code, stdout, err = run_cli(["verify", first, out], monkeypatch, capsys)
    assert code == 0 and "OK:" in stdout, stdout + err
    assert verify_files(tmp_path / "t-00002-of-00003.gguf")["ok"]
    with open(tmp_path / "t-00003-of-00003.gguf", "r+b") as f:  # damage the last split
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    r = verify_files(out)
    assert not r["ok"] and [x["file"] for x in r["files"] if x["status"] != "ok"] == ["t-00003-of-00003.gguf"]
    code, stdout, err = run_cli(["verify", first, out], monkeypatch, capsys)
    assert code == 1 and "FAILED   trim" in stdout and "output.weight" in stdout, stdout


def test_splits_written_at_once_give_the_same_files(tmp_path, monkeypatch):
    """The splits of a split model are written by several threads at once: one thread and three give the same
    files and the same recorded checksums."""
    import moesift.apply.trim_gguf as trim_gguf
    from moesift.formats.gguf import record_path

    first = write_model(tmp_path / "s.gguf", "qwen3moe", "Q8_0", split_max_tensors=10)
    keep = _plan(first)
    outs = []
    for n in (1, 3):
        monkeypatch.setattr(trim_gguf, "files_at_once", lambda files, n=n: min(n, files))
        (tmp_path / f"t{n}").mkdir()
        outs.append(moesift.trim(first, keep, tmp_path / f"t{n}" / "t.gguf", progress=False))
    for i in (1, 2, 3):
        name = f"t-0000{i}-of-00003.gguf"
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t3" / name).read_bytes(), name
    r1, r3 = (json.loads(record_path(o).read_text()) for o in outs)
    assert r1["files"] == r3["files"] and len(r1["files"]) == 3


def test_plan_from_a_transformers_trace_travels(tmp_path, monkeypatch, capsys):
    src = write_model(tmp_path / "m.gguf", "qwen3moe", "Q8_0")
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "num_experts": 8,
           "num_experts_per_tok": 2}
    rng = np.random.default_rng(0)
    t = make_trace(rng.integers(1, 50, size=(3, 8)), model_type="qwen3_moe", config=cfg, hidden_size=64,
                   num_hidden_layers=3)
    p = make_plan(t, keep=0.5, uniform=True, out=tmp_path / "plan.json")
    out = moesift.trim(src, tmp_path / "plan.json", tmp_path / "t.gguf", progress=False)
    check_trim(src, out, p.resident)
    # the same plan against a file of another shape: one line naming every field that differs
    other = write_model(tmp_path / "o.gguf", "qwen3moe", "F32", hidden=96, top_k=3)
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(["trim", other, "--plan", tmp_path / "plan.json", "--out", tmp_path / "x.gguf"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "another model", "top_k: 2 vs 3", "hidden_size: 64 vs 96")
    ds = write_model(tmp_path / "d.gguf", "olmoe", "F32")
    code, _, err = run_cli(["trim", ds, "--plan", tmp_path / "plan.json", "--out", tmp_path / "x.gguf"],
                           monkeypatch, capsys)
    assert_one_error(code, err, "model_type: qwen3_moe vs olmoe")
    assert sorted(os.listdir(tmp_path)) == [*before, "d.gguf"] or sorted(os.listdir(tmp_path)) == sorted(
        [*before, "d.gguf"])


def test_report_bytes_from_the_gguf_header(tmp_path):
    src = write_model(tmp_path / "m.gguf", "olmoe", "Q4_0")
    t = make_trace(np.random.default_rng(1).integers(1, 50, size=(3, 8)), model_type="olmoe")
    s = savings(t, src)
    idx = read_gguf(src)
    assert s["total_bytes"] == sum(int(x.n_bytes) for x in GGUFReader(src).tensors) == idx.total_bytes()
    half = next(r for r in s["budgets"] if r["experts_per_layer"] == 4)
    keep = {b: list(range(4)) for b in idx.spec.moe_layers}
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    assert half["predicted_bytes"] == sum(int(x.n_bytes) for x in GGUFReader(out).tensors)


def _truncate(path, n):
    with open(path, "r+b") as f:
        f.truncate(n)


def test_damaged_files_and_refused_plans_are_one_line(tmp_path, monkeypatch, capsys):
    src = write_model(tmp_path / "m.gguf", "qwen3moe", "Q8_0")
    keep = _plan(src)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": 8},
                                "layers": [{"layer": b, "resident": v} for b, v in keep.items()]}))
    cases = {}
    (tmp_path / "head.gguf").write_bytes(src.read_bytes()[:200])  # cut inside the metadata
    cases["head.gguf"] = ("damaged",)
    r = GGUFReader(src)
    last = max(r.tensors, key=lambda t: t.data_offset)
    (tmp_path / "tail.gguf").write_bytes(src.read_bytes()[: int(last.data_offset) + 10])  # data cut short
    cases["tail.gguf"] = ("damaged", f"tensor {last.name!r} runs past the end")
    (tmp_path / "nogguf.gguf").write_bytes(b"GGML" + src.read_bytes()[4:1000])
    cases["nogguf.gguf"] = ("not a GGUF file",)
    for name, needles in cases.items():
        before = sorted(os.listdir(tmp_path))
        code, _, err = run_cli(["trim", tmp_path / name, "--plan", plan, "--out", tmp_path / "o.gguf"],
                               monkeypatch, capsys)
        assert_one_error(code, err, *needles)
        assert sorted(os.listdir(tmp_path)) == before
    uneven = tmp_path / "u.json"
    uneven.write_text(json.dumps({"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe"},
                                  "layers": [{"layer": b, "resident": v} for b, v in _plan(src, False).items()]}))
    code, _, err = run_cli(["trim", src, "--plan", uneven, "--out", tmp_path / "o.gguf"], monkeypatch, capsys)
    assert_one_error(code, err, "different number of experts per layer", "one expert count", "--uniform")
    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", src, "--force"], monkeypatch, capsys)
    assert_one_error(code, err, "reads")
    code, _, err = run_cli(["trim", src, "--plan", plan, "--out", tmp_path / "o"], monkeypatch, capsys)
    assert_one_error(code, err, "NAME.gguf")
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".*"))


def test_verify_catches_a_wrong_trim(tmp_path, monkeypatch, capsys):
    src = write_model(tmp_path / "m.gguf", "olmoe", "Q8_0")
    keep = _plan(src)
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False, checksum="sha256")
    other = {b: [e for e in range(8) if e not in v] for b, v in keep.items()}
    r = verify(src, out, plan=other, progress=False)
    assert not r["ok"] and "exps" in " ".join(r["links"][0]["problems"])
    t = next(x for x in GGUFReader(out).tensors if x.name == "blk.1.ffn_up_exps.weight")
    with open(out, "r+b") as f:  # one byte of one resident expert
        f.seek(int(t.data_offset) + 5)
        b = f.read(1)
        f.seek(int(t.data_offset) + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    code, stdout, _ = run_cli(["verify", src, out], monkeypatch, capsys)
    assert code == 1 and "blk.1.ffn_up_exps.weight" in stdout and "MISMATCH" in stdout
    code, stdout, _ = run_cli(["verify", out, "--files"], monkeypatch, capsys)
    assert code == 1 and "sha256" in stdout


def test_metadata_value_types_are_kept(tmp_path):
    """expert_count stored as another integer type stays that type (only the value changes)."""
    src = write_model(tmp_path / "m.gguf", "qwen3moe", "F32")
    data = bytearray(src.read_bytes())
    key = b"qwen3moe.expert_count"
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, i)[0] == 4  # uint32
    keep = _plan(src)
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    f = GGUFReader(out).fields["qwen3moe.expert_count"]
    assert f.types == [gguf.GGUFValueType.UINT32] and f.contents() == 4


def test_alignment_is_honoured(tmp_path):
    src = write_model(tmp_path / "m.gguf", "olmoe", "Q8_0", alignment=256)
    keep = _plan(src)
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    r = GGUFReader(out)
    assert r.alignment == 256 and all(int(t.data_offset) % 256 == 0 for t in r.tensors)
    check_trim(src, out, keep)


def test_multi_token_prediction_blocks_are_left_out(tmp_path):
    """GLM-4.5 stores its multi-token-prediction block after the decoder blocks, with experts of a router no
    trace sees: a trim that removes experts leaves it out and says the model has none (as for safetensors)."""
    src = write_model(tmp_path / "g.gguf", "glm4moe", "Q8_0", n_layers=4)
    idx = read_gguf(src)
    assert idx.spec.moe_layers == (0, 1, 2) and idx.nextn_blocks() == [3]
    keep = {b: list(range(4)) for b in idx.spec.moe_layers}
    out = moesift.trim(src, keep, tmp_path / "t.gguf", progress=False)
    r = GGUFReader(out)
    assert [r.fields[f"glm4moe.{k}"].contents() for k in ("block_count", "nextn_predict_layers",
                                                           "expert_count")] == [3, 0, 4]
    assert not [t.name for t in r.tensors if t.name.startswith("blk.3.")]
    assert verify(src, out, progress=False)["ok"]
    assert json.loads((tmp_path / "t.gguf.moesift.json").read_text())["dropped_mtp_layers"] == [3]


def test_ggml_type_table_is_gguf_pys():
    for t, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[t.value] == (t.name, block, size)


needs_converter = pytest.mark.skipif(not os.environ.get("MOESIFT_LLAMA_CPP"),
                                     reason="needs llama.cpp's converter (MOESIFT_LLAMA_CPP; bench/engines.py)")


@needs_converter
@pytest.mark.parametrize("model_type,outtype", [("qwen3_moe", "f32"), ("deepseek_v3", "q8_0"),
                                                ("mixtral", "bf16")])
def test_trim_of_the_conversion_is_the_conversion_of_the_trim(model_type, outtype, tmp_path):
    from engine_models import engine_model
    from test_trim import plan_for

    from moesift.engines import llamacpp
    from moesift.formats.checkpoint import CheckpointIndex

    src = engine_model("llama.cpp", model_type, tmp_path / "src", tokenizer=True)
    g = tmp_path / "m.gguf"
    llamacpp.convert(src, g, outtype)
    plan = plan_for(CheckpointIndex.build(src).spec, uniform=True)
    out = moesift.trim(g, plan, tmp_path / "t.gguf", progress=False)
    r = verify(g, out, hf_model=src, progress=False)
    assert r["ok"] and all(x["ok"] for x in r["links"]), r["links"]


def test_damaged_headers_never_escape_as_tracebacks(tmp_path):
    """Random bytes changed in the header: the trim either works or stops with one MoesiftError."""
    src = write_model(tmp_path / "m.gguf", "deepseek2", "Q8_0")
    data = src.read_bytes()
    end = read_gguf(src).files[0].data_start
    keep = {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, end))] = int(rng.integers(0, 256))
        (tmp_path / "f.gguf").write_bytes(bytes(d))
        try:
            moesift.trim(tmp_path / "f.gguf", keep, tmp_path / "o.gguf", progress=False, force=True)
            outcomes["ok"] += 1
        except moesift.MoesiftError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["ok"] + outcomes["refused"] == 150
