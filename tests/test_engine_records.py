"""Serving-engine records in the layouts the engines write today: vLLM 0.22+ (base64 `.npy` per choice,
every decoder layer, prompt and generated tokens together), vLLM 0.21 (JSON lists, MoE-only layer axis),
SGLang per-rank dumps; and the model shapes traces carry for placement.

Per-layer counts are checked against a plain Python recount of the same ids (collections.Counter)."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import run_cli

import moesift
from moesift.arch import adapter_for
from moesift.core.errors import MoesiftError
from moesift.formats.trace import Trace
from moesift.record.importers import import_trace
from moesift.selection.place import place

DSV3 = Path(moesift.__file__).parent / "assets" / "models" / "deepseekv3-ref"
# deepseekv3-ref: 4 decoder layers, layer 0 dense (first_k_dense_replace=1), 32 experts, top-4, hidden 128
DS_NH, DS_MOE, DS_E, DS_K, DS_H = 4, [1, 2, 3], 32, 4, 128


def npy_b64(a: np.ndarray) -> str:
    """What vLLM 0.22+ puts in choices[i].routed_experts: base64 of np.save bytes."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def routed(n_tokens: int, nh: int, moe: list[int], E: int, K: int, seed: int) -> np.ndarray:
    """[n_tokens, num_hidden_layers, top_k] ids as vLLM 0.22+ returns them: dense layers all-zero rows."""
    rng = np.random.default_rng(seed)
    a = np.zeros((n_tokens, nh, K), dtype=np.uint8 if E <= 256 else np.uint16)
    for t in range(n_tokens):
        for dl in moe:
            a[t, dl] = rng.choice(E, K, replace=False)
    return a


def completion(arrs: list[np.ndarray], n_prompt: int, n_gen: int | None, token_ids: list[list[int]] | None = None):
    """A /v1/completions response of vLLM 0.22+ (fields as the server serialises them)."""
    return {
        "id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": i, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                     "token_ids": token_ids[i] if token_ids else None, "prompt_logprobs": None,
                     "prompt_token_ids": None, "routed_experts": npy_b64(a)} for i, a in enumerate(arrs)],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + (n_gen or 0),
                  "completion_tokens": n_gen, "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


def chat(a: np.ndarray, n_prompt: int, n_gen: int):
    """A /v1/chat/completions response of vLLM 0.22+."""
    return {
        "id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "reasoning": None},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None,
                     "routed_experts": npy_b64(a)}],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_gen, "completion_tokens": n_gen,
                  "prompt_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    }


def recount(arrays: list[np.ndarray], moe: list[int], E: int) -> np.ndarray:
    """Selections per MoE layer and expert, counted with a Counter over plain Python ints."""
    out = np.zeros((len(moe), E), dtype=np.int64)
    for j, dl in enumerate(moe):
        c: Counter = Counter()
        for a in arrays:
            for tok in a.tolist():
                c.update(tok[dl])
        for e, n in c.items():
            out[j, e] = n
    return out


# ---- vLLM 0.22+ ----------------------------------------------------------------------------------------


