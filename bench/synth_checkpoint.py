"""Random-weight Qwen3-MoE checkpoints of any shape, written fast (one random block tiled), for benchmarks.

    python bench/synth_checkpoint.py OUT_DIR [--layers 4] [--hidden 2048] [--experts 128] [--moe-inter 768]

Defaults are Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of intermediate 768, 32 query / 4 KV heads of
128) with a 4096-token vocabulary; per-expert tensors as on the hub, bf16, shards of at most 4 GB.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np


def qwen3_moe_config(layers: int, hidden: int = 2048, experts: int = 128, moe_inter: int = 768,
                     vocab: int = 4096, heads: int = 32, kv_heads: int = 4, head_dim: int = 128) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden,
        "vocab_size": vocab, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": 4 * hidden,
        "moe_intermediate_size": moe_inter, "num_experts": experts, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def write_qwen3_moe(d: str | Path, cfg: dict, shard_bytes: int = 4 * 10**9, seed: int = 0) -> int:
    """Write `cfg`'s checkpoint of random bf16 values (finite, small) into `d`; returns its tensor bytes."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    H, E, inter, V = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    tensors: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [V, H])]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.post_attention_layernorm.weight", [H]),
                    (f"{p}.self_attn.q_proj.weight", [q, H]), (f"{p}.self_attn.k_proj.weight", [kv, H]),
                    (f"{p}.self_attn.v_proj.weight", [kv, H]), (f"{p}.self_attn.o_proj.weight", [H, q]),
                    (f"{p}.self_attn.q_norm.weight", [cfg["head_dim"]]),
                    (f"{p}.self_attn.k_norm.weight", [cfg["head_dim"]]), (f"{p}.mlp.gate.weight", [E, H])]
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            tensors += [(f"{x}.gate_proj.weight", [inter, H]), (f"{x}.up_proj.weight", [inter, H]),
                        (f"{x}.down_proj.weight", [H, inter])]
    tensors += [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    rng = np.random.default_rng(seed)
    # bf16 values of magnitude ~0.02 with random mantissas and signs: finite, so the model computes
    block = (rng.integers(0, 1 << 7, 16 << 20, dtype=np.uint16) | 0x3C00
             | (rng.integers(0, 2, 16 << 20, dtype=np.uint16) << 15)).view(np.uint8)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in part:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fn
        hb = json.dumps(header).encode()
        hb += b" " * ((-len(hb)) % 8)
        with open(d / fn, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            left, pos = off, 0
            while left:
                k = min(left, len(block) - pos)
                f.write(block[pos : pos + k])
                left -= k
                pos = (pos + k) % len(block)
        total += off
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--moe-inter", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args()
    n = write_qwen3_moe(a.out, qwen3_moe_config(a.layers, a.hidden, a.experts, a.moe_inter, a.vocab))
    print(f"{a.out}: {n / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
