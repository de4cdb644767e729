"""What `--strategy auto` costs against the strategies it compares planned one by one, as the number of
routed experts grows at the same top-k.

`auto` pays for a calibration pass and, per budget, one forward over the held-out quarter of the calibration
text per distinct candidate set. Planning `calibrated` and `calibrated+allocate` one by one pays for two
calibrations, and a calibration runs every expert on every calibration token: its cost grows with the
expert count, the forwards' does not. The reference models of the selection table have 32 and 64 experts;
Qwen3-30B-A3B has 128 at top-8 and DeepSeek-V3 256. This script builds models of a reference model's shape
with `--experts` routed experts each (random weights from the transformers config: what the steps cost does
not depend on training, so no quality figure is printed), and for one workload times, in one process:

- the trace (saliency recorded), a load of the model and `moesift.calibrate`: one by one is the trace and a
  load and a calibration each for `calibrated` and `calibrated+allocate`, as in bench/selection_table.py;
- `moesift.plan(strategy="auto")` at 25/50/75% from one fit (as `sweep` plans them), after the same trace.

    OMP_NUM_THREADS=1 python bench/auto_cost.py --base qwen3moe-ref --experts 32 64 128 --top-k 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import moesift
from moesift import assets
from moesift.selection import auto as auto_mod

KEEPS = (0.25, 0.5, 0.75)


def build(base: Path, experts: int, top_k: int | None, out: Path, seed: int) -> None:
    """A model of `base`'s config with `experts` routed experts (and `top_k`), random weights, saved with
    `save_pretrained` beside `base`'s tokenizer files. The config keys are the family adapter's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moesift.arch.registry import adapter_for

    cfg = json.loads((base / "config.json").read_text())
    ad = adapter_for(cfg)
    cfg = ad.rewrite_config(cfg, {0: list(range(experts))})  # the expert count, under the family's own keys
    if top_k:
        key = next((k for k in getattr(ad, "top_k_keys", ()) if cfg.get(k) is not None), None)
        if key is None:
            raise SystemExit(f"{base}: the {cfg.get('model_type')} adapter names no top-k key in its config")
        cfg[key] = top_k
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


def run(mdir: Path, data: Path, docs: int, length: int) -> dict[str, float]:
    t0 = time.perf_counter()
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    t1 = time.perf_counter()
    tr = moesift.trace(m, data, label="t", max_samples=docs, max_length=length, saliency=True, progress=False,
                       tokenizer=tok)
    t2 = time.perf_counter()
    moesift.calibrate(mdir, data, max_samples=docs, max_length=length, progress=False, loaded=(m, tok),
                      dtype="float32", device="cpu")
    t_load, t_trace, t_cal = t1 - t0, t2 - t1, time.perf_counter() - t2
    del m
    auto_mod.forget_fits()
    t_auto, steps = 0.0, {}
    with auto_mod.keep_fits():
        for k in KEEPS:
            t = time.perf_counter()
            p = moesift.plan(tr, keep=k, strategy="auto", model=mdir, calib=str(data), calib_samples=docs,
                             calib_length=length, seed=0, device="cpu", dtype="float32", progress=False)
            t_auto += time.perf_counter() - t
            for name, v in p.provenance["auto"]["seconds"].items():
                steps[name] = v if name not in ("validate_s", "final_calibration_s") else steps.get(name, 0.0) + v
    auto_mod.forget_fits()
    return {"trace": t_trace, "load": t_load, "calibrate": t_cal, "auto": t_trace + t_auto,
            "one_by_one": t_trace + 2 * (t_load + t_cal), **{f"auto {k}": v for k, v in steps.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="qwen3moe-ref", help="a bundled reference model (its config and tokenizer)")
    ap.add_argument("--experts", type=int, nargs="+", default=[32, 64, 128], help="routed experts per layer")
    ap.add_argument("--top-k", type=int, default=8, help="experts per token (8; 0: the base model's)")
    ap.add_argument("--domain", default="code", help="the bundled workload whose trace split is the calibration text")
    ap.add_argument("--docs", type=int, default=32, help="calibration documents (32)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = ap.parse_args()
    import torch

    base = assets.reference_model(a.base)
    data = assets.workload(a.domain, "trace")
    print(f"auto against one by one: {a.base} shape, random weights, top-{a.top_k or 'base'}, {a.docs} documents of "
          f"{a.domain}, {a.max_length} tokens, float32, CPU, torch threads {torch.get_num_threads()}", flush=True)
    print("| experts | trace s | load + calibrate s | one by one s | auto s | auto / one by one | auto's steps (s) |")
    print("|---|---|---|---|---|---|---|")
    for n in a.experts:
        with tempfile.TemporaryDirectory(prefix="moesift-auto-cost-") as tmp:
            mdir = Path(tmp) / f"e{n}"
            build(base, n, a.top_k or None, mdir, a.seed)
            r = run(mdir, data, a.docs, a.max_length)
        steps = ", ".join(f"{k.removeprefix('auto ').removesuffix('_s')} {v:.1f}" for k, v in r.items()
                          if k.startswith("auto "))
        print(f"| {n} | {r['trace']:.1f} | {r['load'] + r['calibrate']:.1f} | {r['one_by_one']:.1f} | {r['auto']:.1f} "
              f"| {r['auto'] / r['one_by_one']:.2f}x | {steps} |", flush=True)


if __name__ == "__main__":
    main()
