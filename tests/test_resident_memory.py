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
import json, os, resource, sys
import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from moesift.resident import load_resident
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(sys.argv[1]))]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
m = load_resident(sys.argv[1], sys.argv[2], device="cpu", dtype="bfloat16")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