def test_vllm_022_deepseek_dense_first(tmp_path):
    # request 1: completion, 6 prompt + 4 generated tokens -> 9 rows; request 2: chat, 5 + 3 -> 7 rows
    a1 = routed(9, DS_NH, DS_MOE, DS_E, DS_K, seed=1)
    a2 = routed(7, DS_NH, DS_MOE, DS_E, DS_K, seed=2)
    f = tmp_path / "responses.jsonl"
    f.write_text(json.dumps(completion([a1], 6, 4)) + "\n" + json.dumps(chat(a2, 5, 3)) + "\n")
    t = import_trace(f, "vllm", model=DSV3, out=tmp_path / "v.trace")
    back = Trace.load(tmp_path / "v.trace")
    assert back.model["moe_layers"] == DS_MOE and back.model["num_hidden_layers"] == DS_NH
    assert back.model["hidden_size"] == DS_H and back.n_experts == DS_E and back.top_k == DS_K
    np.testing.assert_array_equal(back.get("prefill_counts"), recount([a1[:6], a2[:5]], DS_MOE, DS_E))
    np.testing.assert_array_equal(back.get("decode_counts"), recount([a1[6:], a2[5:]], DS_MOE, DS_E))
    assert back.get("doc_offsets").tolist() == [0, 9, 16]
    assert back.get("log_phase").tolist() == [0] * 6 + [1] * 3 + [0] * 5 + [1] * 2
    np.testing.assert_array_equal(back.get("routing_log"), np.concatenate([a1, a2])[:, DS_MOE, :])
    assert t.workload["prefill_tokens"] == 11 and t.workload["decode_tokens"] == 5
    # without --model: top-4 rows tell the dense layer (all zero) apart; same counts
    t2 = import_trace(f, "vllm")
    assert t2.model["moe_layers"] == DS_MOE and t2.model["num_hidden_layers"] == DS_NH
    np.testing.assert_array_equal(t2.counts, t.counts)
    # a JSON list and a single object read the same way
    f2 = tmp_path / "list.json"
    f2.write_text(json.dumps([completion([a1], 6, 4), chat(a2, 5, 3)]))
    np.testing.assert_array_equal(import_trace(f2, "vllm", model=DSV3).get("routing_log"), t.get("routing_log"))
    # lines of the batch API's output wrap each response; an array saved with .tolist() reads as 0.22+ too
    listed = completion([a1], 6, 4)
    listed["choices"][0]["routed_experts"] = a1.tolist()
    f3 = tmp_path / "batch.jsonl"
    f3.write_text("\n".join(json.dumps({"id": f"b{i}", "custom_id": str(i), "error": None,
                                        "response": {"status_code": 200, "request_id": "r", "body": body}})
                            for i, body in enumerate([listed, chat(a2, 5, 3)])))
    t3 = import_trace(f3, "vllm", model=DSV3)
    np.testing.assert_array_equal(t3.get("routing_log"), t.get("routing_log"))
    np.testing.assert_array_equal(t3.get("log_phase"), t.get("log_phase"))


def test_vllm_022_all_moe_and_npy(tmp_path, tiny_dir):
    d = tiny_dir("olmoe")
    cfg = json.loads((d / "config.json").read_text())
    s = adapter_for(cfg).spec(cfg)
    nh, moe, E, K = cfg["num_hidden_layers"], list(s.moe_layers), s.n_experts, s.top_k
    assert moe == list(range(nh))
    a = routed(12, nh, moe, E, K, seed=3)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(completion([a], 8, 5)))
    t = import_trace(f, "vllm", model=d)
    np.testing.assert_array_equal(t.get("prefill_counts"), recount([a[:8]], moe, E))
    np.testing.assert_array_equal(t.get("decode_counts"), recount([a[8:]], moe, E))
    assert t.model["hidden_size"] == cfg["hidden_size"] and t.model["num_hidden_layers"] == nh
    # offline CompletionOutput.routed_experts saved with np.save: one document, no prompt length
    npy = tmp_path / "out0.npy"
    np.save(npy, a, allow_pickle=False)
    t2 = import_trace([npy], "vllm", model=d)
    np.testing.assert_array_equal(t2.counts, recount([a], moe, E))
    assert t2.get("doc_offsets").tolist() == [0, 12]


def test_vllm_022_choices_and_prompt_start(tmp_path):
    # n=2: each choice covers the prompt again; the second becomes a document of its generated tokens only
    P = 5
    c0 = routed(P + 3 - 1, DS_NH, DS_MOE, DS_E, DS_K, seed=4)
    c1 = routed(P + 4 - 1, DS_NH, DS_MOE, DS_E, DS_K, seed=5)
    c1[:P] = c0[:P]
    f = tmp_path / "n2.json"
    f.write_text(json.dumps(completion([c0, c1], P, 7, token_ids=[[1] * 3, [1] * 4])))
    t = import_trace(f, "vllm", model=DSV3)
    np.testing.assert_array_equal(t.get("prefill_counts"), recount([c0[:P]], DS_MOE, DS_E))
    np.testing.assert_array_equal(t.get("decode_counts"), recount([c0[P:], c1[P:]], DS_MOE, DS_E))
    assert t.get("doc_offsets").tolist() == [0, len(c0), len(c0) + len(c1) - P]
    # routed_experts_prompt_start=2 left out the first two prompt rows: 3 prompt rows remain
    c = routed(P + 4 - 1 - 2, DS_NH, DS_MOE, DS_E, DS_K, seed=6)
    f.write_text(json.dumps(completion([c], P, 4)))
    t = import_trace(f, "vllm", model=DSV3)
    np.testing.assert_array_equal(t.get("prefill_counts"), recount([c[:3]], DS_MOE, DS_E))
    np.testing.assert_array_equal(t.get("decode_counts"), recount([c[3:]], DS_MOE, DS_E))


