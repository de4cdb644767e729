"""Calibration cost of `--strategy calibrated` per MoE layer, against its lower bound, side by side.

One Qwen3-MoE sparse block (top-8, renormalised top-k; hidden and moe_intermediate as given) is built with
random weights in the given dtype on the given device, exactly the way `moesift.calibrate` builds a block
(the family's class on the meta device, this block materialised). Its routing is made as uneven as a
trained router's (router rows scaled so that a few experts take most routes) unless ``--flat-router``.
For every (experts, tokens) pair of the grid, on random hidden states:

- lower bound: every expert run on every calibration token once (one call of the experts module per
  expert on all the tokens), the least any calibration that looks at every expert's output can cost;
- calibrated: the greedy removal `moesift.calibrate` runs on each layer, down to the top-k floor, with the
  cached scorer (`moesift.selection.calib_cache`: every expert on every token once, reduced to per-token
  Gram matrices; every candidate re-routed over the router's logits), all included: the full block
  forward, the check forwards, the expert outputs and the greedy;
- with ``--block``: the same greedy scoring every candidate by running the block restricted to it (the
  reference scorer), its time, and whether both gave the same removal order.

Printed per pair: the seconds (the fastest of ``--repeat`` runs, the lower bound's and the calibrated
runs interleaved), calibrated / lower bound, and with ``--block`` the block scorer's seconds (one run) and
its time over the cached one. Then an estimate for a model of ``--layers`` MoE layers at the largest pair.

    python bench/calibrate_speed.py --threads 1                        # the CPU grid (hidden 512, ffn 256)
    python bench/calibrate_speed.py --threads 1 --block --experts 64   # and the block scorer beside it
    python bench/calibrate_speed.py --device cuda --hidden 2048 --moe-intermediate 768 --block  # Qwen3-30B-A3B
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hostinfo import cpu_name, usable_cores  # bench/hostinfo.py, beside this script

QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 512, "moe_intermediate_size": 256, "num_experts": 64,
             "num_experts_per_tok": 8, "norm_topk_prob": True, "num_hidden_layers": 1, "intermediate_size": 1024,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024,
             "mlp_only_layers": [], "decoder_sparse_step": 1}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA unless given")
    ap.add_argument("--experts", type=_ints, default=[64, 128], help="experts per layer (comma list)")
    ap.add_argument("--tokens", type=_ints, default=[1024, 4096], help="calibration tokens (comma list)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--block", action="store_true", help="also run the block scorer and compare the orders")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared machine: 1)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the fastest is kept (2)")
    ap.add_argument("--layers", type=int, default=48, help="MoE layers of the model the estimate is for (48)")
    ap.add_argument("--flat-router", action="store_true", help="random router rows as they come (near-uniform routing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else \
        f"{cpu_name()} ({usable_cores()} usable cores, {torch.get_num_threads()} torch threads)"
    print(f"device: {dev}; torch {torch.__version__}; {dtype}; {'flat' if a.flat_router else 'uneven'} router")
    print(f"one Qwen3-MoE layer: hidden {a.hidden}, moe_intermediate {a.moe_intermediate}, top-{a.top_k}")
    rows = []
    for E in a.experts:
        for T in a.tokens:
            r = _one(a, E, T, dtype)
            rows.append(r)
            line = (f"  {E:4d} experts, {T:5d} tokens: lower bound {r['lower_bound_s']:7.2f} s, calibrated "
                    f"{r['cached_s']:7.2f} s = {r['cached_s'] / r['lower_bound_s']:.2f}x the lower bound "
                    f"({r['evaluations']} candidate scorings, {r['forwards']} block forwards)")
            if a.block:
                line += (f"; block scorer {r['block_s']:7.2f} s = {r['block_s'] / r['cached_s']:.1f}x the cached, "
                         f"same order: {r['same_order']}")
            print(line)
            sys.stdout.flush()
    big = rows[-1]
    print(f"estimate for {a.layers} MoE layers at {big['experts']} experts, {big['tokens']} tokens: "
          f"{a.layers * big['cached_s']:.0f} s of greedy (+ reading each block and the capture forward)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev, "torch": torch.__version__, "dtype": str(dtype),
                                            "hidden": a.hidden, "moe_intermediate": a.moe_intermediate,
                                            "top_k": a.top_k, "rows": rows}, indent=1))


def _one(a: argparse.Namespace, E: int, T: int, dtype) -> dict:
    """Lower bound, cached greedy (and block greedy) on one random block of E experts and T tokens."""
    import torch

    from moesift.arch import adapter_for
    from moesift.selection.calib_cache import BlockRunner
    from moesift.selection.calib_greedy import greedy_layer
    from moesift.selection.calibrate import floor_units, skeleton, units_of

    torch.manual_seed(a.seed)
    cfg = dict(QWEN3_MOE, num_experts=E, hidden_size=a.hidden, moe_intermediate_size=a.moe_intermediate,
               num_experts_per_tok=a.top_k)
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
            scale = torch.logspace(0, 1, E, device=w.device)[torch.randperm(E, device=w.device)]
            w.mul_(scale[:, None].to(w.dtype) * 3)
    block.to(dtype)
    x = torch.randn(T, a.hidden, device=a.device, dtype=dtype)
    blk = BlockRunner(frame, ad, spec, 0)
    units = units_of(spec)
    n_floor = floor_units(spec, units)

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def lower_bound() -> None:  # every expert on every token once
        with torch.no_grad():
            for e in range(E):
                ad.expert_output(frame, 0, x, torch.full((T, 1), e, dtype=torch.long, device=x.device))

    def timed(f):  # (seconds, result) of one run
        t = time.perf_counter()
        out = f()
        sync()
        return time.perf_counter() - t, out

    blk.run(x[:64], None)  # warm-up (kernels, allocator)
    sync()
    lb, cached, r = float("inf"), float("inf"), None
    for _ in range(max(1, a.repeat)):
        lb = min(lb, timed(lower_bound)[0])
        s, r = timed(lambda: greedy_layer(blk, x, units, n_floor, scorer="cache"))
        cached = min(cached, s)
    out = {"experts": E, "tokens": T, "lower_bound_s": lb, "cached_s": cached, "evaluations": r["evaluations"],
           "forwards": r["forwards"], "scorer": r["scorer"], "kept": len(r["floor"])}
    if a.block:  # one run: it is the slow one
        s, q = timed(lambda: greedy_layer(blk, x, units, n_floor, scorer="block"))
        out.update(block_s=s, same_order=q["order"] == r["order"], block_forwards=q["forwards"])
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
