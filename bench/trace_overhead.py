"""Cost of recording routing: traced / plain, prefill forwards and decode steps, measured side by side.

Model: Qwen3-MoE decoder layers with Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8, expert
intermediate 768, 32 query / 4 KV heads of 128), random weights, every layer MoE, vocabulary 4096. On the
CPU the layers are scaled down (hidden 512, expert intermediate 192; still 128 experts, top-8) so that a
forward takes seconds rather than minutes.

Phases (``--phase``; default prefill on the CPU, both on CUDA):

- prefill: ``batch x tokens`` prompts, one forward (default 8 layers, 4 x 1024 tokens on CUDA)
- decode:  ``batch`` sequences with a KV cache (a ``prompt``-token prefill, not timed), then ``steps``
           one-token steps timed together; figures are per step (default all 48 layers on CUDA, 16
           sequences, 32 steps)

Variants, timed interleaved (one run of each per round, best of N rounds):

- plain:        the model alone
- moesift:      moesift.record.recorder with all default statistics (counts by phase and fold (8 folds),
                router-weight mass, router-probability mass, selected-probability mass, co-activation,
                layer-to-layer transitions); decode steps share one batched pass, which is timed
- hooks-only:   the adapter's hooks calling functions that do nothing (the floor of any hook-based recorder)
- per-layer:    the previous per-layer recorder (tests/ref_recorder.py), when the tests folder is present
- naive-host / naive-device (prefill only): a hook that copies each layer's ids to the host and bincounts
                there / a torch.bincount on the device per layer (syncs on CUDA: data-dependent size)

Usage:
    python bench/trace_overhead.py                     # CPU: 2 small layers, 1 x 512 tokens
    python bench/trace_overhead.py --phase decode      # CPU: 4 small layers, 4 sequences, 16 steps
    python bench/trace_overhead.py --device cuda       # GPU: both phases at Qwen3-30B-A3B shapes, bfloat16
    python bench/trace_overhead.py ... --json out.json # also write the figures
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hostinfo import cpu_name  # noqa: E402  (bench/hostinfo.py, beside this script)


def build(args, layers: int):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=6144, moe_intermediate_size=args.moe_inter,
        num_hidden_layers=layers, num_attention_heads=max(4, args.hidden // 64),
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


def reference_recorder():
    """The per-layer recorder kept in tests/ref_recorder.py, if this checkout has it."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "ref_recorder.py").is_file():
        return None
    sys.path.insert(0, str(tests))
    import ref_recorder

    return ref_recorder.Recorder


def _noop(*a):
    return None


_noop.wants_logits = True  # the adapter then hands over the router's logits as they are: no work at all


def _hooks(name, model, ad, rec, ref, naive):
    if name in ("moesift", "per-layer"):
        return (rec if name == "moesift" else ref).attach(model, ad)
    if name == "hooks-only":
        return ad.attach_recorder(model, _noop, _noop)
    if name in naive:
        return ad.attach_recorder(model, naive[name])
    return []


def run_prefill(args, clock, RefRec):
    from moesift.arch import adapter_for
    from moesift.record.recorder import Recorder

    model = build(args, args.layers)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(args.device)
    mask = torch.ones_like(x, dtype=torch.bool)
    fold = torch.arange(args.batch, device=args.device) % 8
    E = spec.n_experts
    rec = Recorder(spec, args.device, folds=8)
    ref = RefRec(spec, args.device, folds=8) if RefRec else None
    host_hist = np.zeros((len(spec.moe_layers), E), np.int64)
    dev_hist = torch.zeros(len(spec.moe_layers), E, dtype=torch.int64, device=args.device)

    def naive_host(m, r):
        ids = r.ids.reshape(-1).cpu().numpy()
        host_hist[m] += np.bincount(ids, minlength=E)

    def naive_device(m, r):
        dev_hist[m] += torch.bincount(r.ids.reshape(-1), minlength=E)

    naive = {"naive-host": naive_host, "naive-device": naive_device}
    names = ["plain", "moesift", "hooks-only"] + (["per-layer"] if ref else []) + list(naive)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for name in names:
                handles = _hooks(name, model, ad, rec, ref, naive)
                r = rec if name == "moesift" else ref if name == "per-layer" else None
                sync(args.device)
                t0 = clock()
                if r is not None:
                    r.begin_forward(mask, fold, 0)
                model(input_ids=x, use_cache=False)
                if r is not None:
                    r.end_forward()
                sync(args.device)
                dt = clock() - t0
                for h in handles:
                    h.remove()
                if rnd:
                    times[name].append(dt)
    arrays = rec.to_arrays()
    n_tok = args.batch * args.tokens
    assert (arrays["prefill_counts"] == host_hist).all(), "recorder disagrees with the host bincount"
    assert (arrays["prefill_counts"].sum(axis=1) == (args.repeats + 1) * n_tok * args.top_k).all()
    if ref is not None and not (ref.to_arrays()["prefill_counts"] == arrays["prefill_counts"]).all():
        print("note: the per-layer and batched recorders saw different prefill routing (non-deterministic kernels?)")
    alone = _recorder_alone(args, clock, model, ad, x, mask, fold, rec, ref)
    del model
    return {"phase": "prefill", "layers": args.layers, "shape": f"{args.batch} x {args.tokens} tokens",
            "unit": "forward", "times": times, "alone": alone}


