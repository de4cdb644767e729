"""The selection table: every strategy, with and without --allocate, and `auto`, on reference models, every
domain, at 25/50/75%: perplexity ratio to the full model with paired standard errors, and cost in seconds.

For each model and domain: the domain's trace split is traced (``--trace-docs`` prompts, saliency recorded)
and calibrated once on the same prompts (``moesift.calibrate``, what `calibrated` ranks by); `auto` plans with
the same prompts as its calibration text (``moesift.plan(strategy="auto", calib=...)``: its own fit on folds
of them, never the eval split; where `calibrated` wins, the calibration of all of them from the same pass).
Every plan is scored on the same windows of the domain's eval split (``--eval-docs`` texts: their first
``--max-length`` tokens, or with ``--whole`` every window of ``--max-length`` tokens as `moesift sweep` scores
them; float32, CPU), one forward per batch of windows under ``moesift.restrict``. Per point: the perplexity
ratio to the full model, and for every strategy its gap in mean log-perplexity to the point's best strategy
with the paired standard error (the eval texts as the units, the linearised ratio estimator of
``bench/paired_gap.py``). `auto` is "within" when its gap is at most 1.96
standard errors (inside the paired 95% interval of the best) or it is the best.

Cost per model and domain (seconds, same run): trace-scored strategies the trace; `calibrated` the trace, a
load of the model and the calibration; `auto` the trace, its own fit (model load, trace of the fit folds, one calibration
pass over all the prompts with a greedy for the fit folds and one for all of them, the full model on the held-out
fold), its validations at every budget and, where `calibrated` wins, the end-to-end phase of the calibration of all
the prompts (group-limited routers). With ``--in-sample`` every plan is also
scored on the calibration prompts themselves (what the calibrated greedy saw): the gap between that and the
eval split is how much a strategy overfits its calibration tokens. With ``--replicate`` every plan is also
scored on the next ``--eval-docs`` eval texts, a second eval split of the same size: the summary says how
often `auto` is within on each, and how often the best strategy of one split (a choice that saw that split)
is within on the other.

Models: bundled names (``qwen3moe-ref``, ``deepseekv3-ref``, ``olmoe-ref``, ``qwen2moe-ref``; workloads from
``moesift/assets/workloads``) or model directories (workloads ``{domain}.trace.jsonl`` / ``{domain}.eval.jsonl``
from ``--corpus``, as docs/planning.md's table reads them for the OLMoE- and Qwen2-MoE-like models).

    OMP_NUM_THREADS=1 python bench/selection_table.py --models qwen3moe-ref deepseekv3-ref \\
        moesift/assets/models/olmoe-ref moesift/assets/models/qwen2moe-ref --corpus build/corpus --json-out table.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import moesift
from moesift import assets
from moesift.core.io import json_default
from moesift.formats.workload import batch_order, batches, encode_documents, read_documents, windows
from moesift.selection import auto as auto_mod
from moesift.selection.auto import paired_gap, window_nll

KEEPS = (0.25, 0.5, 0.75)
STRATEGIES = ["frequency", "weighted", "contribution", "calibrated", "frequency+allocate", "weighted+allocate",
              "contribution+allocate", "calibrated+allocate", "auto"]
T0 = time.perf_counter()


def say(msg: str) -> None:
    sys.stderr.write(f"[{time.perf_counter() - T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


def workload_files(model: str, domain: str, corpus: Path) -> tuple[Path, Path, Path]:
    if model in assets.MODELS:
        return assets.reference_model(model), assets.workload(domain, "trace"), assets.workload(domain, "eval")
    return Path(model), corpus / f"{domain}.trace.jsonl", corpus / f"{domain}.eval.jsonl"


def scored(m: Any, tok: Any, path: Path, n: int, length: int, skip: int = 0, whole: bool = False) -> tuple[list, Any]:
    """(batches, the document of each batch row) of documents skip..skip+n of `path`: their first `length`
    tokens, or with `whole` every window of `length` tokens (as `moesift sweep` scores them)."""
    docs = read_documents([path], max_samples=skip + n)[skip:]
    if len(docs) < n:
        raise SystemExit(f"{path} has {skip + len(docs)} documents; the table needs {skip + n}")
    wins = [(j, w) for j, ids in enumerate(encode_documents(docs, tok))
            for w in windows([ids if whole else ids[:length]], length)]
    pad = getattr(tok, "pad_token_id", None)
    ws = [w for _, w in wins]
    return (batches(ws, 8, pad_id=int(pad) if pad is not None else 0),
            np.asarray([wins[i][0] for i in batch_order(ws)], dtype=np.int64))


def point(full: np.ndarray, nll: dict[str, np.ndarray], units: np.ndarray) -> dict[str, Any]:
    """Ratios, the best strategy and every strategy's paired gap to it (the documents as units: `units` is the
    document of each window)."""
    full = np.stack([np.bincount(units, weights=full[:, c]) for c in (0, 1)], axis=1)
    nll = {s: np.bincount(units, weights=x) for s, x in nll.items()}
    T = full[:, 1]
    ratio = {s: math.exp((x.sum() - full[:, 0].sum()) / T.sum()) for s, x in nll.items()}
    best = min((s for s in nll if not s.startswith("auto")), key=lambda s: nll[s].sum())
    gaps = {s: dict(zip(("gap", "se"), paired_gap(nll[best], x, T), strict=True)) for s, x in nll.items()}
    out = {"ratio": ratio, "best": best, "gaps": gaps}
    if "auto" in nll:
        g = gaps["auto"]
        out["auto_within"] = bool(g["gap"] <= 1.96 * g["se"] + 1e-12)
    return out


def run_domain(name: str, m: Any, tok: Any, mdir: Path, tr_file: Path, ev_file: Path, st: dict[str, Any]) -> dict:
    L = st["max_length"]
    t0 = time.perf_counter()
    tr = moesift.trace(m, tr_file, label="t", max_samples=st["trace_docs"], max_length=L, saliency=True,
                       progress=False, tokenizer=tok)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = moesift.calibrate(mdir, tr_file, max_samples=st["trace_docs"], max_length=L, progress=False,
                            loaded=(m, tok), dtype="float32", device="cpu")
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()  # `plan --strategy calibrated` loads the model once, as auto's fit does
    moesift.load_model(mdir, device="cpu", dtype="float32")  # timed, then dropped
    t_load = time.perf_counter() - t0
    ev, units = scored(m, tok, ev_file, st["eval_docs"], L, whole=st["whole"])
    sets = {"eval": (ev, window_nll(m, ev), units)}
    if st["replicate"]:  # the next eval texts: a second, disjoint eval split scored the same way
        rep, units = scored(m, tok, ev_file, st["eval_docs"], L, skip=st["eval_docs"], whole=st["whole"])
        sets["replicate"] = (rep, window_nll(m, rep), units)
    if st["in_sample"]:
        ins, units = scored(m, tok, tr_file, st["trace_docs"], L)
        sets["calibration"] = (ins, window_nll(m, ins), units)
    auto_mod.forget_fits()
    res: dict[str, Any] = {"points": {}, "auto": {}, "experts": {}}
    with auto_mod.keep_fits():  # auto's fit keeps its model for every budget, as in a sweep
        points(res, tr, cal, mdir, tr_file, sets, st, m)
    auto_s = sum(x.pop("timed") for x in res["auto"].values())
    # auto: the trace (what its trace-scored candidates rank by), its own fit and its validations
    res["seconds"] = {"trace": t_trace, "calibrate": t_cal, "load": t_load, "auto_extra": auto_s,
                      "cost": {"trace-scored": t_trace, "calibrated": t_trace + t_load + t_cal,
                               "auto": t_trace + auto_s}}
    res["eval_tokens"] = int(sets["eval"][1][:, 1].sum())
    res["eval_windows"] = int(len(sets["eval"][1]))
    return res


def points(res: dict[str, Any], tr: Any, cal: Any, mdir: Path, tr_file: Path, sets: dict, st: dict[str, Any],
           m: Any) -> None:
    """Every strategy's plan at every budget, scored on every window set (into `res`)."""
    L = st["max_length"]
    for k in KEEPS:
        nll: dict[str, dict[str, np.ndarray]] = {w: {} for w in sets}
        for s in st["strategies"]:
            base, alloc = s.removesuffix("+allocate"), s.endswith("+allocate")
            t0 = time.perf_counter()
            if base == "auto":
                p = moesift.plan(tr, keep=k, strategy="auto", model=mdir, calib=str(tr_file), allocate=alloc,
                                 calib_samples=st["trace_docs"], calib_length=L, seed=st["seed"], device="cpu",
                                 auto_rounds=st["auto_rounds"],
                                 dtype="float32", progress=False)
                a = p.provenance["auto"]
                res["auto"][f"{k:g}"] = {"chosen": a["chosen"], "candidates": a["candidates"],
                                         "seconds": a["seconds"], "timed": time.perf_counter() - t0}
                # not timed: auto's own calibrated candidates (its fit calibration) scored on the eval split too,
                # so that other choice rules can be checked against the table offline
                fit_cal = auto_mod.fit_calibration()
                for fa in (False, True):
                    q = moesift.plan(tr, keep=k, strategy="calibrated", model=mdir, allocate=fa, calibration=fit_cal)
                    for w, (bl, _, _) in sets.items():
                        nll[w]["auto-fit:calibrated" + ("+allocate" if fa else "")] = window_nll(
                            m, bl, {e["layer"]: e["resident"] for e in q.layers})[:, 0]
            else:
                p = moesift.plan(tr, keep=k, strategy=base, model=mdir, allocate=alloc,
                                 calibration=cal if base == "calibrated" else None)
            res["experts"][f"{s} {k:g}"] = p.counts()
            resident = {e["layer"]: e["resident"] for e in p.layers}
            for w, (bl, _, _) in sets.items():
                nll[w][s] = window_nll(m, bl, resident)[:, 0]
        res["points"][f"{k:g}"] = {w: point(sets[w][1], nll[w], sets[w][2]) for w in sets}


