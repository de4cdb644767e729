"""SGLang expert distribution recorder dumps built the way SGLang's recorder writes them
(python/sglang/srt/eplb/expert_distribution.py): ``per_pass`` and ``per_token`` dumps one file per rank,
``expert_distribution_recorder_{time}_{rank}.pt`` holding ``records`` and ``last_physical_to_logical_map``;
``stat`` dumps one file written by rank 0 after an all-reduce over ranks.

Expected counts are recounted here from the expert choices the fixtures were built from (collections.Counter
over logical ids), not from the dumps' own count tensors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hostile import run_cli

from moesift.core.errors import MoesiftError
from moesift.record.importers import import_trace

NL, E, K = 4, 8, 2  # decoder layers (layer 0 dense), logical experts, top-k
P = E + 2  # physical experts: logical 0 and 1 have a redundant copy each
P2L = np.tile(np.concatenate([np.arange(E), [0, 1]]), (NL, 1)).astype(np.int64)


def choices(n_tokens: int, seed: int) -> np.ndarray:
    """[layers, tokens, K] physical expert ids of a pass (-1 on the dense layer 0, as nothing routes there)."""
    rng = np.random.default_rng(seed)
    ids = np.full((NL, n_tokens, K), -1, dtype=np.int64)
    for li in range(1, NL):
        for t in range(n_tokens):
            ids[li, t] = rng.choice(P, K, replace=False)
    return ids


def physical_count(ids: np.ndarray) -> torch.Tensor:
    """A pass's global_physical_count as SGLang's select-experts gatherer makes it: int32 [layers, physical]."""
    g = np.zeros((NL, P), dtype=np.int32)
    for li in range(NL):
        for e in ids[li].ravel():
            if e >= 0:
                g[li, e] += 1
    return torch.from_numpy(g)


def recount(passes) -> np.ndarray:
    """Independent logical counts [MoE layers, E] of a list of physical-id arrays."""
    want = np.zeros((NL - 1, E), dtype=np.int64)
    for ids in passes:
        for li in range(1, NL):
            for e, n in Counter(int(P2L[li, x]) for x in ids[li].ravel() if x >= 0).items():
                want[li - 1, e] += n
    return want


def detail_dump(folder, rank: int, records: list[dict], stamp: float = 1.5):
    """What SGLang's detail accumulator writes for one rank (per_pass and per_token modes)."""
    path = folder / f"expert_distribution_recorder_{stamp}_{rank}.pt"
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)}, path)
    return path


def per_pass_record(fpid: int, rank: int, ids: np.ndarray) -> dict:
    return {"forward_pass_id": fpid, "rank": rank, "gatherer_key": "primary",
            "global_physical_count": physical_count(ids)}


def per_token_record(fpid: int, rank: int, ids: np.ndarray, input_ids: list[int], ext) -> dict:
    T = ids.shape[1]
    topk = np.full((NL, T, 8), -1, dtype=np.int32)  # the gatherer's buffer is [layers, tokens, 8], -1 padded
    topk[:, :, :K] = ids
    return {"forward_pass_id": fpid, "rank": rank, "gatherer_key": "primary", "input_ids": input_ids,
            "positions": list(range(T)), "extend_seq_lens": ext, "forward_mode": 1 if ext else 2,
            "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": [],
            "global_physical_count": physical_count(ids)}


def test_per_pass_of_data_parallel_ranks_are_summed(tmp_path, monkeypatch, capsys):
    # two data-parallel ranks in lockstep (same forward_pass_ids), each routing its own tokens;
    # pass 0 was idle on both ranks (no tokens), so those two records are equal and must still not drop data
    idle = np.full((NL, 0, K), -1, dtype=np.int64)
    r0 = [idle, choices(5, 1), choices(2, 2)]
    r1 = [idle, choices(3, 3), choices(4, 4)]
    f0 = detail_dump(tmp_path, 0, [per_pass_record(i, 0, ids) for i, ids in enumerate(r0)])
    f1 = detail_dump(tmp_path, 1, [per_pass_record(i, 1, ids) for i, ids in enumerate(r1)])
    t = import_trace([f0, f1], "sglang", top_k=K)
    np.testing.assert_array_equal(t.counts, recount(r0 + r1))
    assert t.model["moe_layers"] == [1, 2, 3] and t.n_experts == E
    assert "duplicate_rank_records" not in t.tool
    (note,) = t.tool["notes"]
    assert note.startswith("per_pass: the counts of 2 rank file(s) (ranks [0, 1]) were summed")
    assert "hold no tokens" in note and "cannot be matched" in note
    # one rank alone is only that rank's share
    np.testing.assert_array_equal(import_trace(f0, "sglang", top_k=K).counts, recount(r0))
    out = tmp_path / "dp.trace"
    code, so, se = run_cli(["import", f0, f1, "--format", "sglang", "--top-k", K, "--out", out], monkeypatch, capsys)
    assert code == 0 and out.exists(), se


