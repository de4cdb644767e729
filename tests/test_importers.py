"""Serving-engine importers: vLLM routed experts and SGLang recorder dumps round-trip into moesift traces;
malformed files are refused with one clear line (exit 2)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from moesift.cli import main
from moesift.core.errors import MoesiftError
from moesift.formats.trace import Trace, merge
from moesift.record.importers import import_trace

L, E, K = 3, 8, 2


def rows(n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])


def vllm_response(prompt, gen):
    """A completion response of vLLM's OpenAI-compatible server with --enable-return-routed-experts."""
    return {
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                     "prompt_logprobs": None, "routed_experts": gen.tolist()}],
        "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(gen) + 1, "total_tokens": 0},
        "prompt_routed_experts": prompt.tolist(),
    }


def run(args, capsys, monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["moesift", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return (code, *capsys.readouterr())


def test_vllm_round_trip(tmp_path):
    docs = [(rows(7, 1), rows(4, 2)), (rows(5, 3), rows(3, 4))]
    f = tmp_path / "responses.jsonl"
    f.write_text("\n".join(json.dumps(vllm_response(p, g)) for p, g in docs) + "\n")
    t = import_trace(f, "vllm", n_experts=E, out=tmp_path / "v.trace")
    back = Trace.load(tmp_path / "v.trace")
    log = back.get("routing_log")
    want = np.concatenate([np.concatenate([p, g]) for p, g in docs])
    assert np.array_equal(log, want)
    assert back.get("doc_offsets").tolist() == [0, 11, 19]
    assert back.get("log_phase").tolist() == [0] * 7 + [1] * 4 + [0] * 5 + [1] * 3
    pre = np.stack([np.bincount(np.concatenate([docs[0][0], docs[1][0]])[:, li].ravel(), minlength=E)
                    for li in range(L)])
    assert np.array_equal(back.get("prefill_counts"), pre)
    assert back.counts.sum() == 19 * L * K
    # 0.21 records count MoE layers without saying which decoder layers they are
    assert back.top_k == K and back.n_experts == E and t.model["moe_layers"] is None
    # transitions from the log
    tr = back.get("transitions")
    assert tr.shape == (L - 1, E, E) and tr.sum() == 19 * K * K * (L - 1)
    assert back.get("fold_counts").sum(0).tolist() == back.counts.tolist()
    # one JSON list and one JSON object read the same way
    f2 = tmp_path / "list.json"
    f2.write_text(json.dumps([vllm_response(p, g) for p, g in docs]))
    assert np.array_equal(import_trace(f2, "vllm", n_experts=E).get("routing_log"), want)
    # traces imported on two machines merge
    m = merge([t, import_trace(f2, "vllm", n_experts=E)])
    assert m.counts.sum() == 2 * t.counts.sum()


def test_vllm_with_model_maps_layers(tmp_path, tiny_dir):
    d = tiny_dir("qwen3_moe")
    from moesift.formats.checkpoint import CheckpointIndex

    spec = CheckpointIndex.build(d).spec
    nl, ne, k = len(spec.moe_layers), spec.n_experts, spec.top_k
    rng = np.random.default_rng(0)
    p = np.stack([np.stack([rng.choice(ne, k, replace=False) for _ in range(nl)]) for _ in range(6)])
    f = tmp_path / "r.json"
    f.write_text(json.dumps(vllm_response(p, p[:2])))
    t = import_trace(f, "vllm", model=d)
    assert t.model["moe_layers"] == list(spec.moe_layers) and t.model["config_hash"]
    assert t.n_experts == ne


def sglang_per_token_dump(path, passes, p2l):
    records = []
    for i, (ids, ext) in enumerate(passes):
        T = ids.shape[0]
        pad = np.full((ids.shape[1], T, 8), -1, dtype=np.int32)  # [layers, tokens, 8], -1 padded
        pad[:, :, : ids.shape[2]] = ids.transpose(1, 0, 2)
        records.append({"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                        "input_ids": list(range(T)), "positions": list(range(T)), "extend_seq_lens": ext,
                        "forward_mode": 1 if ext else 2, "topk_ids_of_layer": torch.from_numpy(pad),
                        "misc_objects": [], "global_physical_count": torch.zeros(ids.shape[1], p2l.shape[1],
                                                                                dtype=torch.int64)})
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)


def test_sglang_per_token_round_trip(tmp_path):
    # SGLang's layer axis covers every decoder layer: layer 0 is dense (never routed), layers 1..3 MoE
    n_layers = L + 1
    P = E + 4
    p2l = np.tile((np.arange(P) % E), (n_layers, 1)).astype(np.int64)  # physical slot p holds logical p % E
    prefill = rows(9, 5)
    decode = rows(3, 6)

    def to_phys(r):  # write physical ids; the redundant copy of expert e is slot e + E where it exists
        out = r.copy()
        out[::2] = np.where(out[::2] < 4, out[::2] + E, out[::2])
        return np.concatenate([np.full((len(r), 1, K), -1), out], axis=1)

    f = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    sglang_per_token_dump(f, [(to_phys(prefill), [4, 5]), (to_phys(decode), None)], p2l)
    t = import_trace(f, "sglang")
    assert t.model["moe_layers"] == [1, 2, 3]
    assert np.array_equal(t.get("routing_log"), np.concatenate([prefill, decode]))
    assert t.get("doc_offsets").tolist() == [0, 4, 9, 10, 11, 12]
    assert t.get("log_phase").tolist() == [0] * 9 + [1] * 3
    assert t.n_experts == E and t.top_k == K
    # with an explicit layer list
    t2 = import_trace(f, "sglang", moe_layers="1,2,3", n_experts=E, top_k=K)
    assert np.array_equal(t2.get("routing_log"), t.get("routing_log"))


def test_sglang_stat_counts_only(tmp_path):
    rng = np.random.default_rng(0)
    lc = rng.integers(0, 50, size=(5, L, E))
    f = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(lc), "average_utilization_rate_over_window": None}, f)
    t = import_trace(f, "sglang", top_k=K, out=tmp_path / "s.trace")
    assert np.array_equal(Trace.load(tmp_path / "s.trace").counts, lc.sum(0))
    assert t.get("routing_log") is None
    with pytest.raises(MoesiftError, match="top-k"):
        import_trace(f, "sglang")


