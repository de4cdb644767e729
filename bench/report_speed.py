"""Time `moesift.report` end to end on a synthetic trace shaped like a large MoE: 60 MoE layers x 256
experts, top-8, 8 folds, transitions, and a 1M-token routing log (documents of 512 tokens).

    .venv/bin/python bench/report_speed.py [--tokens 1000000] [--keep-trace]

Times, side by side: loading the trace, the report without HTML, and the report with the HTML file
(everything: concentration, held-out folds, learning curve, locality on the sampled log, cache policies,
affinity, HTML). Prints the hardware it ran on. Target: under 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostinfo import cpu_name, usable_cores  # noqa: E402 - bench/hostinfo.py, beside this script

from moesift.formats.trace import Trace


def synthetic_trace(n_tokens: int, L: int = 60, E: int = 256, K: int = 8, doc_len: int = 512, folds: int = 8,
                    seed: int = 0, transition_tokens: int = 32768) -> Trace:
    """Skewed routing (Zipf-like ranks over a per-layer permutation) with local repetition: a token keeps its
    predecessor's choice with probability 0.6. Transitions are counted on the first `transition_tokens`."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** 0.9
    p /= p.sum()
    log = np.empty((n_tokens, L, K), dtype=np.int16)
    spread = (np.arange(K) * 31) % E
    t_idx = np.arange(n_tokens)
    for li in range(L):
        perm = rng.permutation(E)
        r = rng.choice(E, size=n_tokens, p=p)
        fresh = rng.random(n_tokens) >= 0.6
        fresh[0] = True
        src = np.maximum.accumulate(np.where(fresh, t_idx, 0))
        r = r[src]
        log[:, li, :] = perm[(r[:, None] + spread[None, :]) % E]
    offs = np.arange(0, n_tokens + 1, doc_len, dtype=np.int64)
    if offs[-1] != n_tokens:
        offs = np.append(offs, n_tokens)
    fold_of_token = np.repeat(np.arange(len(offs) - 1) % folds, np.diff(offs))
    fold_counts = np.zeros((folds, L, E), np.int64)
    for li in range(L):
        key = fold_of_token[:, None] * E + log[:, li, :].astype(np.int64)
        fold_counts[:, li, :] = np.bincount(key.ravel(), minlength=folds * E).reshape(folds, E)
    n_t = min(n_tokens, transition_tokens)
    trans = np.zeros((L - 1, E, E), np.int64)
    for li in range(L - 1):
        a = log[:n_t, li, :].astype(np.int64)[:, :, None] * E + log[:n_t, li + 1, :].astype(np.int64)[:, None, :]
        trans[li] = np.bincount(a.ravel(), minlength=E * E).reshape(E, E)
    model = {"name": "synthetic-60x256", "model_type": "synthetic", "config_hash": "0", "moe_layers": list(range(L)),
             "n_experts": E, "top_k": K, "n_shared": 0}
    workload = {"label": "synthetic", "documents": len(offs) - 1, "prefill_tokens": n_tokens, "decode_tokens": 0}
    arrays = {"prefill_counts": fold_counts.sum(axis=0), "fold_counts": fold_counts, "transitions": trans,
              "routing_log": log, "doc_offsets": offs}
    return Trace(model=model, workload=workload, arrays=arrays)


def hardware() -> str:
    return (f"{cpu_name()}; {usable_cores()} CPU cores usable; Python {platform.python_version()}, numpy {np.__version__}; "
            f"{platform.platform()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--keep-trace", action="store_true")
    args = ap.parse_args()
    from moesift.surfaces.report import report

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.trace"
        t0 = time.perf_counter()
        synthetic_trace(args.tokens).save(path)
        gen = time.perf_counter() - t0
        print(f"synthetic trace: 60 layers x 256 experts, top-8, {args.tokens:,} logged tokens, "
              f"{path.stat().st_size / 1e9:.2f} GB on disk (made in {gen:.1f} s, not timed)")
        t0 = time.perf_counter()
        tr = Trace.load(path)
        t_load = time.perf_counter() - t0
        del tr
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        r = report(str(path), json=True)
        t_nohtml, c_nohtml = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        r = report(str(path), out=Path(tmp) / "report.html", json=True)
        t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
        load1 = os.getloadavg()[0]
        loc = r["locality"]
        print(f"load trace:                 {t_load:6.2f} s wall")
        print(f"report (JSON, no HTML):     {t_nohtml:6.2f} s wall, {c_nohtml:6.2f} s CPU")
        print(f"report end to end (HTML):   {t_full:6.2f} s wall, {c_full:6.2f} s CPU   target < 30 s -> "
              f"{'OK' if t_full < 30 else 'MISSED'}")
        print(f"machine load average (1 min) before / after: {load0:.1f} / {load1:.1f} "
              "(wall time above CPU time means the cores were shared)")
        print(f"locality on {loc['tokens_used']:,} of {loc['tokens_in_log']:,} logged tokens "
              f"({loc['documents_used']} whole documents); cache policies on "
              f"{(loc.get('cache') or {}).get('tokens_used', 0):,} tokens")
        print(f"mean fraction for 90%: {r['overall']['mean_fraction_for_90']:.3f}; SRP(16) "
              f"{loc['srp']['overall']['16']['srp']:.3f}")
        print(f"hardware: {hardware()}")
        if args.keep_trace:
            import shutil

            shutil.copy(path, "synthetic-60x256.trace")


if __name__ == "__main__":
    main()