def test_vllm_021_deepseek_still_imports(tmp_path):
    # 0.21: MoE-only layer axis sized without first_k_dense_replace -> MoE layers first, then a zero row
    rng = np.random.default_rng(7)

    def rows021(n):
        a = np.zeros((n, DS_NH, DS_K), dtype=np.int64)
        for t in range(n):
            for j in range(len(DS_MOE)):
                a[t, j] = rng.choice(DS_E, DS_K, replace=False)
        return a

    p, g = rows021(6), rows021(3)
    rec = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
           "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                        "routed_experts": g.tolist()}],
           "usage": {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10},
           "prompt_routed_experts": p.tolist()}
    f = tmp_path / "old.json"
    f.write_text(json.dumps(rec))
    t = import_trace(f, "vllm", model=DSV3)
    moe_pos = [0, 1, 2]  # the 0.21 axis: MoE layer positions
    assert t.model["moe_layers"] == DS_MOE
    np.testing.assert_array_equal(t.get("prefill_counts"), recount([p], moe_pos, DS_E))
    np.testing.assert_array_equal(t.get("decode_counts"), recount([g], moe_pos, DS_E))
    # without --model the trailing zero row is dropped too
    assert import_trace(f, "vllm").n_layers == 3
    # a non-zero trailing row is not a 0.21 record of this model
    p[0, 3] = [1, 2, 3, 4]
    rec["prompt_routed_experts"] = p.tolist()
    f.write_text(json.dumps(rec))
    with pytest.raises(MoesiftError, match="not all zero"):
        import_trace(f, "vllm", model=DSV3)


@pytest.mark.parametrize("case", ["dense_not_zero", "more_layers", "pickle_b64", "pickle_npy", "float_dtype",
                                  "int64_dtype", "top1_no_model"])
def test_vllm_bad_records(case, tmp_path, capsys, monkeypatch):
    a = routed(6, DS_NH, DS_MOE, DS_E, DS_K, seed=8)
    f = tmp_path / "bad.json"
    args = ["--model", DSV3]
    if case == "dense_not_zero":
        a[2, 0] = [1, 2, 3, 4]
        f.write_text(json.dumps(completion([a], 4, 3)))
        want = "decoder layer 0 is dense"
    elif case == "more_layers":
        a = routed(6, DS_NH + 1, DS_MOE, DS_E, DS_K, seed=8)
        f.write_text(json.dumps(completion([a], 4, 3)))
        want = "5 layers but the model has 4 decoder layers"
    elif case == "pickle_b64":
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        rec = completion([a], 4, 3)
        rec["choices"][0]["routed_experts"] = base64.b64encode(buf.getvalue()).decode()
        f.write_text(json.dumps(rec))
        want = "without pickle"
    elif case == "pickle_npy":
        f = tmp_path / "bad.npy"
        np.save(f, np.array([[[1]]], dtype=object), allow_pickle=True)
        want = "without pickle"
    elif case == "float_dtype":
        f.write_text(json.dumps(completion([a.astype(np.float32)], 4, 3)))
        want = "dtype float32"
    elif case == "int64_dtype":
        f = tmp_path / "bad.npy"
        np.save(f, a.astype(np.int64))
        want = "dtype int64"
    else:
        a = routed(6, 3, [0, 1, 2], 8, 1, seed=9)
        f.write_text(json.dumps(completion([a], 4, 3)))
        args = []
        want = "top-1"
    out = tmp_path / "o.trace"
    code, so, se = run_cli(["import", f, "--format", "vllm", "--out", out, *args], monkeypatch, capsys)
    assert code == 2, se
    assert se.startswith("moesift: error:") and len(se.strip().splitlines()) == 1 and want in se, se
    assert not out.exists()


# ---- SGLang per-rank dumps ------------------------------------------------------------------------------


def sglang_rank_dump(path, rank, passes, n_layers):
    """per_token dump of one rank: passes = [(forward_pass_id, ids [T, layers, K], input_ids)]."""
    records = []
    for fpid, ids, inp in passes:
        T = ids.shape[0]
        pad = np.full((n_layers, T, 8), -1, dtype=np.int32)
        pad[:, :, : ids.shape[2]] = ids.transpose(1, 0, 2)
        records.append({"forward_pass_id": fpid, "rank": rank, "gatherer_key": "primary",
                        "input_ids": torch.tensor(inp), "positions": torch.arange(T), "extend_seq_lens": [T],
                        "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(pad), "misc_objects": [],
                        "global_physical_count": torch.zeros(n_layers, 8, dtype=torch.int64)})
    p2l = np.tile(np.arange(8), (n_layers, 1)).astype(np.int64)
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)


def _sg_ids(T, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(T)])
    return np.concatenate([np.full((T, 1, 2), -1), ids], axis=1)  # layer 0 dense