def test_malformed_files_refused(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "x", "choices": [{"text": "hi"}]}')
    with pytest.raises(MoesiftError, match="holds no routed experts"):
        import_trace(bad, "vllm")
    bad.write_text('{"prompt_routed_experts": [[1, 2], [3, 4]]}')
    with pytest.raises(MoesiftError, match=r"\[tokens\]\[layers\]\[top_k\]"):
        import_trace(bad, "vllm")
    bad.write_text("not json at all\n")
    with pytest.raises(MoesiftError, match="line 1 is not JSON"):
        import_trace(bad, "vllm")
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(vllm_response(rows(3, 0), rows(2, 1))))
    with pytest.raises(MoesiftError, match="outside"):
        import_trace(ok, "vllm", n_experts=4)
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"garbage")
    with pytest.raises(MoesiftError, match="not an SGLang expert distribution dump"):
        import_trace(pt, "sglang")
    torch.save({"something": torch.zeros(2)}, pt)
    with pytest.raises(MoesiftError, match="no logical_count or records"):
        import_trace(pt, "sglang")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"logical_count": Evil()}, pt)
    with pytest.raises(MoesiftError, match="without running"):
        import_trace(pt, "sglang")
    # through the command line: one line, exit 2, nothing written
    out = tmp_path / "o.trace"
    code, so, se = run(["import", str(bad), "--format", "vllm", "--out", out], capsys, monkeypatch)
    assert code == 2 and se.startswith("moesift: error:") and len(se.strip().splitlines()) == 1
    assert not out.exists()
    code, so, se = run(["import", str(ok), "--format", "parquet", "--out", out], capsys, monkeypatch)
    assert code == 2 and "choose vllm or sglang" in se
    code, so, se = run(["import", str(ok), "--format", "vllm", "--experts", E, "--out", out, "--json"], capsys,
                       monkeypatch)
    assert code == 0 and json.loads(so)["tokens_logged"] == 5 and out.exists()
    code, so, se = run(["import", str(ok), "--format", "vllm", "--out", out], capsys, monkeypatch)
    assert code == 2 and "--force" in se