def print_model(name: str, r: dict[str, Any], strategies: list[str]) -> None:
    short = {s: s.replace("contribution", "contrib").replace("calibrated", "calib").replace("frequency", "freq")
             .replace("weighted", "weight").replace("+allocate", "+a") for s in strategies}
    print(f"=== {name}: perplexity on the eval split / full model (* best non-auto; auto: chosen candidate, gap to "
          "the best in mean log-ppl +- 1.96 paired se)", flush=True)
    print("    " + "domain".ljust(11) + "keep".ljust(6) + "".join(f"{short[s]:>10}" for s in strategies)
          + "   auto chose / gap / within", flush=True)
    for d, x in r["domains"].items():
        for k in KEEPS:
            pt = x["points"][f"{k:g}"]["eval"]
            cells = [f"{pt['ratio'][s]:.3f}" + ("*" if s == pt["best"] else " ") for s in strategies]
            tail = ""
            if "auto" in pt["ratio"]:
                g = pt["gaps"]["auto"]
                tail = (f"   {x['auto'][f'{k:g}']['chosen']} / {g['gap']:+.4f} +- {1.96 * g['se']:.4f} / "
                        f"{'yes' if pt['auto_within'] else 'NO'}")
            print("    " + d.ljust(11) + f"{k:<6g}" + "".join(f"{c:>10}" for c in cells) + tail, flush=True)
        c = x["seconds"]["cost"]
        print(f"    {'':11}cost s: trace-scored {c['trace-scored']:.1f}, calibrated {c['calibrated']:.1f}, auto "
              f"{c['auto']:.1f}; {x['eval_windows']} eval windows, {x['eval_tokens']} tokens", flush=True)
        if "replicate" in x["points"]["0.25"]:
            for k in KEEPS:
                pt = x["points"][f"{k:g}"]["replicate"]
                print("    " + "(replicate)".ljust(11) + f"{k:<6g}" + "".join(
                    f"{pt['ratio'][s]:.3f}{'*' if s == pt['best'] else ' '}".rjust(10) for s in strategies)
                    + (f"   auto within: {'yes' if pt['auto_within'] else 'NO'}" if "auto_within" in pt else ""),
                    flush=True)
        if "calibration" in x["points"]["0.25"]:
            for k in KEEPS:
                pt = x["points"][f"{k:g}"]["calibration"]
                print("    " + "(in-sample)".ljust(11) + f"{k:<6g}" + "".join(
                    f"{pt['ratio'][s]:.3f}{'*' if s == pt['best'] else ' '}".rjust(10) for s in strategies), flush=True)


