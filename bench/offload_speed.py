"""Speed of lossless residency (moesift.load_offloaded) against the alternatives, side by side in one run.

Model: Qwen3-MoE with Qwen3-30B-A3B shapes on CUDA (hidden 2048, 128 experts, top-8, expert intermediate
768, 32 query / 4 KV heads of 128, vocab 151936, bfloat16), as many of its 48 layers as --layers says
(default 2 on CUDA, to fit ~90 s with --time-budget 85 skipping what does not fit); on the CPU scaled down (hidden 256, 64 experts, top-8, expert intermediate 96,
vocab 4096, float32, 4 layers). Random weights; each layer's router rows are scaled by a Zipf-like factor in
a random order so that routing is skewed. A trace of a few thousand tokens (random token documents, routing
logged, 4 folds) is recorded first; plans come from it.

At device budgets holding 25 / 50 / 75 / 100% of the expert bytes (plus every non-expert byte):
- moesift:     load_offloaded with a plan made by `plan --offload` for that budget (resident experts +
               top-k LRU cache slots per layer), outputs equal to the full model's
- full:        the whole model on the device (the budget is ignored; the reference speed)
- accelerate:  transformers + accelerate offload, device_map="auto" with the same max_memory (CUDA only)
- layers-host: whole layers' experts in host memory, computed there (llama.cpp --n-cpu-moe): the first
               layers that fit keep every expert on the device, the others none (load_offloaded, no cache)
- restricted:  the model trimmed to a plan of the same budget (load_resident): routing restricted, so NOT
               the full model's outputs (quality loss), shown for speed only

Measured: decode tokens/s at batch 1 and 8 (greedy steps with the KV cache after a 32-token prompt),
prefill tokens/s (one sequence), best of --repeats; moesift's measured hit rate (batch-1 decode, cache cold
at the start of the timed runs) beside the plan's predicted held-out hit rate. On the CPU the clock is the
process's CPU time (1 thread by default), so the figures are compute and bookkeeping, not PCIe transfers.

Usage:
    python bench/offload_speed.py                   # CPU, scaled down (host memory plays the device)
    python bench/offload_speed.py --device cuda     # one GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(args, out: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers,
        num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 512),
        head_dim=128 if args.hidden >= 1024 else 64, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):  # random init on the GPU is much faster than on the host
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    g = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        ranks = torch.arange(1, args.experts + 1, dtype=torch.float32)
        scale = 4.0 * ranks ** -0.6  # Zipf-like: a few experts win top-k far more often
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            perm = torch.randperm(args.experts, generator=g, device=args.device)
            gate.mul_(scale.to(args.device)[perm].to(gate.dtype)[:, None] * 10)
    model.save_pretrained(out)
    del model


def workload(path: Path, docs: int, length: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist()}) + "\n")


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, args, new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s at batch 1 and 8 (greedy steps after a 32-token prompt, KV cache), prefill tokens/s;
    best of `repeats`. On the CPU the clock is this process's CPU time (the machine may be shared)."""
    dev = next(model.parameters()).device
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    g = torch.Generator().manual_seed(2)
    out: dict[str, float] = {}
    off = getattr(model, "moesift_offload", None)

    def decode(x, n):
        o = model(x, use_cache=True)
        pkv, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync(str(dev))
        t0 = clock()
        for _ in range(n):
            o = model(nxt, past_key_values=pkv, use_cache=True)
            pkv, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync(str(dev))
        return clock() - t0

    with torch.no_grad():
        for b in (1, 8):
            x = torch.randint(0, args.vocab, (b, 32), generator=g).to(dev)
            decode(x, 1)  # warm-up
            if off is not None and b == 1:
                off.reset()
            best = max(b * new_tokens / max(decode(x, new_tokens), 1e-9) for _ in range(repeats))
            out[f"decode_b{b}"] = best
            if off is not None and b == 1:
                out["hit_rate"] = off.stats()["hit_rate"]
        x = torch.randint(0, args.vocab, (1, args.prefill), generator=g).to(dev)
        model(x, use_cache=False)
        best = 0.0
        for _ in range(repeats):
            sync(str(dev))
            t0 = clock()
            model(x, use_cache=False)
            sync(str(dev))
            best = max(best, args.prefill / max(clock() - t0, 1e-9))
        out["prefill"] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (of Qwen3-30B-A3B's 48); default 4 "
                    "on the CPU, 2 on CUDA")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; variants not started by then are "
                    "skipped and listed (default: 85 on CUDA, none on the CPU)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--budgets", default="50,25,75,100", help="percent of expert bytes on the device, in the order run")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed; default 16 CPU, 32 CUDA")
    ap.add_argument("--prefill", type=int, default=None, help="prefill tokens; default 128 CPU, 1024 CUDA")
    ap.add_argument("--accelerate-tokens", type=int, default=4, help="decode steps timed for accelerate offload")
    ap.add_argument("--repeats", type=int, default=None, help="best of N; default 3 CPU, 2 CUDA")
    ap.add_argument("--trace-docs", type=int, default=16)
    ap.add_argument("--trace-len", type=int, default=None, help="tokens per trace document; default 128 CPU, 256 CUDA")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.layers = args.layers or (2 if cuda else 4)
    if args.time_budget is None and cuda:
        args.time_budget = 85.0
    args.hidden = args.hidden or (2048 if cuda else 256)
    args.experts = args.experts or (128 if cuda else 64)
    args.moe_inter = args.moe_inter or (768 if cuda else 96)
    args.vocab = args.vocab or (151936 if cuda else 4096)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.new_tokens = args.new_tokens or (32 if cuda else 16)
    args.prefill = args.prefill or (1024 if cuda else 128)
    args.trace_len = args.trace_len or (256 if cuda else 128)
    args.repeats = args.repeats or (2 if cuda else 3)
    args.threads = args.threads or (0 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renamed in later transformers

    import moesift
    from moesift.selection.offload_budget import device_bytes

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="moesift-offload-bench-"))
    mdir = tmp / "model"
    build(args, mdir)
    wl = tmp / "wl.jsonl"
    workload(wl, args.trace_docs, args.trace_len, args.vocab)
    tr = moesift.trace(str(mdir), str(wl), batch_size=4, folds=4, log_routing=True, progress=False,
                       device=args.device, dtype=args.dtype)
    tr.save(tmp / "t.trace")
    idx = moesift.checkpoint_index(mdir)
    fixed = device_bytes(idx, {}, {})
    E, L = idx.spec.n_experts, len(idx.spec.moe_layers)
    expert_total = sum(fixed["expert_bytes_per_layer"].values()) * E
    t_setup = time.perf_counter() - t_start

    rows = []

    skipped: list[str] = []

    def run(name, budget, loader):
        if name in skip:
            return
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            skipped.append(f"{name}@{budget}%")
            return
        t0 = time.perf_counter()
        model = loader()
        t_load = time.perf_counter() - t0
        slow = name == "accelerate"  # moves offloaded layers' weights for every token: few tokens suffice
        r = measure(model, args, args.accelerate_tokens if slow else args.new_tokens, 1 if slow else args.repeats)
        r.update(variant=name, budget=budget, load_s=t_load)
        rows.append(r)
        del model
        gc.collect()  # the offload hooks form reference cycles; free device and pinned memory now
        if cuda:
            torch.cuda.empty_cache()

    def full():
        m, _ = moesift.load_trimmed(mdir, device=args.device, dtype=args.dtype)
        return m

    run("full", 100, full)
    for pct in [int(x) for x in args.budgets.split(",")]:
        # every non-expert byte + pct of the expert bytes (+ the routers once more: plan --offload sets the
        # whole routers aside on top of the trimmed-checkpoint budget, which counts resident rows already)
        mem = fixed["non_expert"] + expert_total * pct // 100 + sum(
            t.nbytes for t in idx.tensors if t.role.kind == "router")
        if pct >= 100:  # everything resident, plus the slots plan --offload sets aside
            mem += L * args.top_k * max(fixed["expert_bytes_per_layer"].values())
        p = moesift.plan([str(tmp / "t.trace")], memory=mem, model=mdir, offload=True, cache_slots=args.top_k,
                         out=tmp / f"p{pct}.json", force=True)
        pred = p.predictions["offload"]

        def ours(p=p):
            m, _ = moesift.load_offloaded(mdir, p, device=args.device, dtype=args.dtype,
                                          progress=False)
            return m

        run("moesift", pct, ours)
        if rows and rows[-1]["variant"] == "moesift":
            rows[-1]["predicted_heldout_hit_rate"] = pred.get("heldout_hit_rate")
            rows[-1]["heldout_coverage"] = p.predictions.get("heldout_coverage")
            rows[-1]["device_bytes"] = pred.get("device_bytes")
        n_whole = min(L, int(expert_total * pct // 100 // max(expert_total // L, 1)))

        def layers_host(n_whole=n_whole):
            plan = {la: (list(range(E)) if i < n_whole else []) for i, la in enumerate(idx.spec.moe_layers)}
            m, _ = moesift.load_offloaded(mdir, plan, device=args.device, cache_slots=0, dtype=args.dtype,
                                          progress=False)
            return m

        run("layers-host", pct, layers_host)
        if cuda:
            def accel(mem=mem):
                from transformers import AutoModelForCausalLM

                return AutoModelForCausalLM.from_pretrained(
                    mdir, dtype=getattr(torch, args.dtype), device_map="auto",
                    max_memory={0: int(mem), "cpu": 512 << 30}).eval()

            run("accelerate", pct, accel)
        try:
            rp = moesift.plan([str(tmp / "t.trace")], memory=mem, model=mdir)

            def restricted(rp=rp):
                return moesift.load_resident(mdir, rp, device=args.device, dtype=args.dtype)

            run("restricted", pct, restricted)
        except moesift.MoesiftError as e:
            print(f"restricted at {pct}%: {e}", file=sys.stderr)

    from hostinfo import cpu_name, usable_cores

    order = ["full", "moesift", "accelerate", "layers-host", "restricted"]
    rows.sort(key=lambda r: (r["variant"] != "full", r["budget"], order.index(r["variant"])))
    ref = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        for k in ("decode_b1", "decode_b8", "prefill"):
            r[f"{k}_vs_full"] = r[k] / ref[k]
    machine = (torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {usable_cores()} cores, "
               f"{torch.get_num_threads()} torch threads")
    info = {"device": args.device, "machine": machine, "python": platform.python_version(),
            "torch": torch.__version__, "layers": args.layers, "hidden": args.hidden, "experts": args.experts,
            "top_k": args.top_k, "moe_inter": args.moe_inter, "dtype": args.dtype,
            "trace_tokens": int(tr.get("routing_log").shape[0]), "setup_s": t_setup,
            "total_s": time.perf_counter() - t_start, "date": time.strftime("%Y-%m-%d"), "skipped": skipped}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1, default=float))
        return
    print(f"# offload speed, {info['date']}, {machine}, torch {torch.__version__}")
    print(f"# Qwen3-MoE {args.layers} layers, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, "
          f"expert intermediate {args.moe_inter}, {args.dtype}; trace {info['trace_tokens']} tokens; "
          f"total {info['total_s']:.0f} s")
    if skipped:
        print(f"# time budget {args.time_budget:.0f} s reached; not run: {', '.join(skipped)}")
    print("| budget | variant | decode b1 tok/s | decode b8 tok/s | prefill tok/s | b1 vs full | b8 vs full | "
          "prefill vs full | hit rate (pred. held-out) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hr = ""
        if "hit_rate" in r:
            ph = r.get("predicted_heldout_hit_rate")
            hr = f"{r['hit_rate']:.3f}" + (f" ({ph:.3f})" if ph is not None else "")
        b = "-" if r["variant"] == "full" else f"{r['budget']}%"
        print(f"| {b} | {r['variant']} | {r['decode_b1']:.1f} | {r['decode_b8']:.1f} | {r['prefill']:.0f} | "
              f"{r['decode_b1_vs_full']:.2f} | {r['decode_b8_vs_full']:.2f} | {r['prefill_vs_full']:.2f} | {hr} |")


if __name__ == "__main__":
    main()