def test_sglang_tensor_parallel_ranks_counted_once(tmp_path, capsys, monkeypatch):
    passes = [(0, _sg_ids(5, 1), list(range(5))), (1, _sg_ids(3, 2), [7, 8, 9])]
    r0, r1 = tmp_path / "rank0.pt", tmp_path / "rank1.pt"
    sglang_rank_dump(r0, 0, passes, 4)
    sglang_rank_dump(r1, 1, passes, 4)
    one = import_trace(r0, "sglang")
    both = import_trace([r0, r1], "sglang")
    np.testing.assert_array_equal(both.counts, one.counts)
    assert both.get("routing_log").shape[0] == 8 and both.tool["duplicate_rank_records"] == 2
    assert both.model["num_hidden_layers"] == 4 and both.model["moe_layers"] == [1, 2, 3]
    want = np.zeros((3, 8), np.int64)
    for _, ids, _ in passes:
        for t in ids:
            for j in range(3):
                for e in t[j + 1]:
                    want[j, e] += 1
    np.testing.assert_array_equal(both.counts, want)
    code, so, se = run_cli(["import", r0, r1, "--format", "sglang", "--out", tmp_path / "o.trace"], monkeypatch, capsys)
    assert code == 0 and "counted once" in so
    code, so, se = run_cli(["import", "--help"], monkeypatch, capsys)
    assert "counted once" in " ".join(so.split())


def test_sglang_ranks_disagree_or_hold_other_tokens(tmp_path):
    r0, r1 = tmp_path / "rank0.pt", tmp_path / "rank1.pt"
    sglang_rank_dump(r0, 0, [(0, _sg_ids(5, 1), list(range(5)))], 4)
    # same pass, same tokens, other routing: refused
    sglang_rank_dump(r1, 1, [(0, _sg_ids(5, 9), list(range(5)))], 4)
    with pytest.raises(MoesiftError, match="pass one rank's file"):
        import_trace([r0, r1], "sglang")
    # data-parallel ranks: same forward_pass_id and token count, other tokens: both counted
    sglang_rank_dump(r1, 1, [(0, _sg_ids(5, 9), list(range(10, 15)))], 4)
    t = import_trace([r0, r1], "sglang")
    assert t.get("routing_log").shape[0] == 10 and "duplicate_rank_records" not in t.tool


def test_sglang_stat_ranks_counted_once(tmp_path):
    lc = np.random.default_rng(0).integers(0, 50, size=(5, 3, 8))
    files = []
    for rank in (0, 1):
        files.append(tmp_path / f"stat{rank}.pt")
        torch.save({"rank": rank, "logical_count": torch.from_numpy(lc),
                    "average_utilization_rate_over_window": None}, files[-1])
    t = import_trace(files, "sglang", top_k=2)
    np.testing.assert_array_equal(t.counts, lc.sum(0))
    torch.save({"rank": 1, "logical_count": torch.from_numpy(lc + 1)}, files[1])
    with pytest.raises(MoesiftError, match="pass one rank's file"):
        import_trace(files, "sglang", top_k=2)