def replicate_summary(pts: list[dict[str, Any]]) -> None:
    """How reproducible "within the paired 95% interval of the best" is: auto on each eval split, and the best
    strategy of one split (an oracle that saw that split) judged on the other."""
    def within(pt: dict[str, Any], s: str) -> bool:
        g = pt["gaps"][s]
        return bool(g["gap"] <= 1.96 * g["se"] + 1e-12)

    n = len(pts)
    auto = [sum(within(pt[w], "auto") for pt in pts) for w in ("eval", "replicate")]
    cross = [sum(within(pt[b], pt[a]["best"]) for pt in pts) for a, b in (("eval", "replicate"), ("replicate", "eval"))]
    print(f"replicate: auto within at {auto[0]} of {n} points on the eval split, {auto[1]} on the replicate split; "
          f"the best of the eval split within on the replicate at {cross[0]}, the best of the replicate within on the "
          f"eval split at {cross[1]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(assets.MODELS))
    ap.add_argument("--domains", nargs="+", default=list(assets.DOMAINS))
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"),
                    help="workloads of models given as directories: {domain}.trace.jsonl, {domain}.eval.jsonl")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--trace-docs", type=int, default=32, help="trace = calibration prompts per domain (32)")
    ap.add_argument("--eval-docs", type=int, default=12, help="eval texts per domain (12)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="auto's fold seed")
    ap.add_argument("--auto-rounds", type=int, default=1, help="auto's rounds (folds held out in turn; 1)")
    ap.add_argument("--in-sample", action="store_true", help="also score every plan on the calibration prompts")
    ap.add_argument("--whole", action="store_true",
                    help="score the eval texts whole, in windows of --max-length tokens, as `moesift sweep` does "
                         "(default: the first --max-length tokens of each)")
    ap.add_argument("--replicate", action="store_true",
                    help="also score every plan on the next --eval-docs eval texts (a second eval split): how often "
                         "the best of one split is within the paired 95%% interval of the best on the other")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    import torch

    st = {"trace_docs": a.trace_docs, "eval_docs": a.eval_docs, "max_length": a.max_length, "seed": a.seed,
          "auto_rounds": a.auto_rounds, "in_sample": a.in_sample, "replicate": a.replicate, "whole": a.whole,
          "strategies": a.strategies.split(",")}
    print(f"selection table: {st['trace_docs']} trace = calibration prompts, {st['eval_docs']} eval texts "
          f"({'whole, in windows of' if a.whole else 'the first'} {st['max_length']} tokens), float32, CPU, torch "
          f"threads {torch.get_num_threads()}", flush=True)
    result: dict[str, Any] = {"settings": st, "models": {}}
    for name in a.models:
        mdir = workload_files(name, a.domains[0], a.corpus)[0]
        m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
        r: dict[str, Any] = {"domains": {}}
        for d in a.domains:
            _, tr_file, ev_file = workload_files(name, d, a.corpus)
            t0 = time.perf_counter()
            r["domains"][d] = run_domain(name, m, tok, mdir, tr_file, ev_file, st)
            say(f"{name} {d}: {time.perf_counter() - t0:.0f} s")
            result["models"][Path(name).name] = r
            print_model(Path(name).name, {"domains": {d: r["domains"][d]}}, st["strategies"])
            if a.json_out:  # every finished domain, in case the run is cut short
                a.json_out.write_text(json.dumps(result, indent=1, default=json_default) + "\n")
        del m
    within = [pt["eval"]["auto_within"] for r in result["models"].values() for x in r["domains"].values()
              for pt in x["points"].values() if "auto_within" in pt["eval"]]
    if st["replicate"]:
        replicate_summary([pt for r in result["models"].values() for x in r["domains"].values()
                           for pt in x["points"].values()])
    if within:
        print(f"auto within the paired 95% interval of the best (or best) at {sum(within)} of {len(within)} points",
              flush=True)
        cost = [x["seconds"] for r in result["models"].values() for x in r["domains"].values()]
        t_auto = sum(c["cost"]["auto"] for c in cost)
        t_cal = sum(c["cost"]["calibrated"] for c in cost)
        t_all = sum(c["cost"]["calibrated"] + c["load"] + c["calibrate"] for c in cost)
        print(f"cost over the table: auto {t_auto:.0f} s; calibrated {t_cal:.0f} s (auto {t_auto / t_cal:.2f}x); the "
              f"strategies auto compares, each planned on its own (the trace, and a load and a calibration each for "
              f"calibrated and calibrated+allocate) {t_all:.0f} s (auto {t_auto / t_all:.2f}x)", flush=True)
    result["seconds"] = time.perf_counter() - T0
    print(f"total wall time {result['seconds']:.0f} s", flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=1, default=json_default) + "\n")


if __name__ == "__main__":
    main()
