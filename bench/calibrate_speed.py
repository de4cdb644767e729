"""Calibration cost of `--strategy calibrated` per MoE layer at Qwen3-30B-A3B's shapes, and its estimate for
the whole model.

One Qwen3-MoE sparse block (hidden 2048, 128 experts of moe_intermediate 768, top-8, renormalised top-k) is
built with random weights in the given dtype on the given device, exactly the way `moesift.calibrate`
builds a block (the family's class on the meta device, this block materialised). Its routing is made as
uneven as a trained router's (router rows scaled so that a few experts take most routes) unless
``--flat-router``. Then the greedy removal `moesift.calibrate` runs on each layer (every candidate measured
on the first step, lazily afterwards, re-routing through the family's own restriction) runs on N
calibration tokens of random hidden states, down to the top-k floor. Printed: the seconds for the
layer, the block forwards it took, the seconds of one full forward of the block on the N tokens (the
ratio says how many full forwards the greedy cost), and the estimate for the 48 MoE layers of
Qwen3-30B-A3B: 48 x the measured layer (+ the capture phase: one forward of the model over the
calibration prompts, not measured here; it costs what one pass of `moesift trace` costs).

    python bench/calibrate_speed.py --device cuda --tokens 4096      # the H200 check, well under 60 s
    python bench/calibrate_speed.py --device cpu --tokens 512 --experts 32   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hostinfo import cpu_name, usable_cores  # bench/hostinfo.py, beside this script

QWEN3_30B = {"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
             "num_experts_per_tok": 8, "norm_topk_prob": True, "num_hidden_layers": 1, "intermediate_size": 6144,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 1024,
             "mlp_only_layers": [], "decoder_sparse_step": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens per layer (4096 = 16 x 256)")
    ap.add_argument("--experts", type=int, default=128, help="experts per layer (128 for Qwen3-30B-A3B)")
    ap.add_argument("--layers", type=int, default=48, help="MoE layers of the model the estimate is for (48)")
    ap.add_argument("--flat-router", action="store_true", help="random router rows as they come (near-uniform routing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()

    import torch

    from moesift.arch import adapter_for
    from moesift.selection.calibrate import _Block, floor_units, greedy_layer, skeleton, units_of

    torch.manual_seed(a.seed)
    dtype = getattr(torch, a.dtype)
    cfg = dict(QWEN3_30B, num_experts=a.experts)
    ad = adapter_for(cfg)
    spec = ad.spec(cfg)
    frame = skeleton(cfg)
    block = ad.moe_block(frame, 0)
    block.to_empty(device=a.device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
        if not a.flat_router:  # trained routers are uneven: a few experts take most routes
            w = ad.router_weight(ad.router(frame, 0))
            scale = torch.logspace(0, 1, a.experts, device=w.device)[torch.randperm(a.experts, device=w.device)]
            w.mul_(scale[:, None].to(w.dtype) * 3)
    block.to(dtype)
    x = torch.randn(a.tokens, cfg["hidden_size"], device=a.device, dtype=dtype)
    blk = _Block(frame, ad, spec, 0)
    units = units_of(spec)
    n_floor = floor_units(spec, units)

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    blk.run(x[:64], None)  # warm-up (kernels, allocator)
    sync()
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        blk.run(x, None)
    sync()
    one = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    r = greedy_layer(blk, x, units, n_floor)
    sync()
    layer_s = time.perf_counter() - t
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"{cpu_name()} ({usable_cores()} usable cores)"
    print(f"device: {dev}; torch {torch.__version__}; {a.dtype}; {'flat' if a.flat_router else 'uneven'} router")
    print(f"one MoE layer at Qwen3-30B-A3B shapes: hidden {cfg['hidden_size']}, {a.experts} experts x moe_intermediate "
          f"{cfg['moe_intermediate_size']}, top-{cfg['num_experts_per_tok']}; {a.tokens} calibration tokens")
    print(f"  full block forward on the {a.tokens} tokens: {one * 1000:.1f} ms")
    print(f"  greedy removal {a.experts} -> {len(r['floor'])} experts: {layer_s:.2f} s, {r['forwards']} block "
          f"forwards (on subsets of the tokens), = {layer_s / one:.0f} full forwards; measured on "
          f"{'each candidate own tokens' if r['local'] else 'every token'}")
    print(f"  estimate for Qwen3-30B-A3B ({a.layers} MoE layers): {a.layers * layer_s:.0f} s "
          f"= {a.layers * layer_s / 60:.1f} min of greedy, plus loading each block from disk and one forward "
          "of the model over the calibration prompts (capture)")
    sys.stdout.flush()
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": dev, "torch": torch.__version__, "dtype": a.dtype, "experts": a.experts, "tokens": a.tokens,
            "kept": len(r["floor"]), "block_forward_ms": one * 1000, "layer_s": layer_s, "forwards": r["forwards"],
            "layers": a.layers, "estimate_s": a.layers * layer_s}, indent=1))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
