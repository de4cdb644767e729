"""Is a perplexity gap between two resident sets real? The paired difference per eval text, with its
standard error, on a bundled reference model.

Two plans are built exactly as ``bench/quality_reference.py --selection`` builds them (``moesift.plan`` from
the domain's trace split, ``--trace-docs`` prompts traced with saliency; the calibrated strategies
calibrated on the same prompts), then every eval text (``--eval-docs`` of the domain's eval split, cut to
``--max-length`` token windows as ``moesift.sweep`` cuts them) is scored one window at a time under the
full model and each plan (``moesift.restrict``, float32, CPU). Printed per plan: the perplexity ratio to the
full model (the sweep's figure: token-weighted over all windows), and for B - A: the difference of the
mean log-perplexity (token-weighted), its standard error from the per-window differences (paired, windows
as the units), and a 95% interval from 10,000 bootstrap resamples of the windows. A gap inside its
interval's reach of zero is not told apart by these eval texts.

    OMP_NUM_THREADS=1 python bench/paired_gap.py --model deepseekv3-ref --domain prose --keep 0.75 \\
        --a calibrated+allocate --b frequency --b-groups equal

A strategy written NAME+allocate plans with ``allocate=True``; ``--a-groups`` / ``--b-groups`` set ``plan``'s
``groups`` (auto by default).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import moesift
from moesift import assets
from moesift.evaluation.evaluate import batch_nll
from moesift.formats.workload import encode_documents, read_documents, windows


def build_plan(mdir, tr, cal, strategy: str, keep: float, groups: str):
    base, alloc = strategy.removesuffix("+allocate"), strategy.endswith("+allocate")
    return moesift.plan(tr, keep=keep, strategy=base, model=mdir, allocate=alloc, groups=groups,
                        calibration=cal if base == "calibrated" else None)


def window_nll(model, wins, plan=None) -> np.ndarray:
    """[n, 2]: summed NLL and scored tokens of each window."""
    import contextlib

    out = []
    ctx = moesift.restrict(model, plan) if plan is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            mask = torch.ones_like(ids)
            s, n = batch_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            out.append((s, n))
    return np.asarray(out, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseekv3-ref", choices=list(assets.MODELS))
    ap.add_argument("--domain", default="prose", choices=list(assets.DOMAINS))
    ap.add_argument("--keep", type=float, default=0.75)
    ap.add_argument("--a", default="calibrated+allocate")
    ap.add_argument("--b", default="frequency")
    ap.add_argument("--a-groups", default="auto")
    ap.add_argument("--b-groups", default="auto")
    ap.add_argument("--trace-docs", type=int, default=64)
    ap.add_argument("--calib-docs", type=int, default=64)
    ap.add_argument("--eval-docs", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    a = ap.parse_args()
    t0 = time.perf_counter()
    mdir = assets.reference_model(a.model)
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    tr = moesift.trace(m, assets.workload(a.domain, "trace"), label=a.domain, max_samples=a.trace_docs,
                       max_length=a.max_length, saliency=True, progress=False, tokenizer=tok)
    cal = None
    if "calibrated" in (a.a + a.b):
        cal = moesift.calibrate(mdir, assets.workload(a.domain, "trace"), max_samples=a.calib_docs,
                                max_length=a.max_length, progress=False, loaded=(m, tok))
    pa = build_plan(mdir, tr, cal, a.a, a.keep, a.a_groups)
    pb = build_plan(mdir, tr, cal, a.b, a.keep, a.b_groups)
    docs = read_documents([assets.workload(a.domain, "eval")], max_samples=a.eval_docs)
    wins = windows(encode_documents(docs, tok), a.max_length)
    full, na, nb = window_nll(m, wins), window_nll(m, wins, pa), window_nll(m, wins, pb)
    tokens = full[:, 1]
    assert np.array_equal(tokens, na[:, 1]) and np.array_equal(tokens, nb[:, 1])
    T = tokens.sum()

    def ratio(x):
        return math.exp((x[:, 0].sum() - full[:, 0].sum()) / T)

    # token-weighted mean log-perplexity difference B - A = sum_w (nb_w - na_w) / T; windows are the units
    d = nb[:, 0] - na[:, 0]
    gap = d.sum() / T
    n = len(d)
    # standard error of the ratio estimator sum(d) / sum(t), linearised: residuals d_w - gap * t_w
    se = math.sqrt(n / (n - 1) * ((d - gap * tokens) ** 2).sum()) / T if n > 1 else float("nan")
    rng = np.random.default_rng(a.seed)
    boots = []
    for _ in range(10_000):
        i = rng.integers(0, n, n)
        boots.append(d[i].sum() / tokens[i].sum())
    lo, hi = np.percentile(boots, [2.5, 97.5])
    print(f"{a.model} {a.domain} keep {a.keep:g}: {n} eval windows, {int(T)} tokens (float32, CPU); "
          f"{time.perf_counter() - t0:.0f} s")
    for name, g, p, x in ((a.a, a.a_groups, pa, na), (a.b, a.b_groups, pb, nb)):
        print(f"  {name} (groups {p.provenance.get('groups', '-')}, asked {g}): ppl x{ratio(x):.5f}, experts per "
              f"layer {p.counts()}")
    print(f"  B - A mean log-ppl {gap:+.6f} (x{math.exp(gap):.5f}); paired standard error {se:.6f}; "
          f"95% bootstrap interval [{lo:+.6f}, {hi:+.6f}]; windows where B is worse: {int((d > 0).sum())} of {n}")


if __name__ == "__main__":
    main()