def _recorder_alone(args, clock, model, ad, x, mask, fold, rec, ref):
    """The recorders' own work on one forward's captured routing (all layers), replayed without the model."""
    from moesift.arch.spec import Route

    cap = []

    def on_logits(m, lg):
        cap.append(("p", m, lg.clone()))

    on_logits.wants_logits = True
    hs = ad.attach_recorder(model, lambda m, r: cap.append(("r", m, r.ids.clone(), r.weights.clone())), on_logits)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hs:
        h.remove()
    out = {}
    for name, r in (("moesift", rec), ("per-layer", ref)):
        if r is None:
            continue
        ts = []
        for _ in range(args.repeats):
            sync(args.device)
            t0 = clock()
            r.begin_forward(mask, fold, 0)
            for it in cap:
                if it[0] == "r":
                    r.on_route(it[1], Route(ids=it[2], weights=it[3]))
                else:
                    # the per-layer recorder is handed probabilities, computed here as its hooks computed them
                    r.on_logits(it[1], it[2] if r is rec else ad.probs_from_router_output(None, it[2]))
            r.end_forward()
            sync(args.device)
            ts.append(clock() - t0)
        out[name] = min(ts)
    return out


def run_decode(args, clock, RefRec):
    from transformers import DynamicCache

    from moesift.arch import adapter_for
    from moesift.record.recorder import Recorder

    model = build(args, args.decode_layers)
    ad = adapter_for(model.config)
    spec = ad.spec(model.config)
    g = torch.Generator().manual_seed(2)
    B = args.decode_batch
    prompt = torch.randint(0, args.vocab, (B, args.prompt), generator=g).to(args.device)
    steps = torch.randint(0, args.vocab, (args.steps, B, 1), generator=g).to(args.device)
    pmask = torch.ones_like(prompt, dtype=torch.bool)
    smask = torch.ones(B, 1, dtype=torch.bool, device=args.device)
    fold = torch.arange(B, device=args.device) % 8
    rec = Recorder(spec, args.device, folds=8)
    ref = RefRec(spec, args.device, folds=8) if RefRec else None
    names = ["plain", "moesift", "hooks-only"] + (["per-layer"] if ref else [])
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for rnd in range(args.decode_repeats + 1):
            for name in names:
                handles = _hooks(name, model, ad, rec, ref, {})
                r = rec if name == "moesift" else ref if name == "per-layer" else None
                cache = DynamicCache(config=model.config)
                if r is not None:
                    r.begin_forward(pmask, fold, 0)
                model(input_ids=prompt, past_key_values=cache, use_cache=True)
                if r is not None:
                    r.end_forward()
                sync(args.device)
                t0 = clock()
                for s in range(args.steps):
                    if r is not None:
                        r.begin_forward(smask, fold, 1)
                    model(input_ids=steps[s], past_key_values=cache, use_cache=True)
                if r is not None:
                    r.end_forward()
                sync(args.device)
                dt = (clock() - t0) / args.steps
                for h in handles:
                    h.remove()
                del cache
                if rnd:
                    times[name].append(dt)
    a = rec.to_arrays()
    n = (args.decode_repeats + 1) * B * args.steps * args.top_k
    assert (a["decode_counts"].sum(axis=1) == n).all(), "decode counts do not add up"
    if ref is not None:
        b = ref.to_arrays()
        if not all((a[k] == b[k]).all() for k in ("prefill_counts", "decode_counts", "transitions")):
            print("note: the per-layer and batched recorders saw different decode routing (non-deterministic kernels?)")
    del model
    return {"phase": "decode", "layers": args.decode_layers,
            "shape": f"{B} sequences, {args.prompt}-token prompt, {args.steps} steps",
            "unit": "step", "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phase", choices=("prefill", "decode", "both"), default=None,
                    help="default: prefill on CPU, both on CUDA")
    ap.add_argument("--layers", type=int, default=None, help="prefill layers; default: 2 on CPU, 8 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="prefill sequences; default: 1 on CPU, 4 on CUDA")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence; default: 512 on CPU, 1024 on CUDA")
    ap.add_argument("--decode-layers", type=int, default=None, help="default: 4 on CPU, 48 on CUDA")
    ap.add_argument("--decode-batch", type=int, default=None, help="decoding sequences; default: 4 on CPU, 16 on CUDA")
    ap.add_argument("--prompt", type=int, default=None, help="decode prompt tokens; default: 32 on CPU, 256 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per round; default: 16 on CPU, 32 on CUDA")
    ap.add_argument("--hidden", type=int, default=None, help="default: 2048 on CUDA, 512 on CPU")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=None, help="default: 768 on CUDA, 192 on CPU")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16; default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=None, help="prefill rounds; default: 10 on CPU, 30 on CUDA")
    ap.add_argument("--decode-repeats", type=int, default=None, help="decode rounds; default: 5 on CPU, 10 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time is then compute time)")
    ap.add_argument("--wall", action="store_true", help="on the CPU, time wall clock instead of process CPU time")
    ap.add_argument("--no-reference", action="store_true", help="leave out the previous per-layer recorder")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    # On a shared CPU, wall-clock time mostly measures other processes; CPU time of this process does not.
    clock = time.perf_counter if (cuda or args.wall) else time.process_time
    d = lambda cpu, gpu: gpu if cuda else cpu  # noqa: E731
    args.phase = args.phase or d("prefill", "both")
    args.layers = args.layers or d(2, 8)
    args.hidden = args.hidden or d(512, 2048)
    args.moe_inter = args.moe_inter or d(192, 768)
    args.batch = args.batch or d(1, 4)
    args.tokens = args.tokens or d(512, 1024)
    args.decode_layers = args.decode_layers or d(4, 48)
    args.decode_batch = args.decode_batch or d(4, 16)
    args.prompt = args.prompt or d(32, 256)
    args.steps = args.steps or d(16, 32)
    args.dtype = args.dtype or d("float32", "bfloat16")
    args.repeats = args.repeats or d(10, 30)
    args.decode_repeats = args.decode_repeats or d(5, 10)
    RefRec = None if args.no_reference else reference_recorder()

    results = []
    for phase in (("prefill", "decode") if args.phase == "both" else (args.phase,)):
        results.append((run_prefill if phase == "prefill" else run_decode)(args, clock, RefRec))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    hw = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"hardware: {args.device} ({hw}); torch {torch.__version__}")
    print(f"model: Qwen3-MoE layers, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, expert "
          f"intermediate {args.moe_inter}, vocab {args.vocab}, {args.dtype}; clock: "
          f"{'wall' if clock is time.perf_counter else 'process CPU time'}")
    out = {"device": args.device, "hardware": hw, "torch": torch.__version__, "phases": {}}
    for r in results:
        n = args.repeats if r["phase"] == "prefill" else args.decode_repeats
        print(f"\n{r['phase']}: {r['layers']} layers, {r['shape']}; best of {n} interleaved rounds, per {r['unit']}")
        base = min(r["times"]["plain"])
        print(f"{'variant':<14}{'best ms':>10}{'median ms':>11}{'best/plain':>12}")
        ph = {}
        for name, ts in r["times"].items():
            print(f"{name:<14}{min(ts) * 1e3:>10.3f}{float(np.median(ts)) * 1e3:>11.3f}{min(ts) / base:>12.4f}")
            ph[name] = {"best_ms": min(ts) * 1e3, "median_ms": float(np.median(ts)) * 1e3, "ratio": min(ts) / base}
        out["phases"][r["phase"]] = {"layers": r["layers"], "shape": r["shape"], "variants": ph}
        for name, t in r.get("alone", {}).items():
            print(f"{name} recorder's work alone (one forward's routing replayed): best {t * 1e3:.3f} ms = "
                  f"{t / base:.3%} of a plain forward")
            ph[name]["alone_ms"] = t * 1e3
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
