"""Cost of recording routing in mlx-lm: traced / plain forwards of one 4-bit mlx-lm model folder, prefill and
decode, measured side by side; and the time to trim that folder against `cp -r` of it.

Model: a random Qwen3-MoE (hidden 1024, 48 experts, top-4, expert intermediate 256, 16 query / 4 KV heads of
64, vocabulary 2048, 4 layers by default, every layer MoE) saved by transformers in bfloat16 and converted by
mlx-lm's own converter (`mlx_lm.convert`, 4-bit affine, group size 64) into a temporary folder. Both variants
run the same loaded model (mlx-lm's loader, float32 activations, as `moesift trace --engine mlx` runs it).

- prefill: one forward of ``batch x tokens`` random ids. plain: ``mx.eval(model(x))``. traced: the tracer's
  batch step (`moesift.record.mlx_trace.MlxRun.prefill_batch`: routers tapped, one evaluation of the logits
  and of every layer's routing, ids / weights / router logits into the Recorder, its statistics pass).
- decode: after an untimed prompt of ``prompt`` tokens, ``steps`` greedy one-token steps with mlx-lm's KV
  cache (each step's token read on the host, as any greedy loop does). plain: the loop alone. traced:
  `MlxRun.decode` (the same loop with the routers tapped; the steps' routing recorded once at the end).
- trim: `moesift.trim` of the folder to a plan keeping half the experts of every layer, against `cp -r` of
  the folder (same disk, same file cache).

Repetitions are interleaved (plain, traced, plain again, plain, traced, plain again, ...) after warm-up runs;
"plain again" is the plain variant run a second time, a control: its ratio to plain is what the machine's
noise alone gives. Two ratios are printed:
the median of the per-round ratios traced / plain (each pair ran back to back, so a change of load between
rounds cancels; the headline figure), and median(traced) / median(plain). On a shared machine single runs
vary by 10-20%; use enough repeats that the two agree.

Usage:
    python bench/mlx_trace_overhead.py                       # 4 layers, 1 x 64 prefill, 32 decode steps
    python bench/mlx_trace_overhead.py --layers 8 --repeats 15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from hostinfo import cpu_name, usable_cores  # noqa: E402  (bench/hostinfo.py, beside this script)


def build(args, root: Path) -> Path:
    """The random transformers model with a byte-pair tokenizer, converted to a 4-bit mlx-lm folder."""
    import torch
    from mlx_lm import convert
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    from moesift.arch import adapter_for

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2048, moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4, head_dim=64,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=4096,
        mlp_only_layers=[], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(root / "hf")
    p = root / "hf" / "config.json"  # the key names hub checkpoints use, which mlx-lm reads
    p.write_text(json.dumps(adapter_for(cfg).hub_config(json.loads(p.read_text())), indent=2))
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                           trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(root / "hf")
    del m
    convert(str(root / "hf"), str(root / "q4"), quantize=True, q_bits=4, q_group_size=64)
    shutil.rmtree(root / "hf")
    return root / "q4"


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each function, run in turn `repeats` times after `warmup` untimed rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def bench_forward(args, folder: Path) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from moesift.engines.mlx_native import open_mlx
    from moesift.formats.checkpoint import CheckpointIndex
    from moesift.record.mlx_trace import MlxRun

    index = CheckpointIndex.build(folder)
    model = open_mlx(index).model
    run = MlxRun(model, index, folds=8, log_routing=False, saliency=False)
    run.evaluate_logits = True
    rng = np.random.default_rng(0)
    batch = [[int(v) for v in rng.integers(3, args.vocab, args.tokens)] for _ in range(args.batch)]
    x = mx.array(np.array(batch, dtype=np.int32))
    prompt = [int(v) for v in rng.integers(3, args.vocab, args.prompt)]
    fold = np.array([0])

    def plain_prefill():
        mx.eval(model(x))

    def traced_prefill():
        with run.installed():
            run.prefill_batch(batch, 0)

    def primed():
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt], dtype=mx.int32), cache=cache)
        return cache, int(mx.argmax(logits[0, -1]).item())

    state: dict = {}

    def plain_decode():
        cache, t = state["plain"]
        for _ in range(args.steps):
            logits = model(mx.array([[t]], dtype=mx.int32), cache=cache)
            t = int(mx.argmax(logits[0, -1]).item())

    def traced_decode():
        cache, t = state["traced"]
        with run.installed():
            run.decode(cache, t, args.steps, fold)

    pre = interleaved({"plain": plain_prefill, "traced": traced_prefill, "control": plain_prefill}, args.repeats,
                      args.warmup)
    # each decode run starts from a fresh prompt cache, made outside the timed region
    dec: dict[str, list[float]] = {"plain": [], "traced": [], "control": []}
    run.eos = set()  # random weights: never stop early, so both loops run every step
    for i in range(args.warmup + args.repeats):
        for k, f in (("plain", plain_decode), ("traced", traced_decode), ("control", plain_decode)):
            state[k if k != "control" else "plain"] = primed()
            t = time.perf_counter()
            f()
            if i >= args.warmup:
                dec[k].append(time.perf_counter() - t)
    counted = run.rec.token_counts()
    return {"prefill": pre, "decode": dec, "recorded_tokens": {"prefill": counted[0], "decode": counted[1]}}


def bench_trim(args, folder: Path, work: Path) -> dict:
    import moesift

    # a plan from a short trace of the folder, keeping half the experts of every layer
    rng = np.random.default_rng(1)
    data = work / "w.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": [int(v) for v in rng.integers(3, args.vocab, 64)]})
                              for _ in range(8)))
    moesift.trace(folder, data, out=work / "w.trace", progress=False)
    plan = moesift.plan(work / "w.trace", keep=0.5, model=folder, uniform=True, out=work / "plan.json")
    n = [0]

    def do_trim():
        n[0] += 1
        moesift.trim(folder, plan, work / f"trim{n[0]}", progress=False)
        shutil.rmtree(work / f"trim{n[0]}")

    def do_cp():
        n[0] += 1
        subprocess.run(["cp", "-r", str(folder), str(work / f"cp{n[0]}")], check=True)
        shutil.rmtree(work / f"cp{n[0]}")

    return interleaved({"cp": do_cp, "trim": do_trim}, args.trim_repeats, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trim-repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import mlx.core as mx
    from mlx_lm import __version__ as mlx_lm_version

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        folder = build(args, work)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        print(f"model: random qwen3_moe, {args.layers} layers, hidden {args.hidden}, {args.experts} experts, "
              f"top-{args.top_k}, expert intermediate {args.moe_inter}; 4-bit mlx-lm folder {size / 2**20:.1f} MiB "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        print(f"host: {cpu_name()}, {usable_cores()} usable cores; mlx {mx.__version__} on {mx.default_device()}, "
              f"mlx-lm {mlx_lm_version}")
        res = bench_forward(args, folder)
        res["trim"] = bench_trim(args, folder, work)
    out = {"args": vars(args), "folder_bytes": size, "host": cpu_name(), "cores": usable_cores()}
    for phase, unit, per in (("prefill", f"{args.batch} x {args.tokens} tokens", 1),
                             ("decode", f"{args.steps} steps", args.steps)):
        a, b, c = res[phase]["plain"], res[phase]["traced"], res[phase]["control"]
        p, t = statistics.median(a), statistics.median(b)
        paired = statistics.median(y / x for x, y in zip(a, b, strict=True))
        noise = statistics.median(y / x for x, y in zip(a, c, strict=True))
        out[phase] = {"plain_s": p, "traced_s": t, "ratio_of_medians": t / p, "paired_ratio": paired,
                      "control_paired_ratio": noise, "runs": len(a)}
        print(f"{phase:8s} ({unit}): plain {p / per * 1e3:8.2f} ms, traced {t / per * 1e3:8.2f} ms"
              f"{' per step' if per > 1 else ''}; traced / plain {paired:.3f}x (median of {len(a)} paired rounds; "
              f"ratio of medians {t / p:.3f}x; control: plain again / plain {noise:.3f}x)")
    a, b = res["trim"]["cp"], res["trim"]["trim"]
    c, tr = statistics.median(a), statistics.median(b)
    paired = statistics.median(y / x for x, y in zip(a, b, strict=True))
    out["trim"] = {"cp_s": c, "trim_s": tr, "ratio_of_medians": tr / c, "paired_ratio": paired, "runs": len(a)}
    print(f"trim     (half the experts of {size / 2**20:.1f} MiB): cp -r {c:.3f} s, moesift trim {tr:.3f} s; "
          f"trim / cp {paired:.2f}x (median of {len(a)} paired rounds; ratio of medians {tr / c:.2f}x)")
    out["recorded_tokens"] = res["recorded_tokens"]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
