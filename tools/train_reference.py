"""Train one of the small reference MoE models shipped in ``moesift/assets/models``.

    python tools/build_corpus.py --out build/corpus
    python tools/train_reference.py --arch qwen3_moe --minutes 75 --out moesift/assets/models/qwen3moe-ref
    python tools/train_reference.py --arch deepseek_v3 --minutes 75 --out moesift/assets/models/deepseekv3-ref
    python tools/train_reference.py --arch olmoe --experts 64 --top-k 8 --moe-intermediate 32 --minutes 40 \
        --out build/models/olmoe-ref
    python tools/train_reference.py --arch qwen2_moe --experts 32 --top-k 4 --minutes 40 --out build/models/qwen2moe-ref

Real transformers classes built from a config (Qwen3Moe, DeepseekV3, Olmoe, Qwen2Moe ForCausalLM), fp32 training on the
CPU (one thread by default), AdamW with linear warmup and a cosine decay driven by elapsed time so a run is boxed
by ``--minutes``. Batches mix the four domains (each row is a window from one domain chosen uniformly).

- qwen3_moe: softmax routing, normalised top-k weights, load-balancing auxiliary loss.
- olmoe: many small experts (top-8 of 64), no shared expert, un-normalised top-k weights, auxiliary loss.
- qwen2_moe: a sigmoid-gated shared expert beside the routed experts, un-normalised top-k weights, auxiliary loss.
- deepseek_v3: one shared expert, sigmoid routing with a selection bias (``e_score_correction_bias``), group-limited
  routing; the bias is updated without an auxiliary loss: after every step ``bias += u * sign(mean_load - load)``
  per MoE layer, from the step's selection counts (read with a forward pre-hook on each layer's ``experts``).

A bf16 checkpoint (safetensors, tokenizer, generation config, ``training.json``) is written to ``--out`` every
``--save-minutes`` and at the end. ``--bench`` times a few steps per experts implementation and exits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

DOMAINS = ("code", "prose", "literature", "math")


# ---------------------------------------------------------------- data


def tokenize_split(corpus: Path, tok, domain: str, split: str) -> np.ndarray:
    """Token stream of one split (documents joined by eos), cached as .npy next to the corpus."""
    cache = corpus / "tokens" / f"{domain}.{split}.npy"
    if cache.is_file():
        return np.load(cache)
    eos = tok.eos_token_id
    texts = [json.loads(line)["text"] for line in open(corpus / f"{domain}.{split}.jsonl", encoding="utf-8")]
    out: list[int] = []
    for i in range(0, len(texts), 256):
        for ids in tok(texts[i : i + 256], add_special_tokens=False)["input_ids"]:
            out.append(eos)
            out.extend(ids)
    arr = np.asarray(out, dtype=np.uint16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


class Sampler:
    def __init__(self, streams: dict[str, np.ndarray], seq_len: int, seed: int):
        self.streams = streams
        self.names = list(streams)
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            s = self.streams[self.names[self.rng.integers(len(self.names))]]
            start = self.rng.integers(0, len(s) - self.seq_len)
            rows.append(s[start : start + self.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))


def fixed_windows(stream: np.ndarray, seq_len: int, n: int) -> torch.Tensor:
    step = max(seq_len, (len(stream) - seq_len) // n)
    rows = [stream[i : i + seq_len].astype(np.int64) for i in range(0, len(stream) - seq_len, step)][:n]
    return torch.from_numpy(np.stack(rows))


# ---------------------------------------------------------------- models


def build_config(arch: str, tok, args):
    common = dict(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        moe_intermediate_size=args.moe_intermediate,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common,
            intermediate_size=args.moe_intermediate * 4,
            num_experts=args.experts,
            norm_topk_prob=True,
            output_router_logits=True,
            router_aux_loss_coef=args.aux_coef,
            head_dim=args.hidden // args.heads,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            **common,
            intermediate_size=args.moe_intermediate * 4,
            n_routed_experts=args.experts,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
            num_mtp_layers=0,
        )
    if arch == "olmoe":
        from transformers import OlmoeConfig

        # many small experts, top-8, no shared expert; OLMoE stores the expert width as intermediate_size
        return OlmoeConfig(
            **common,
            intermediate_size=args.moe_intermediate,
            num_experts=args.experts,
            norm_topk_prob=False,
            output_router_logits=True,
            router_aux_loss_coef=args.aux_coef,
        )
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        # a sigmoid-gated shared expert beside the routed ones
        return Qwen2MoeConfig(
            **common,
            intermediate_size=args.moe_intermediate * 4,
            shared_expert_intermediate_size=args.moe_intermediate * 4,
            num_experts=args.experts,
            norm_topk_prob=False,
            output_router_logits=True,
            router_aux_loss_coef=args.aux_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    raise SystemExit(f"train_reference: error: unknown --arch {arch!r} (qwen3_moe, deepseek_v3, olmoe or qwen2_moe)")


class BiasBalancer:
    """Aux-loss-free load balancing (DeepSeek-V3): per-layer selection counts -> bias update."""

    def __init__(self, model, rate: float):
        self.rate = rate
        self.counts: dict[int, torch.Tensor] = {}
        self.gates = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            if not hasattr(mlp, "experts") or not hasattr(mlp, "gate"):
                continue
            self.gates[i] = mlp.gate
            n = mlp.gate.e_score_correction_bias.numel()

            def hook(mod, inputs, i=i, n=n):
                ids = inputs[1].detach().reshape(-1)
                c = torch.bincount(ids, minlength=n).float()
                self.counts[i] = self.counts.get(i, 0) + c

            self.handles.append(mlp.experts.register_forward_pre_hook(hook))

    @torch.no_grad()
    def step(self) -> float:
        """Apply the update; returns the mean max/mean load ratio over layers (1.0 = balanced)."""
        ratios = []
        for i, c in self.counts.items():
            bias = self.gates[i].e_score_correction_bias
            bias += self.rate * torch.sign(c.mean() - c)
            ratios.append(float(c.max() / c.mean()))
        self.counts.clear()
        return float(np.mean(ratios)) if ratios else float("nan")


def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(1.0, progress)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def val_losses(model, val: dict[str, torch.Tensor], batch: int = 8) -> dict[str, float]:
    model.eval()
    out = {}
    for d, x in val.items():
        tot, n = 0.0, 0
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            r = model(input_ids=xb, labels=xb, output_router_logits=False, use_cache=False)
            k = xb.numel() - xb.shape[0]
            tot += float(r.loss) * k
            n += k
        out[d] = tot / n
    model.train()
    return out


def save_checkpoint(model, tok, out: Path, info: dict) -> None:
    """bf16 save_pretrained into a sibling temp dir, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.output_router_logits = False
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # config keys as hub checkpoints of the family spell them (engines read those); DeepSeek-V3 hub checkpoints
    # store an untied output layer, which mlx-lm's deepseek_v3 expects
    from hub_config import hub_style

    hub_style(tmp, untie=m.config.model_type == "deepseek_v3")
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    card = out / "README.md"
    if card.is_file():
        shutil.copy2(card, tmp / "README.md")
    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=["qwen3_moe", "deepseek_v3", "olmoe", "qwen2_moe"])
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--save-minutes", type=float, default=10.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--experts-impl", default="auto", help="eager, grouped_mm, batched_mm or auto (benchmark)")
    ap.add_argument("--bench", action="store_true", help="time a few steps per experts implementation and exit")
    ap.add_argument("--prepare", action="store_true", help="tokenize the corpus (cached) and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(args.corpus / "tokenizer")
    train = {d: tokenize_split(args.corpus, tok, d, "train") for d in DOMAINS}
    valid = {d: tokenize_split(args.corpus, tok, d, "valid") for d in DOMAINS}
    if args.prepare:
        for d in DOMAINS:
            print(f"{d}: train {len(train[d])} tokens, valid {len(valid[d])} tokens")
        return 0
    sampler = Sampler(train, args.seq_len, args.seed)
    val = {d: fixed_windows(valid[d], args.seq_len, 16) for d in DOMAINS}

    config = build_config(args.arch, tok, args)

    def make(impl: str):
        torch.manual_seed(args.seed)
        m = AutoModelForCausalLM.from_config(config, experts_implementation=impl)
        m.train()
        return m

    def time_steps(m, n: int) -> float:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        x = sampler.batch(args.batch)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss = m(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts[1:]))

    impl = args.experts_impl
    if args.bench or impl == "auto":
        res = {}
        for cand in ("eager", "grouped_mm") + (("batched_mm",) if args.bench else ()):
            try:
                res[cand] = time_steps(make(cand), 5)
            except Exception as e:  # noqa: BLE001 - report and skip implementations that do not run here
                print(f"bench {cand}: failed: {type(e).__name__}: {e}", flush=True)
        for k, v in res.items():
            print(f"bench {args.arch} experts_implementation={k}: {v:.3f} s/step "
                  f"({args.batch * args.seq_len / v:.0f} tok/s)", flush=True)
        if args.bench:
            return 0
        impl = min(res, key=res.get)
    if args.out is None:
        raise SystemExit("train_reference: error: --out is required")
    model = make(impl)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.arch}: {n_params / 1e6:.2f}M parameters, experts_implementation={impl}", flush=True)
    balancer = BiasBalancer(model, args.bias_rate) if args.arch == "deepseek_v3" else None

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=32,
    )

    budget = args.minutes * 60.0
    t_start = time.time()
    last_save = t_start
    step, tokens = 0, 0
    ema = None
    history = []

    def info(final: bool) -> dict:
        return {
            "arch": args.arch, "steps": step, "tokens_seen": tokens, "train_seconds": round(time.time() - t_start, 1),
            "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
            "threads": args.threads, "experts_implementation": impl, "aux_coef": args.aux_coef,
            "bias_rate": args.bias_rate if balancer else None, "seed": args.seed, "final": final,
            "history": history, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        }

    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        lr = lr_at(elapsed / budget, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.batch(args.batch)
        out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = balancer.step() if balancer else float("nan")
        step += 1
        tokens += x.numel()
        lm = float(out.loss) - (args.aux_coef * float(out.aux_loss) if getattr(out, "aux_loss", None) is not None
                                else 0.0)
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        if step % args.log_every == 0:
            extra = f" aux {float(out.aux_loss):.3f}" if getattr(out, "aux_loss", None) is not None else ""
            extra += f" load max/mean {imbalance:.2f}" if balancer else ""
            print(f"step {step} t {elapsed / 60:.1f}m lr {lr:.2e} loss {lm:.3f} ema {ema:.3f}{extra} "
                  f"tok/s {tokens / max(elapsed, 1e-9):.0f}", flush=True)
        if time.time() - last_save >= args.save_minutes * 60:
            vl = val_losses(model, val)
            history.append({"step": step, "tokens": tokens, "minutes": round((time.time() - t_start) / 60, 1),
                            "train_loss_ema": round(ema, 4), "valid_loss": {k: round(v, 4) for k, v in vl.items()}})
            print(f"valid step {step}: " + " ".join(f"{k} {v:.3f} (ppl {math.exp(v):.1f})" for k, v in vl.items()),
                  flush=True)
            save_checkpoint(model, tok, args.out, info(False))
            print(f"saved {args.out} at step {step}", flush=True)
            last_save = time.time()

    vl = val_losses(model, val)
    history.append({"step": step, "tokens": tokens, "minutes": round((time.time() - t_start) / 60, 1),
                    "train_loss_ema": round(ema or float("nan"), 4),
                    "valid_loss": {k: round(v, 4) for k, v in vl.items()}})
    print(f"valid final step {step}: " + " ".join(f"{k} {v:.3f} (ppl {math.exp(v):.1f})" for k, v in vl.items()),
          flush=True)
    save_checkpoint(model, tok, args.out, info(True))
    print(f"done: {step} steps, {tokens} tokens, {(time.time() - t_start) / 60:.1f} min -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
