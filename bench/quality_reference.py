"""Quality figures of expert selection on the two bundled reference MoE models, reproducibly.

For each model in ``moesift.assets.MODELS`` (qwen3moe-ref: softmax routing, no shared expert;
deepseekv3-ref: shared expert, sigmoid routing with a selection bias, group-limited), using only moesift's
public API (``moesift.trace``, ``moesift.compare``, ``moesift.plan``, ``moesift.select_top``,
``moesift.coverage_of``, ``moesift.sweep``, ``moesift.eval_model``) the way ``moesift demo`` calls it:

1. Workload conditioning. Every domain's ``trace`` split is traced (saliency recorded too), and every
   domain's ``eval`` split is traced the same way. At keep 50% per MoE layer (the most-selected half of the
   experts of each layer, ties to the lower id), the coverage of the row
   workload's resident set on the column workload's routes, mean over MoE layers:
   - in-sample: set and routes from the trace split;
   - held-out: set from the row's trace split, routes from the column's eval split (disjoint texts).
   Self = diagonal mean, cross = off-diagonal mean. The planner's own sets (``moesift.plan`` keep 0.5,
   frequency) are measured the same way; they differ from the top-half sets where the planner must keep
   whole expert groups (group-limited routing), and then are printed too (``moesift.compare`` measures the
   planner's sets; checked here), with the planner's predictions
   (in-sample coverage, held-out coverage over 8 folds of the trace) beside the coverage measured on the
   eval split.
2. Sweep. For each domain: ``moesift.sweep`` (timing disabled) from the domain's trace split, keep 0.25 /
   0.5 / 0.75 x strategies frequency / weighted / saliency / random (seed 0), perplexity on the domain's
   eval split as a ratio to the full model. Every (strategy, keep) plan is built first with ``moesift.plan``:
   budgets the planner refuses are listed with its message and left out of the sweep; budgets it raises
   (whole groups for group-limited routing) are marked with the experts it actually kept per layer.
3. Random resident sets at 50%: ``moesift.plan`` strategy random, seeds 0..9, from the code trace split;
   perplexity ratio on the code eval split (``moesift.eval_model``, one call, all plans): mean, min, max.
4. Fewer experts: ``moesift.eval_model`` on the code eval split with top-k = the model's top-k, then halved
   down to 1, and dynamic top-p 0.5 and 0.9, with the mean number of routed experts active per token.

5. ``--selection`` (this section alone): the selection strategies side by side. For each model and domain,
   ``moesift.sweep`` (timing off) from the domain's trace split (traced with saliency) at keep 0.25 / 0.5 /
   0.75: frequency, weighted, contribution, saliency, random (seed 0), calibrated (uniform counts) and
   calibrated+allocate (one total spread over layers by calibrated error; for group-limited routers the
   sets, the group layout (whole groups or the same count in every group: ``moesift plan --groups``, auto
   unless ``--groups``) and the spending are chosen by the model's end-to-end KL on the calibration
   prompts). Calibration prompts are the
   domain's trace split (``--calib-docs`` documents of ``--max-length`` tokens); the eval split, disjoint
   from both, is scored. Prints the perplexity-ratio table, the winner per budget, and the target check:
   calibrated+allocate at or below min(frequency, weighted) at every point, and at keep 0.25 how much
   closer to 1.0 than that minimum it is on average over domains. The README's tables: one process per
   model, about 12 minutes each on a loaded 2-core machine:
   ``OMP_NUM_THREADS=1 python bench/quality_reference.py --selection --models qwen3moe-ref --strategies
   frequency,weighted,contribution,saliency,random,calibrated,calibrated+allocate --trace-docs 64
   --eval-docs 16 --calib-docs 64`` (and the same with ``--models deepseekv3-ref``).

Perplexity is moesift's: token-weighted over windows of ``--max-length`` tokens (documents longer than that
are cut into consecutive windows); routing restricted to the plan's resident experts computes what the
trimmed checkpoint computes. Traces truncate each document to ``--max-length`` tokens. Everything runs in
float32 on the CPU, deterministically (no sampling; random plans are seeded).

    OMP_NUM_THREADS=2 python bench/quality_reference.py [--json-out FILE] [--quick]
        [--trace-docs N] [--eval-docs N] [--max-length N] [--seeds N]

Defaults: every bundled document (96 trace prompts and 32 eval texts per domain), 256 tokens.
``moesift demo`` traces 64 prompts and scores 16 eval texts: ``--trace-docs 64 --eval-docs 16`` reproduces
its settings. ``--quick`` (8 prompts, 2 texts, 64 tokens) is a smoke check, its figures mean nothing.
About 2 minutes on an idle 2-core machine (10 minutes while other work shared its cores); the figures
do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from hostinfo import cpu_name, usable_cores  # bench/hostinfo.py, beside this script

import moesift
from moesift import assets
from moesift.core.io import json_default

KEEPS = (0.25, 0.5, 0.75)
STRATEGIES = ("frequency", "weighted", "saliency", "random")
CONDITIONING_KEEP = 0.5
TOP_P = (0.5, 0.9)
T0 = time.perf_counter()


def say(msg: str) -> None:
    sys.stderr.write(f"[{time.perf_counter() - T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


def out(line: str = "") -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch
    import transformers

    cpu, usable = cpu_name(), usable_cores()
    commit = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "moesift": moesift.__version__, "git_commit": commit,
    }


# ------------------------------------------------------------------------------------------------
# 1. Workload conditioning
# ------------------------------------------------------------------------------------------------


def coverage_matrix(sets: list[list[Any]], counts: list[np.ndarray]) -> np.ndarray:
    """[row, col]: mean over MoE layers of the share of col's routes that land on row's resident set."""
    W, L = len(sets), len(sets[0])
    m = np.zeros((W, W))
    for a in range(W):
        for b in range(W):
            vals = [moesift.coverage_of(counts[b][i], sets[a][i]) for i in range(L)]
            m[a, b] = float(np.nanmean(vals))
    return m


def self_cross(m: np.ndarray) -> tuple[float, float]:
    n = m.shape[0]
    off = [m[i, j] for i in range(n) for j in range(n) if i != j]
    return float(np.mean(np.diag(m))), float(np.mean(off))


def conditioning(name: str, mdir: Path, trace_tr: dict[str, Any], eval_tr: dict[str, Any]) -> dict[str, Any]:
    doms = list(assets.DOMAINS)
    L, E = trace_tr[doms[0]].counts.shape
    n = max(1, min(E, int(round(CONDITIONING_KEEP * E))))
    tcounts = [trace_tr[d].counts for d in doms]
    ecounts = [eval_tr[d].counts for d in doms]
    # top half by selection count (routing concentration; not servable where groups must stay whole)
    top_sets = [[moesift.select_top(c[i], n) for i in range(L)] for c in tcounts]
    ins = coverage_matrix(top_sets, tcounts)
    held = coverage_matrix(top_sets, ecounts)
    # the planner's sets (servable: whole groups for group-limited routing)
    plans = {d: moesift.plan(trace_tr[d], keep=CONDITIONING_KEEP, model=mdir) for d in doms}
    plan_sets = [[np.asarray(e["resident"], dtype=np.int64) for e in plans[d].layers] for d in doms]
    same = all(np.array_equal(a, b) for ps, ts in zip(plan_sets, top_sets, strict=True)
               for a, b in zip(ps, ts, strict=True))
    p_ins = coverage_matrix(plan_sets, tcounts)
    p_held = coverage_matrix(plan_sets, ecounts)
    # moesift.compare measures the sets moesift.plan would serve
    cmp_ = moesift.compare([trace_tr[d] for d in doms], keep=CONDITIONING_KEEP, json=True)
    cmp_matrix = np.asarray(cmp_["cross_coverage"], dtype=np.float64)
    if not np.allclose(cmp_matrix, p_ins, atol=1e-12):
        raise SystemExit(f"{name}: moesift.compare disagrees with the recomputed in-sample coverage")
    res: dict[str, Any] = {
        "workloads": doms, "keep": CONDITIONING_KEEP, "experts_per_layer": n, "n_experts": E, "moe_layers": L,
        "top_half": {"in_sample": ins, "heldout": held},
        "plan_sets_equal_top_half": same,
        "plan_sets": {"in_sample": p_ins, "heldout": p_held,
                      "experts_per_layer": {d: plans[d].counts() for d in doms},
                      "predicted": {d: {"coverage": plans[d].predictions.get("coverage"),
                                        "heldout_coverage_folds": plans[d].predictions.get("heldout_coverage")}
                                    for d in doms}},
        "eval_trace_tokens": {d: int(eval_tr[d].workload.get("prefill_tokens", 0)) for d in doms},
        "trace_tokens": {d: int(trace_tr[d].workload.get("prefill_tokens", 0)) for d in doms},
    }
    for key in ("top_half", "plan_sets"):
        for kind in ("in_sample", "heldout"):
            s, c = self_cross(res[key][kind])
            res[key][f"{kind}_self"] = s
            res[key][f"{kind}_cross"] = c
    return res


def print_matrix(title: str, doms: list[str], m: np.ndarray) -> None:
    out(f"  {title}")
    out("    " + "resident set of \\ routes of".ljust(28) + "".join(f"{d:>12}" for d in doms))
    for i, d in enumerate(doms):
        out("    " + d.ljust(28) + "".join(f"{m[i, j]:12.3f}" for j in range(len(doms))))
    s, c = self_cross(m)
    out(f"    self (diagonal) mean {s:.3f}   cross (off-diagonal) mean {c:.3f}   self - cross {s - c:+.3f}")


def print_conditioning(c: dict[str, Any]) -> None:
    doms = c["workloads"]
    out(f"[1] workload conditioning: keep {c['keep']:g} = {c['experts_per_layer']} of {c['n_experts']} experts "
        f"in each of {c['moe_layers']} MoE layers, most selected on the row's trace split; coverage = share of "
        "the column's routes on the set, mean over MoE layers")
    out("    trace-split tokens traced: " + ", ".join(f"{d} {c['trace_tokens'][d]}" for d in doms)
        + "; eval-split tokens traced: " + ", ".join(f"{d} {c['eval_trace_tokens'][d]}" for d in doms))
    th = c["top_half"]
    print_matrix("in-sample (column routes from its trace split)", doms, th["in_sample"])
    print_matrix("held-out (column routes from its eval split)", doms, th["heldout"])
    ps = c["plan_sets"]
    if c["plan_sets_equal_top_half"]:
        out("  the planner's sets (moesift.plan keep 0.5, frequency; = moesift.compare) are the same sets: same figures")
    else:
        out("  the planner's sets (moesift.plan keep 0.5, frequency) differ from the top half; experts per layer: "
            + "; ".join(f"{d} {ps['experts_per_layer'][d]}" for d in doms))
        print_matrix("planner sets, in-sample (= moesift.compare)", doms, ps["in_sample"])
        print_matrix("planner sets, held-out (eval split)", doms, ps["heldout"])
    out("  own workload, planner sets: predicted by moesift.plan (in-sample; held-out over 8 folds of the trace) "
        "vs measured on the eval split")
    for i, d in enumerate(doms):
        pr = ps["predicted"][d]
        hf = pr["heldout_coverage_folds"]
        out(f"    {d:<12} predicted in-sample {pr['coverage']:.3f}  predicted held-out "
            f"{'n/a' if hf is None else f'{hf:.3f}'}  measured in-sample {ps['in_sample'][i, i]:.3f}  "
            f"measured on eval split {ps['heldout'][i, i]:.3f}")


# ------------------------------------------------------------------------------------------------
# 2. Sweep
# ------------------------------------------------------------------------------------------------


def sweep_domain(mdir: Path, tr: Any, data: Path, st: dict[str, Any]) -> dict[str, Any]:
    refused: list[dict[str, Any]] = []
    feasible: dict[str, list[float]] = {}
    planned: dict[tuple[str, float], list[int]] = {}
    for s in STRATEGIES:
        for k in KEEPS:
            try:
                p = moesift.plan(tr, keep=k, strategy=s, model=mdir, seed=0)
            except moesift.MoesiftError as e:
                refused.append({"strategy": s, "keep": k, "reason": str(e)})
                continue
            feasible.setdefault(s, []).append(k)
            planned[(s, k)] = p.counts()
    groups: dict[tuple[float, ...], list[str]] = {}
    for s, ks in feasible.items():
        groups.setdefault(tuple(ks), []).append(s)
    points: list[dict[str, Any]] = []
    full = None
    skipped: list[dict[str, str]] = []
    for ks, ss in groups.items():
        sw = moesift.sweep(mdir, tr, data, keep=list(ks), strategy=ss, json=True, timing=False, dtype="float32",
                           max_length=st["max_length"], max_samples=st["eval_docs"], seed=0, progress=False)
        skipped += sw.get("skipped", [])
        for p in sw["points"]:
            if p["strategy"] == "full":
                if full is not None and not math.isclose(full["ppl"], p["ppl"], rel_tol=1e-9):
                    raise SystemExit("the full model's perplexity differs between sweep calls")
                full = {k: p[k] for k in ("ppl", "bytes")}
                full["tokens"] = sw["tokens"]
                full["windows"] = sw["windows"]
                continue
            per_layer = [len(e["resident"]) for e in p["plan"]["layers"]]
            q = {k: p.get(k) for k in ("strategy", "keep", "bytes", "bytes_fraction", "ppl", "ppl_ratio", "coverage",
                                       "heldout_coverage", "experts_resident", "pareto_quality", "budget_note")}
            q["experts_per_layer"] = per_layer
            q["experts_requested_per_layer"] = max(1, int(round(p["keep"] * tr.n_experts)))
            points.append(q)
    return {"full": full, "points": points, "refused": refused, "skipped": skipped, "planned": {
        f"{s} {k:g}": v for (s, k), v in planned.items()}}


def print_sweep(name: str, sw: dict[str, Any], E: int) -> None:
    out("[2] sweep: perplexity on the domain's eval split / full model; plans from the domain's trace split "
        "(moesift.sweep, timing off, random seed 0); [n] = experts kept per MoE layer where it is not the "
        "requested keep x experts")
    head = "    " + "domain".ljust(12) + "full ppl".rjust(10) + "  " + "strategy".ljust(11) + "".join(
        f"{'keep ' + format(k, 'g'):>16}" for k in KEEPS)
    out(head)
    for d, r in sw.items():
        first = True
        for s in STRATEGIES:
            cells = []
            for k in KEEPS:
                p = next((p for p in r["points"] if p["strategy"] == s and p["keep"] == k), None)
                if p is None:
                    ref = next((x for x in r["refused"] if x["strategy"] == s and x["keep"] == k), None)
                    cells.append("refused" if ref else "skipped")
                    continue
                want = max(1, int(round(k * E)))
                got = sorted(set(p["experts_per_layer"]))
                mark = "" if got == [want] else "[" + "/".join(str(g) for g in got) + "]"
                cells.append(f"{p['ppl_ratio']:.3f}{mark}")
            lead = (d.ljust(12) + f"{r['full']['ppl']:10.2f}") if first else " " * 22
            out("    " + lead + "  " + s.ljust(11) + "".join(f"{c:>16}" for c in cells))
            first = False
    for d, r in sw.items():
        for x in r["refused"]:
            out(f"    refused: {d} {x['strategy']} keep {x['keep']:g}: {x['reason']}")
        for x in r["skipped"]:
            out(f"    skipped by sweep: {d} {x['strategy']}: {x['reason']}")
    for note in sorted({p["budget_note"] for r in sw.values() for p in r["points"] if p.get("budget_note")}):
        out(f"    {name}: {note}")  # the planner's own account of a raised budget


# ------------------------------------------------------------------------------------------------
# 3. Random resident sets, 4. fewer experts
# ------------------------------------------------------------------------------------------------


def random_sets(m: Any, tok: Any, mdir: Path, tr: Any, data: Path, st: dict[str, Any]) -> dict[str, Any]:
    plans = [moesift.plan(tr, keep=CONDITIONING_KEEP, strategy="random", seed=s, model=mdir) for s in range(st["seeds"])]
    freq = moesift.plan(tr, keep=CONDITIONING_KEEP, strategy="frequency", model=mdir)
    ev = moesift.eval_model(m, data, plans=[*plans, freq], max_length=st["max_length"], max_samples=st["eval_docs"],
                            tokenizer=tok, progress=False, json=True)
    res = ev["results"]
    ratios = [r["ppl_ratio"] for r in res[1:-1]]
    return {"seeds": list(range(st["seeds"])), "ratios": ratios, "mean": statistics.fmean(ratios),
            "geomean": math.exp(statistics.fmean(math.log(x) for x in ratios)), "min": min(ratios), "max": max(ratios),
            "stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "coverage": [p.predictions.get("coverage") for p in plans],
            "experts_per_layer": [p.counts() for p in plans],
            "frequency_ratio": res[-1]["ppl_ratio"], "full_ppl": res[0]["ppl"], "tokens": ev["tokens"]}


def print_random(r: dict[str, Any]) -> None:
    out(f"[3] random resident sets at keep {CONDITIONING_KEEP:g} (moesift.plan strategy random, seeds "
        f"0..{len(r['seeds']) - 1}, from the code trace split), perplexity on the code eval split / full model "
        f"(full ppl {r['full_ppl']:.2f}, {r['tokens']} tokens)")
    out(f"    mean x{r['mean']:.3f}  (geometric mean x{r['geomean']:.3f}, sd {r['stdev']:.3f})  min x{r['min']:.3f}  "
        f"max x{r['max']:.3f};  frequency plan at the same budget x{r['frequency_ratio']:.3f}")
    out("    per seed: " + ", ".join(f"{s}: {x:.3f}" for s, x in zip(r["seeds"], r["ratios"], strict=True)))
    out("    in-sample coverage per seed: " + ", ".join(f"{c:.3f}" for c in r["coverage"]))


def fewer_experts(m: Any, tok: Any, top_k: int, data: Path, st: dict[str, Any]) -> dict[str, Any]:
    ks, k = [], top_k
    while k >= 1:
        ks.append(k)
        k //= 2
    ev = moesift.eval_model(m, data, top_k=ks, top_p=TOP_P, max_length=st["max_length"], max_samples=st["eval_docs"],
                            tokenizer=tok, progress=False, json=True)
    rows = [{k2: r.get(k2) for k2 in ("name", "kind", "k", "p", "ppl", "ppl_ratio", "mean_active")} for r in ev["results"]]
    return {"top_k": ks, "top_p": list(TOP_P), "tokens": ev["tokens"], "windows": ev["windows"], "results": rows}


def print_fewer(r: dict[str, Any]) -> None:
    out(f"[4] fewer experts per token (moesift.eval_model) on the code eval split ({r['tokens']} tokens)")
    out("    " + "setting".ljust(12) + "ppl".rjust(10) + "x full".rjust(10) + "routed experts active / token".rjust(32))
    for x in r["results"]:
        act = x["mean_active"]
        out("    " + x["name"].ljust(12) + f"{x['ppl']:10.3f}" + f"{x['ppl_ratio']:10.3f}"
            + ("" if act is None else f"{act:32.2f}"))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run_model(name: str, st: dict[str, Any]) -> dict[str, Any]:
    mdir = assets.reference_model(name)
    t_model = time.perf_counter()
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    spec = moesift.adapter_for(m.config).spec(m.config)
    info = {"model_type": spec.model_type, "moe_layers": list(spec.moe_layers), "n_experts": spec.n_experts,
            "top_k": spec.top_k, "n_shared": spec.n_shared, "scoring": spec.scoring, "n_group": spec.n_group,
            "topk_group": spec.topk_group}
    trace_tr, eval_tr = {}, {}
    for d in assets.DOMAINS:
        trace_tr[d] = moesift.trace(m, assets.workload(d, "trace"), label=d, max_samples=st["trace_docs"],
                                    max_length=st["max_length"], saliency=True, progress=False, tokenizer=tok)
        eval_tr[d] = moesift.trace(m, assets.workload(d, "eval"), label=f"{d}-eval", max_samples=st["eval_docs"],
                                   max_length=st["max_length"], progress=False, tokenizer=tok)
    say(f"{name}: traced the trace and eval splits of {len(assets.DOMAINS)} domains")
    res: dict[str, Any] = {"model": info}
    res["conditioning"] = conditioning(name, mdir, trace_tr, eval_tr)
    say(f"{name}: coverage matrices")
    res["sweep"] = {d: sweep_domain(mdir, trace_tr[d], assets.workload(d, "eval"), st) for d in assets.DOMAINS}
    say(f"{name}: swept 4 domains")
    code_eval = assets.workload("code", "eval")
    res["random"] = random_sets(m, tok, mdir, trace_tr["code"], code_eval, st)
    say(f"{name}: random resident sets")
    res["fewer_experts"] = fewer_experts(m, tok, spec.top_k, code_eval, st)
    say(f"{name}: top-k / top-p")
    res["seconds"] = time.perf_counter() - t_model
    return res


def print_model(name: str, r: dict[str, Any]) -> None:
    i = r["model"]
    out()
    out(f"=== {name}: {i['model_type']}, {len(i['moe_layers'])} MoE layers {i['moe_layers']} x {i['n_experts']} experts, "
        f"top-{i['top_k']}, {i['n_shared']} shared, {i['scoring']} router"
        + (f", {i['n_group']} groups, top {i['topk_group']} groups per token" if i["n_group"] else "")
        + f" ({r['seconds']:.1f} s)")
    print_conditioning(r["conditioning"])
    print_sweep(name, r["sweep"], i["n_experts"])
    print_random(r["random"])
    print_fewer(r["fewer_experts"])


SEL_STRATEGIES = ["frequency", "weighted", "contribution", "saliency", "random", "calibrated", "calibrated+allocate"]


def selection(name: str, st: dict[str, Any]) -> dict[str, Any]:
    mdir = assets.reference_model(name)
    m, tok = moesift.load_model(mdir, device="cpu", dtype="float32")
    res: dict[str, Any] = {"domains": {}}
    for d in assets.DOMAINS:
        t0 = time.perf_counter()
        tr = moesift.trace(m, assets.workload(d, "trace"), label=d, max_samples=st["trace_docs"],
                           max_length=st["max_length"], saliency=True, progress=False, tokenizer=tok)
        cal = moesift.calibrate(mdir, assets.workload(d, "trace"), max_samples=st["calib_docs"],
                                max_length=st["max_length"], progress=False, loaded=(m, tok))
        sw = moesift.sweep(mdir, tr, assets.workload(d, "eval"), keep=list(KEEPS), strategy=list(SEL_STRATEGIES),
                           calibration=cal, json=True, timing=False, dtype="float32", max_length=st["max_length"],
                           max_samples=st["eval_docs"], seed=0, progress=False, groups=st.get("groups", "auto"))
        pts = {(p["strategy"], p["keep"]): p for p in sw["points"] if p["strategy"] != "full"}
        res["domains"][d] = {
            "ratios": {f"{s} {k:g}": pts[(s, k)]["ppl_ratio"] for (s, k) in pts},
            "experts_per_layer": {f"{s} {k:g}": [len(e["resident"]) for e in pts[(s, k)]["plan"]["layers"]]
                                  for (s, k) in pts},
            "groups": {f"{s} {k:g}": pts[(s, k)].get("groups") for (s, k) in pts},
            "winners": sw["winners"], "skipped": sw["skipped"], "tokens": sw["tokens"],
            "calibration_s": cal.timing["total_s"], "calibration_layer_s": cal.timing["per_layer_s"],
            "calibration_tokens": cal.settings["tokens"], "calibration_end_to_end_s": cal.timing.get("end_to_end_s"),
            "seconds": time.perf_counter() - t0}
        say(f"{name}: {d} done ({time.perf_counter() - t0:.0f} s)")
    # target: calibrated+allocate vs the best of frequency and weighted
    below, closer = True, []
    for r in res["domains"].values():
        for k in KEEPS:
            best = min(r["ratios"][f"frequency {k:g}"], r["ratios"][f"weighted {k:g}"])
            cal = r["ratios"][f"calibrated+allocate {k:g}"]
            below = below and cal <= best + 1e-12
            if k == KEEPS[0]:
                closer.append((best - cal) / (best - 1.0) if best > 1.0 else 0.0)
    res["target"] = {"at_or_below_everywhere": below, "closer_at_25_mean": float(np.mean(closer)),
                     "closer_at_25": dict(zip(res["domains"], closer, strict=True))}
    return res


def print_selection(name: str, r: dict[str, Any]) -> None:
    out(f"=== {name}: perplexity on the eval split / full model; plans from the trace split (calibration on the "
        "trace split too); [n/m] = experts per MoE layer when not uniform")
    out("    " + "domain".ljust(12) + "strategy".ljust(22) + "".join(f"{'keep ' + format(k, 'g'):>22}" for k in KEEPS))
    for d, x in r["domains"].items():
        for i, s in enumerate(SEL_STRATEGIES):
            cells = []
            for k in KEEPS:
                key = f"{s} {k:g}"
                if key not in x["ratios"]:
                    cells.append("skipped")
                    continue
                n = x["experts_per_layer"][key]
                cells.append(f"{x['ratios'][key]:.3f}" + ("" if len(set(n)) == 1 else "[" + "/".join(map(str, n)) + "]"))
            out("    " + (d if i == 0 else "").ljust(12) + s.ljust(22) + "".join(f"{c:>22}" for c in cells))
        out("    " + " " * 12 + "winner: " + ", ".join(f"{w['keep']:g} {w['strategy']}" for w in x["winners"])
            + f"; calibration {x['calibration_s']:.1f} s on {x['calibration_tokens']} tokens "
            f"({np.mean(x['calibration_layer_s']):.2f} s per MoE layer"
            + (f", of which end-to-end choice {x['calibration_end_to_end_s'] / len(x['calibration_layer_s']):.2f} s)"
               if x.get("calibration_end_to_end_s") else ")"))
    t = r["target"]
    out(f"  target: calibrated+allocate <= min(frequency, weighted) at every point: {t['at_or_below_everywhere']}; "
        f"at keep 0.25 closer to 1.0 by {t['closer_at_25_mean']:.1%} on average ("
        + ", ".join(f"{d} {v:.1%}" for d, v in t["closer_at_25"].items()) + ")")


def main_selection(a: argparse.Namespace) -> None:
    st = {"trace_docs": a.trace_docs, "eval_docs": a.eval_docs, "max_length": a.max_length or 256,
          "calib_docs": a.calib_docs, "groups": a.groups}
    if a.quick:
        st.update(trace_docs=8, eval_docs=2, max_length=64, calib_docs=8)
    env = environment()
    out(f"moesift selection strategies on the bundled reference models{' (--quick)' if a.quick else ''}")
    out(f"hardware: {env['cpu']}, {env['cpu_count']} CPUs ({env['cpus_usable']} usable), torch threads "
        f"{env['torch_threads']}; moesift {env['moesift']} (git {env['git_commit']})")
    out(f"settings: trace prompts per domain {st['trace_docs'] or 'all'}, calibration prompts {st['calib_docs']} "
        f"(trace split), eval texts {st['eval_docs'] or 'all'}, {st['max_length']} tokens, float32, CPU"
        + ("" if st["groups"] == "auto" else f", --groups {st['groups']}"))
    result: dict[str, Any] = {"schema": "moesift-bench-selection/1", "environment": env, "settings": st, "models": {}}
    for name in a.models:
        result["models"][name] = selection(name, st)
        print_selection(name, result["models"][name])
    result["seconds"] = time.perf_counter() - T0
    out(f"total wall time {result['seconds']:.1f} s")
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(result, indent=1, default=json_default) + "\n")
        out(f"wrote {a.json_out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", type=Path, help="write every figure to this JSON file")
    ap.add_argument("--quick", action="store_true", help="8 prompts, 2 eval texts, 64 tokens: a smoke check")
    ap.add_argument("--trace-docs", type=int, default=None, help="prompts traced per domain (default: all, 96)")
    ap.add_argument("--eval-docs", type=int, default=None, help="eval texts per domain (default: all, 32)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per traced document / eval window (256)")
    ap.add_argument("--seeds", type=int, default=10, help="random resident sets in section 3 (10)")
    ap.add_argument("--models", nargs="+", default=list(assets.MODELS), choices=list(assets.MODELS))
    ap.add_argument("--selection", action="store_true", help="only section 5: selection strategies side by side")
    ap.add_argument("--calib-docs", type=int, default=32, help="calibration prompts per domain in --selection (32)")
    ap.add_argument("--groups", default="auto", choices=["auto", "whole", "equal"],
                    help="how group-limited routers keep experts in --selection (moesift plan --groups; auto)")
    ap.add_argument("--strategies", default=",".join(SEL_STRATEGIES), help="strategies compared in --selection")
    a = ap.parse_args()
    if a.selection:
        SEL_STRATEGIES[:] = a.strategies.split(",")
        main_selection(a)
        return
    st = {"trace_docs": 8, "eval_docs": 2, "max_length": 64} if a.quick else \
        {"trace_docs": None, "eval_docs": None, "max_length": 256}
    for k in ("trace_docs", "eval_docs", "max_length"):
        if getattr(a, k) is not None:
            st[k] = getattr(a, k)
    st["seeds"] = a.seeds
    st["quick"] = a.quick
    env = environment()
    out(f"moesift quality on the bundled reference models{' (--quick: smoke check, figures mean nothing)' if a.quick else ''}")
    out(f"hardware: {env['cpu']}, {env['cpu_count']} CPUs ({env['cpus_usable']} usable), torch threads "
        f"{env['torch_threads']}, OMP_NUM_THREADS={env['omp_num_threads']}")
    out(f"versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, numpy "
        f"{env['numpy']}, moesift {env['moesift']} (git {env['git_commit']})")
    out(f"settings: trace prompts per domain {st['trace_docs'] or 'all'}, eval texts per domain "
        f"{st['eval_docs'] or 'all'}, {st['max_length']} tokens per traced document / eval window, float32, CPU")
    result: dict[str, Any] = {"schema": "moesift-bench-quality-reference/1", "environment": env, "settings": st,
                              "domains": list(assets.DOMAINS), "models": {}}
    for name in a.models:
        r = run_model(name, st)
        result["models"][name] = r
        print_model(name, r)
    out()
    summary = []
    for name, r in result["models"].items():
        c = r["conditioning"]["top_half"]
        code = r["sweep"]["code"]
        fr = {p["strategy"] + format(p["keep"], "g"): p["ppl_ratio"] for p in code["points"]}

        def g(key: str, fr: dict[str, float] = fr) -> str:
            return f"{fr[key]:.3f}" if key in fr else "n/a"

        summary.append(f"  {name}: coverage at 50% self {c['in_sample_self']:.3f} vs cross {c['in_sample_cross']:.3f} "
                       f"in-sample, {c['heldout_self']:.3f} vs {c['heldout_cross']:.3f} held-out; code ppl x full at "
                       f"25/50/75%: frequency {'/'.join(g('frequency' + format(k, 'g')) for k in KEEPS)}, random "
                       f"{'/'.join(g('random' + format(k, 'g')) for k in KEEPS)}; random 50% over "
                       f"{len(r['random']['seeds'])} seeds x{r['random']['mean']:.3f} "
                       f"({r['random']['min']:.3f}-{r['random']['max']:.3f})")
    out("summary")
    for s in summary:
        out(s)
    result["seconds"] = time.perf_counter() - T0
    out(f"total wall time {result['seconds']:.1f} s")
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(result, indent=1, default=json_default) + "\n")
        out(f"wrote {a.json_out}")


if __name__ == "__main__":
    main()
