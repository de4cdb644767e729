"""Cost of recording routing: traced forward / plain forward, measured side by side in one process.

Model: Qwen3-MoE decoder layers with Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8, expert
intermediate 768, 32 query / 4 KV heads of 128), random weights, every layer MoE. On the CPU the layers
are scaled down (hidden 512, expert intermediate 192; still 128 experts, top-8) so that a forward takes
seconds rather than minutes. Variants, timed
interleaved (one forward of each per round, best of N rounds):

- plain:        the model alone
- moesift:      moesift.recorder with all default statistics (counts by phase and fold (8 folds),
                router-weight mass, router-probability mass, co-activation, layer-to-layer transitions)
- naive-host:   a hook that copies each layer's selected ids to the host and bincounts there
- naive-device: a hook doing torch.bincount on the device per layer (syncs on CUDA: output size
                depends on the data)

Usage:
    python bench/trace_overhead.py                     # CPU: 2 small layers, 1 x 512 tokens
    python bench/trace_overhead.py --device cuda       # GPU: 8 layers, 4 x 1024 tokens, bfloat16
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def build(args):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=6144, moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 4 on CUDA")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence; default: 512 on CPU, 1024 on CUDA")
    ap.add_argument("--hidden", type=int, default=None, help="default: 2048 on CUDA, 512 on CPU")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=None, help="default: 768 on CUDA, 192 on CPU")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16; default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=None, help="rounds; default: 10 on CPU, 30 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time is then compute time)")
    ap.add_argument("--wall", action="store_true", help="on the CPU, time wall clock instead of process CPU time")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    # On a shared CPU, wall-clock time mostly measures other processes; CPU time of this process does not.
    clock = time.perf_counter if (cuda or args.wall) else time.process_time
    args.layers = args.layers or (8 if cuda else 2)
    args.hidden = args.hidden or (2048 if cuda else 512)
    args.moe_inter = args.moe_inter or (768 if cuda else 192)
    args.batch = args.batch or (4 if cuda else 1)
    args.tokens = args.tokens or (1024 if cuda else 512)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (30 if cuda else 10)

    from moesift.arch import adapter_for
    from moesift.recorder import Recorder

    model = build(args)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(args.device)
    mask = torch.ones_like(x, dtype=torch.bool)
    fold = torch.arange(args.batch, device=args.device) % 8
    E = spec.n_experts

    rec = Recorder(spec, args.device, folds=8)
    host_hist = np.zeros((len(spec.moe_layers), E), np.int64)
    dev_hist = torch.zeros(len(spec.moe_layers), E, dtype=torch.int64, device=args.device)

    def naive_host(m, r):
        ids = r.ids.reshape(-1).cpu().numpy()
        host_hist[m] += np.bincount(ids, minlength=E)

    def naive_device(m, r):
        dev_hist[m] += torch.bincount(r.ids.reshape(-1), minlength=E)

    def run_plain():
        model(input_ids=x, use_cache=False)

    def run_moesift():
        rec.begin_forward(mask, fold, 0)
        model(input_ids=x, use_cache=False)
        rec.end_forward()

    variants = {"plain": (run_plain, None), "moesift": (run_moesift, "rec"),
                "naive-host": (run_plain, naive_host), "naive-device": (run_plain, naive_device)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for name, (fn, hook) in variants.items():
                if hook == "rec":
                    handles = rec.attach(model, ad)
                elif hook is not None:
                    handles = ad.attach_recorder(model, hook)
                else:
                    handles = []
                sync(args.device)
                t0 = clock()
                fn()
                sync(args.device)
                dt = clock() - t0
                for h in handles:
                    h.remove()
                if rnd:
                    times[name].append(dt)
    arrays = rec.to_arrays()
    n_tok = args.batch * args.tokens
    # the recorder and the naive host hook saw the same routing
    assert (arrays["prefill_counts"] == host_hist).all(), "recorder disagrees with the host bincount"
    assert (arrays["prefill_counts"].sum(axis=1) == (args.repeats + 1) * n_tok * args.top_k).all()

    # the recorder's own work, isolated: one forward's updates (all layers) on captured routing, repeated
    captured = []
    hs = ad.attach_recorder(model, lambda m, r: captured.append(("r", m, r.ids.clone(), r.weights.clone())),
                            lambda m, p: captured.append(("p", m, p.clone())))
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hs:
        h.remove()
    from moesift.arch.base import Route

    iso = []
    for _ in range(args.repeats):
        sync(args.device)
        t0 = clock()
        rec.begin_forward(mask, fold, 0)
        for item in captured:
            if item[0] == "r":
                rec.on_route(item[1], Route(ids=item[2], weights=item[3]))
            else:
                rec.on_logits(item[1], item[2])
        rec.end_forward()
        sync(args.device)
        iso.append(clock() - t0)

    hw = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"hardware: {args.device} ({hw}); torch {torch.__version__}")
    print(f"model: {args.layers} Qwen3-MoE layers, hidden {args.hidden}, {E} experts, top-{args.top_k}, "
          f"expert intermediate {args.moe_inter}, {args.dtype}; input {args.batch} x {args.tokens} tokens; "
          f"best of {args.repeats} interleaved rounds; clock: {'wall' if clock is time.perf_counter else 'process CPU time'}")
    base = min(times["plain"])
    print(f"{'variant':<14}{'best ms':>10}{'median ms':>11}{'best/plain':>12}")
    for name, ts in times.items():
        print(f"{name:<14}{min(ts) * 1e3:>10.2f}{float(np.median(ts)) * 1e3:>11.2f}{min(ts) / base:>12.3f}")
    print(f"recorder updates alone (all layers of one forward, replayed): best {min(iso) * 1e3:.2f} ms = "
          f"{min(iso) / base:.3%} of a plain forward")


if __name__ == "__main__":
    main()