# ---- shapes for placement --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def last_dense_dir(tmp_path_factory):
    """A tiny Qwen3-MoE whose last decoder layer is dense (mlp_only_layers=[2])."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[2])
    d = tmp_path_factory.mktemp("last_dense") / "m"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    return d


def test_traced_shapes_drive_place(last_dense_dir, tmp_path):
    wl = tmp_path / "ids.jsonl"
    rng = np.random.default_rng(0)
    wl.write_text("".join(json.dumps({"input_ids": rng.integers(1, 96, 12).tolist()}) + "\n" for _ in range(4)))
    t = moesift.trace(str(last_dense_dir), wl, out=tmp_path / "t.trace", log_routing=True, progress=False)
    back = Trace.load(tmp_path / "t.trace")
    assert back.model["moe_layers"] == [0, 1]
    assert back.model["hidden_size"] == 32 and back.model["num_hidden_layers"] == 3
    res = place(back, gpus=2, out=tmp_path / "p.json")
    # all-to-all bytes from the trace's hidden size, as with an explicit --hidden 32
    assert res["hidden_size"] == 32 and "all_to_all_bytes_per_token" in res["placement"]
    same = place(back, gpus=2, hidden=32)
    assert res["placement"]["all_to_all_bytes_per_token"] == same["placement"]["all_to_all_bytes_per_token"]
    sg = json.loads((tmp_path / "p.sglang.json").read_text())["physical_to_logical_map"]
    assert len(sg) == 3 and sg[2] == list(range(8))  # the dense last layer keeps the trivial map
    # an older trace without the shapes still reads; place then has no bytes and a short map
    old = Trace(model={k: v for k, v in t.model.items() if k not in ("hidden_size", "num_hidden_layers")},
                workload=t.workload, arrays=t.arrays, tool=t.tool)
    old.save(tmp_path / "old.trace")
    r_old = place(Trace.load(tmp_path / "old.trace"), gpus=2, out=tmp_path / "q.json")
    assert r_old["hidden_size"] is None and "all_to_all_bytes_per_token" not in r_old["placement"]
    assert len(json.loads((tmp_path / "q.sglang.json").read_text())["physical_to_logical_map"]) == 2
    # a layer count that contradicts the MoE layers is an error, not a short map
    bad = Trace(model={**t.model, "num_hidden_layers": 1}, workload=t.workload, arrays=t.arrays, tool=t.tool)
    with pytest.raises(MoesiftError, match="decoder layers"):
        place(bad, gpus=2, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_imported_shapes_drive_place(last_dense_dir, tmp_path):
    a = routed(9, 3, [0, 1], 8, 2, seed=11)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(completion([a], 6, 4)))
    t = import_trace(f, "vllm", model=last_dense_dir, out=tmp_path / "i.trace")
    assert t.model["moe_layers"] == [0, 1] and t.model["num_hidden_layers"] == 3 and t.model["hidden_size"] == 32
    res = place(Trace.load(tmp_path / "i.trace"), gpus=2, out=tmp_path / "p.json")
    assert res["hidden_size"] == 32 and "all_to_all_bytes_per_token" in res["placement"]
    assert len(json.loads((tmp_path / "p.sglang.json").read_text())["physical_to_logical_map"]) == 3
    # without --model the record's decoder axis still says 3 layers (hidden size unknown)
    t2 = import_trace(f, "vllm")
    assert t2.model["num_hidden_layers"] == 3 and t2.model["moe_layers"] == [0, 1] and not t2.model.get("hidden_size")
    # the deepseek reference: 4 decoder layers
    b = routed(5, DS_NH, DS_MOE, DS_E, DS_K, seed=12)
    f.write_text(json.dumps(completion([b], 3, 3)))
    ti = import_trace(f, "vllm", model=DSV3)
    res = place(ti, gpus=4, out=tmp_path / "d.json")
    assert res["hidden_size"] == DS_H
    assert len(json.loads((tmp_path / "d.sglang.json").read_text())["physical_to_logical_map"]) == DS_NH


def test_wcer_round_trip_keeps_shapes(last_dense_dir, tmp_path):
    from moesift.formats.trace import from_expert_trace
    from moesift.formats.wcer import dump_expert_trace

    a = routed(9, 3, [0, 1], 8, 2, seed=13)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(completion([a], 6, 4)))
    t = import_trace(f, "vllm", model=last_dense_dir)
    d = dump_expert_trace(t)
    back = from_expert_trace(d)
    assert back.model["moe_layers"] == [0, 1] and back.model["num_hidden_layers"] == 3
    assert back.model["hidden_size"] == 32
    # files written without them (WCER's own) still read, with the shapes unknown
    plain = {k: v for k, v in d.items() if k not in ("moe_layers", "hidden_size", "num_hidden_layers")}
    assert from_expert_trace(plain).model["moe_layers"] is None
    for bad in ({"moe_layers": [1, 0]}, {"moe_layers": [0, 3], "num_hidden_layers": 3}, {"hidden_size": "32"}):
        with pytest.raises(MoesiftError):
            from_expert_trace({**d, **bad})


def test_vllm_022_uint16_and_moe_layers_option(tmp_path):
    # above 256 experts vLLM sends uint16
    a = routed(10, 3, [1, 2], 300, 2, seed=14)
    assert a.dtype == np.uint16
    f = tmp_path / "r.json"
    f.write_text(json.dumps(completion([a], 7, 4)))
    t = import_trace(f, "vllm", n_experts=300, moe_layers="1,2")
    assert t.model["moe_layers"] == [1, 2] and t.model["num_hidden_layers"] == 3 and t.n_experts == 300
    np.testing.assert_array_equal(t.get("prefill_counts"), recount([a[:7]], [1, 2], 300))
    np.testing.assert_array_equal(t.get("decode_counts"), recount([a[7:]], [1, 2], 300))
    with pytest.raises(MoesiftError, match="decoder layer 1 is dense"):
        import_trace(f, "vllm", n_experts=300, moe_layers="2")
