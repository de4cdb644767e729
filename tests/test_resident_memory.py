"""`load_resident` reads only the resident experts: its host memory stays below the resident bytes + 512 MiB
on a checkpoint built larger than that (so reading it whole would break the bound).

The checkpoint's shards are sparse files (headers written, data left as holes): reading them costs no disk
and gives zeros, which the model loads like any weights; what a loader reads still lands in its memory.
Memory is measured in a fresh process: its peak RSS (getrusage) minus its RSS just before the call, with
torch, transformers and the model's modules already imported."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

H, INTER, E, LAYERS, VOCAB = 1024, 768, 64, 4, 4096
KEEP = 4
MIB = 1 << 20

PROBE = r"""
import json, os, sys
import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from moesift.apply.resident import load_resident
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(sys.argv[1]))]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def hwm():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
# ru_maxrss can carry the parent's high-water mark across fork and exec; VmHWM is reset here (Linux >= 4.0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
m = load_resident(sys.argv[1], sys.argv[2], device="cpu", dtype="bfloat16")
peak = hwm()
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"delta": peak - before, "param_bytes": n}))
"""


def _sparse_checkpoint(d: Path) -> int:
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": H,
           "vocab_size": VOCAB, "num_hidden_layers": LAYERS, "num_attention_heads": 8, "num_key_value_heads": 2,
           "head_dim": 128, "intermediate_size": 2048, "moe_intermediate_size": INTER, "num_experts": E,
           "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = [("model.embed_tokens.weight", [VOCAB, H]), ("model.norm.weight", [H]), ("lm_head.weight", [VOCAB, H])]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        tensors += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.post_attention_layernorm.weight", [H]),
                    (f"{p}.self_attn.q_proj.weight", [1024, H]), (f"{p}.self_attn.k_proj.weight", [256, H]),
                    (f"{p}.self_attn.v_proj.weight", [256, H]), (f"{p}.self_attn.o_proj.weight", [H, 1024]),
                    (f"{p}.self_attn.q_norm.weight", [128]), (f"{p}.self_attn.k_norm.weight", [128]),
                    (f"{p}.mlp.gate.weight", [E, H])]
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            tensors += [(f"{x}.gate_proj.weight", [INTER, H]), (f"{x}.up_proj.weight", [INTER, H]),
                        (f"{x}.down_proj.weight", [H, INTER])]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(8 + len(hb) + off)
    return off


def test_load_resident_host_memory_is_bounded_by_resident_bytes(tmp_path):
    total = _sparse_checkpoint(tmp_path)
    plan = {"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": E},
            "layers": [{"layer": i, "resident": list(range(0, E, E // KEEP))} for i in range(LAYERS)]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    expert = 3 * INTER * H * 2
    resident = total - LAYERS * (E - KEEP) * (expert + 2 * H)  # experts dropped with their router rows
    bound = resident + 512 * MIB
    assert total > bound + 32 * MIB, "the checkpoint must be larger than the bound for the test to mean anything"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(tmp_path / "plan.json")], capture_output=True,
                       text=True, env=env, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["param_bytes"] == resident, "the loaded model holds exactly the resident tensors"
    assert got["delta"] < bound, (f"peak RSS grew by {got['delta'] / MIB:.0f} MiB while loading "
                                  f"{resident / MIB:.0f} MiB of resident tensors (bound {bound / MIB:.0f} MiB; "
                                  f"checkpoint {total / MIB:.0f} MiB)")


def test_read_tensors_direct_and_staged_equal_safetensors(tmp_path, monkeypatch):
    """The range reader, reading in place (CPU) and through staging buffers (the accelerator path, run on
    the CPU here), with tiny reads so that pieces are split, joined across gaps and buffers are reused."""
    import torch
    from safetensors.torch import load_file, save_file

    import moesift.engines.tensors as res
    from moesift.formats.checkpoint import read_header

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (1, 3), (2, 4), (1, 2), (7, 13), (1, 3), (3, 3), (2, 2), (9, 5)]  # odd ones: small gaps
    ts = {f"t{i}": torch.randn(*sh, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
          for i, sh in enumerate(shapes)}
    save_file(ts, tmp_path / "a.safetensors")
    header, hsize = read_header(tmp_path / "a.safetensors")
    want = load_file(tmp_path / "a.safetensors")
    # every other tensor, the rows of t4 in two pieces (row 0 and rows 2..), t8 whole
    spec = []
    for name in ("t0", "t2", "t4", "t6", "t8"):
        s0, e0 = header[name]["data_offsets"]
        shape = list(header[name]["shape"])
        parts = [("a.safetensors", hsize + s0, e0 - s0)]
        if name == "t4":
            row = (e0 - s0) // shape[0]
            parts = [("a.safetensors", hsize + s0, row), ("a.safetensors", hsize + s0 + 2 * row, e0 - s0 - 2 * row)]
            shape = [shape[0] - 1, shape[1]]
        spec.append((name, header[name]["dtype"], shape, parts))
    monkeypatch.setattr(res, "_CHUNK", 64)
    monkeypatch.setattr(res, "_GAP", 64)
    pieces, o = [], 0
    for name, _, _, parts in spec:
        for f, off, n in parts:
            pieces.append(res._Piece(name, f, off, n, o))
    ext = res._extents(pieces)
    assert any(len(e[3]) > 1 for e in ext), "some reads join pieces across a gap"
    assert any(p.nbytes == 64 for e in ext for p in e[3]), "some pieces are split into reads of _CHUNK bytes"
    for staged in (False, True):
        got = res.read_tensors(tmp_path, spec, "cpu", staged=staged)
        assert sorted(got) == ["t0", "t2", "t4", "t6", "t8"]
        for name in got:
            w = want[name] if name != "t4" else torch.cat([want[name][:1], want[name][2:]])
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), (name, staged)