def test_per_pass_expert_parallel_ranks_count_their_own_experts(tmp_path):
    # DeepEP low-latency: a rank's record counts only its own physical experts (its slice of the axis)
    ids = [choices(6, 7), choices(3, 8)]
    files = []
    for rank, sl in ((0, slice(0, P // 2)), (1, slice(P // 2, P))):
        recs = []
        for fpid, x in enumerate(ids):
            g = physical_count(x)
            mask = torch.zeros_like(g)
            mask[:, sl] = 1
            recs.append({"forward_pass_id": fpid, "rank": rank, "gatherer_key": "primary",
                         "global_physical_count": g * mask})
        files.append(detail_dump(tmp_path, rank, recs))
    t = import_trace(files, "sglang", top_k=K)
    np.testing.assert_array_equal(t.counts, recount(ids))


def test_per_pass_tensor_parallel_copies_counted_once(tmp_path):
    # two separate servers (data-parallel replicas), each with 2 tensor-parallel ranks writing the same records
    a = [choices(4, 11), choices(2, 12)]
    b = [choices(3, 13), choices(5, 14)]
    files = []
    for server, passes in (("a", a), ("b", b)):
        for rank in (0, 1):
            folder = tmp_path / server
            folder.mkdir(exist_ok=True)
            files.append(detail_dump(folder, rank, [per_pass_record(i, rank, x) for i, x in enumerate(passes)]))
    t = import_trace(files, "sglang", top_k=K)
    np.testing.assert_array_equal(t.counts, recount(a + b))
    assert t.tool["duplicate_rank_records"] == 4
    (note,) = t.tool["notes"]
    assert "2 rank file(s)" in note and "2 file(s) whose records all equal another file's were counted once" in note
    assert "cannot be told from such copies" in note


def test_per_pass_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    f0 = detail_dump(tmp_path, 0, [per_pass_record(0, 0, choices(3, 1))])
    g = torch.zeros((NL, P + 3), dtype=torch.int32)
    path = tmp_path / "expert_distribution_recorder_2.0_1.pt"
    torch.save({"records": [{"forward_pass_id": 0, "rank": 1, "gatherer_key": "primary", "global_physical_count": g}],
                "last_physical_to_logical_map": torch.from_numpy(P2L)}, path)
    with pytest.raises(MoesiftError, match="matching last_physical_to_logical_map"):
        import_trace([f0, path], "sglang", top_k=K)
    code, so, se = run_cli(["import", f0, path, "--format", "sglang", "--top-k", K, "--out", tmp_path / "x.trace"],
                           monkeypatch, capsys)
    assert code == 2 and se.startswith("moesift: error:") and len(se.strip().splitlines()) == 1, se
    empty = detail_dump(tmp_path, 3, [])
    with pytest.raises(MoesiftError, match="holds no records"):
        import_trace(empty, "sglang", top_k=K)


def test_stat_dump_of_tensor_parallel_ranks(tmp_path):
    # tp_size 2 without an all-to-all backend: both ranks route every token, rank 0 writes the all-reduced sum
    passes = [choices(5, 21), choices(3, 22), choices(1, 23)]
    buffer_rows = 16  # circular buffer; unused rows stay zero
    per_rank = np.zeros((buffer_rows, NL, E), dtype=np.int32)
    for row, ids in enumerate(passes):
        for li in range(NL):
            for x in ids[li].ravel():
                if x >= 0:
                    per_rank[row, li, P2L[li, x]] += 1
    all_reduced = per_rank * 2
    f = tmp_path / "expert_distribution_recorder_3.25.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(all_reduced),
                "average_utilization_rate_over_window": None}, f)
    t = import_trace(f, "sglang", top_k=K)
    np.testing.assert_array_equal(t.counts, 2 * recount(passes))  # as SGLang defines them: not divided
    (note,) = t.tool["notes"]
    assert note.startswith("stat: counts as SGLang dumps them, not divided")
    assert "tp_size" in note and "neither tp_size nor the backend" in note and "last 16 forward passes" in note


def test_per_token_tensor_parallel_ranks_counted_once(tmp_path):
    passes = [(choices(6, 31), list(range(100, 106)), [2, 4]), (choices(3, 32), [7, 8, 9], None)]
    files = [detail_dump(tmp_path, rank, [per_token_record(i, rank, ids, inp, ext)
                                          for i, (ids, inp, ext) in enumerate(passes)]) for rank in (0, 1)]
    t = import_trace(files, "sglang")
    np.testing.assert_array_equal(t.counts, recount([p[0] for p in passes]))
    assert t.tool["duplicate_rank_records"] == 2 and "notes" not in t.tool
    assert t.get("routing_log").shape[0] == 9
    assert t.get("doc_offsets").tolist() == [0, 2, 6, 7, 8, 9]


def test_per_pass_bad_forward_pass_id_is_one_error(tmp_path):
    rec = per_pass_record(0, 0, choices(2, 41))
    rec["forward_pass_id"] = "zero"
    with pytest.raises(MoesiftError, match="forward_pass_id must be an integer"):
        import_trace(detail_dump(tmp_path, 0, [rec]), "sglang", top_k=K)
