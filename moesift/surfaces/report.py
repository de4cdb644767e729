"""`moesift report` and `moesift compare`: is shrinking this model to my workload worth it, and how far can
the answer be trusted on traffic the trace did not see.

`report` returns one dict with every figure (the `--json` output), prints a terminal summary with rich
tables unless ``json=True``, and writes a self-contained HTML report (plotly, inlined, opens offline) with
``out=``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from rich.console import Console

from ..analysis.affinity import affinity_summary
from ..analysis.locality import locality
from ..analysis.stats import (
    BUDGETS,
    PCTS,
    analyse,
    budget_key,
    budget_n,
    coverage_of,
    experts_for_coverage,
    select_top,
)
from ..core.errors import MoesiftError
from ..core.io import check_output_path, write_text
from ..core.values import check_int
from ..core.version import __version__
from ..formats.checkpoint import CheckpointIndex
from ..formats.gguf import is_gguf, read_gguf
from ..formats.trace import Trace, merge
from ..selection.planner import plan as make_plan
from ..selection.planner import strategy_scores
from .report_html import render_html
from .report_text import LOCALITY_DEFINITIONS, print_compare, print_report

# ---- inputs --------------------------------------------------------------------------------------------


def _load(traces) -> list:

    if isinstance(traces, (str, os.PathLike, Trace)):
        traces = [traces]
    out = []
    for t in traces:
        out.append(t if isinstance(t, Trace) else Trace.load(t))
    if not out:
        raise MoesiftError("give at least one trace file")
    return out


def _labels(traces) -> list[str]:
    labels, seen = [], {}
    for i, t in enumerate(traces):
        lab = t.label or f"trace{i + 1}"
        if lab in seen:
            seen[lab] += 1
            lab = f"{lab}#{seen[lab]}"
        else:
            seen[lab] = 1
        labels.append(lab)
    return labels


def _same_model(traces) -> None:
    first = traces[0]
    for t in traces[1:]:
        if t.model_key() != first.model_key():
            raise MoesiftError(
                f"traces of different models cannot be analysed together: {first.model.get('name')!r} "
                f"({first.n_layers} MoE layers x {first.n_experts} experts) and {t.model.get('name')!r} "
                f"({t.n_layers} x {t.n_experts}); report them one at a time"
            )


# ---- savings -------------------------------------------------------------------------------------------


def savings(trace, model, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bytes from the checkpoint headers of `model`: total, expert, non-expert, and the predicted checkpoint
    size at each budget (fractions of experts, and the sets sized for each coverage target). Router rows are
    counted with their expert (trimming slices them). Quantized tensors count at their stored sizes. `model` may
    be a GGUF file (its header gives the bytes)."""
    idx = read_gguf(model) if is_gguf(model) else CheckpointIndex.build(model)
    spec = idx.spec
    counts = trace.counts
    L, E = counts.shape
    if spec.n_experts != E or len(spec.moe_layers) != L:
        raise MoesiftError(
            f"model {str(model)!r} has {len(spec.moe_layers)} MoE layers x {spec.n_experts} experts but the trace "
            f"has {L} x {E}; pass the model the trace was recorded on"
        )
    moe = list(spec.moe_layers)
    hash_dec = set(spec.hash_layers)
    K = spec.top_k
    per_expert = idx.expert_bytes()
    total = idx.total_bytes()
    expert = int(sum(sum(v.values()) for v in per_expert.values()))
    by_kind = idx.bytes_by_kind()

    def predict(n_per_layer: list[int]) -> tuple[int, dict[int, list[int]]]:
        resident = {}
        for i, dec in enumerate(moe):
            if dec in hash_dec:
                continue
            resident[dec] = [int(e) for e in select_top(counts[i], max(n_per_layer[i], K))]
        return idx.predicted_bytes(resident), resident

    rows = []
    lay = analysis["layers"] if analysis else None
    for b in BUDGETS:
        n = budget_n(b, E)
        pb, res = predict([n] * L)
        row = {"budget": budget_key(b), "experts_per_layer": max(n, K), "predicted_bytes": pb,
               "saved_bytes": total - pb, "saved_fraction": (total - pb) / total if total else 0.0}
        if lay:
            row["in_sample_coverage"] = float(np.mean([coverage_of(counts[i], res.get(moe[i], range(E))) for i in range(L)]))
            if "heldout_coverage" in lay[0]:
                row["heldout_coverage"] = float(np.nanmean([s["heldout_coverage"][budget_key(b)] for s in lay])) if max(n, K) == n else None
        rows.append(row)
    targets = []
    for p in PCTS:
        ns = [experts_for_coverage(counts[i], p) for i in range(L)]
        pb, _ = predict(ns)
        targets.append({"coverage": str(p), "mean_experts_per_layer": float(np.mean([max(n, K) for n in ns])),
                        "predicted_bytes": pb, "saved_bytes": total - pb,
                        "saved_fraction": (total - pb) / total if total else 0.0})
    return {
        "model": str(model),
        "directory": str(idx.directory),
        "total_bytes": total,
        "expert_bytes": expert,
        "non_expert_bytes": total - expert,
        "bytes_by_kind": by_kind,
        "dtypes": sorted({t.dtype for t in idx.tensors}),
        "budgets": rows,
        "coverage_targets": targets,
        "note": f"at least top-k ({K}) experts kept per layer; hash-routed layers kept whole",
    }


# ---- compare -------------------------------------------------------------------------------------------


def _smallest_union(shares: np.ndarray, target: float) -> list[int]:
    """Smallest set of experts whose share reaches `target` in every row of shares [W, E] (exact, HiGHS)."""
    W, E = shares.shape
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp

        res = milp(
            c=np.ones(E),
            constraints=[LinearConstraint(shares, lb=np.full(W, target - 1e-12), ub=np.full(W, np.inf))],
            integrality=np.ones(E),
            bounds=Bounds(0, 1),
            options={"time_limit": 10.0},
        )
        if res.x is not None:
            return [int(e) for e in np.flatnonzero(res.x > 0.5)]
    except ImportError:
        pass
    # greedy fallback: add the expert that closes most of the remaining shortfall
    chosen: list[int] = []
    got = np.zeros(W)
    left = np.ones(E, dtype=bool)
    while (got < target - 1e-12).any() and left.any():
        gain = (np.minimum(shares, np.maximum(target - got, 0)[:, None])).sum(axis=0)
        gain[~left] = -1
        e = int(np.argmax(gain))
        chosen.append(e)
        left[e] = False
        got += shares[:, e]
    return sorted(chosen)


def _compare(traces, labels, keep: float, target: float) -> dict[str, Any]:
    _same_model(traces)
    if not 0 < keep <= 1:
        raise MoesiftError(f"--keep {keep} must be a fraction of experts in (0, 1]")
    if not 0 < target <= 1:
        raise MoesiftError(f"--target {target} must be a coverage share in (0, 1]")
    W = len(traces)
    counts = [t.counts for t in traces]
    L, E = counts[0].shape
    n = budget_n(keep, E)
    # each workload's resident set is the one `moesift plan --keep` would serve (frequency): the n most
    # selected experts (for group-limited routers: whole groups, or the same count in every group, as
    # `plan --groups auto` chooses), hash-routed layers whole

    plans = [make_plan(t, keep=keep, strategy="frequency") for t in traces]
    sets = [[np.asarray(e["resident"], dtype=np.int64) for e in p.layers] for p in plans]
    notes = sorted({p.predictions["budget_note"] for p in plans if p.predictions.get("budget_note")})
    cross = np.zeros((W, W))
    jac = np.zeros((W, W))
    for a in range(W):
        for b in range(W):
            with np.errstate(invalid="ignore"):
                cross[a, b] = np.nanmean([coverage_of(counts[b][i], sets[a][i]) for i in range(L)])
            jac[a, b] = np.mean([len(np.intersect1d(sets[a][i], sets[b][i])) / max(1, len(np.union1d(sets[a][i], sets[b][i])))
                                 for i in range(L)])
    per_layer = []
    union_sizes, own_union = [], []
    for i in range(L):
        rows = np.stack([c[i] / max(1, c[i].sum()) for c in counts])
        u = _smallest_union(rows, target)
        own = sorted(set().union(*[set(select_top(c[i], experts_for_coverage(c[i], target)).tolist()) for c in counts]))
        per_layer.append({"moe_index": i, "smallest_union": u, "size": len(u), "union_of_own_sets": len(own),
                          "coverage": [float(rows[w, u].sum()) for w in range(W)]})
        union_sizes.append(len(u))
        own_union.append(len(own))
    return {
        "workloads": labels,
        "keep": keep,
        "experts_kept": n,
        "experts_kept_per_layer": [[len(x) for x in ws] for ws in sets],
        "budget_notes": notes,
        "cross_coverage": cross,
        "jaccard": jac,
        "target": target,
        "union": {
            "mean_size": float(np.mean(union_sizes)),
            "mean_fraction": float(np.mean(union_sizes) / E),
            "max_size": int(max(union_sizes)),
            "mean_union_of_own_sets": float(np.mean(own_union)),
            "layers": per_layer,
        },
    }


def compare(traces, keep: float = 0.5, json: bool = False, target: float = 0.9) -> dict[str, Any]:
    """Cross-coverage of workloads (row's resident set of `keep` x experts, share of the column's routes it
    covers; mean over layers), Jaccard of the resident sets, and the smallest per-layer union of experts that
    gives every workload at least `target` coverage (exact integer program)."""
    ts = _load(traces)
    if len(ts) < 2:
        raise MoesiftError("compare needs at least two traces")
    out = _jsonable(_compare(ts, _labels(ts), keep, target))
    if not json:
        print_compare(out)
    return out


# ---- report --------------------------------------------------------------------------------------------

def report(traces, model=None, out=None, json: bool = False, locality_tokens: int | None = 8192,
           cache_tokens: int | None = 2048, force: bool = False) -> dict[str, Any]:
    """Concentration, held-out trust, savings in bytes, locality and affinity of one or more traces of the
    same model (several traces are merged for the main figures and compared side by side)."""
    if locality_tokens is not None:
        locality_tokens = check_int("--locality-tokens", locality_tokens, 1)
    if cache_tokens is not None:
        cache_tokens = check_int("--cache-tokens", cache_tokens, 1)
    inputs = [t for t in (traces if isinstance(traces, (list, tuple)) else [traces]) if isinstance(t, (str, os.PathLike))]
    if out is not None:
        check_output_path(out, force, inputs=inputs)
    ts = _load(traces)
    _same_model(ts)
    labels = _labels(ts)
    main = ts[0] if len(ts) == 1 else merge(ts)
    with _status(not json) as step:
        step("concentration and held-out coverage")
        a = analyse(main)
        c = main.counts.astype(np.float64)
        a["usage"] = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
        res: dict[str, Any] = {"schema": "moesift-report/1", "tool": {"name": "moesift", "version": __version__},
                               "traces": labels}
        res.update(a)
        n_group = main.model.get("n_group")
        if n_group and int(n_group) > 1:
            res["notes"] = [f"Budgets here count single experts (routing concentration). This router picks "
                            f"{main.model.get('topk_group') or 1} of {n_group} expert groups per token, so a servable "
                            "resident set keeps whole groups or the same number in every group and covers less at "
                            "the same size: `moesift plan` gives its coverage, in-sample and held-out."]
        step("selection strategies")
        res["strategies"] = strategy_coverage(main)
        if model is not None:
            step("checkpoint headers")
            res["savings"] = savings(main, model, a)
        step("routing locality and cache policies")
        res["locality"] = locality(main, max_tokens=locality_tokens, cache_tokens=cache_tokens)
        if res["locality"] is not None:
            res["locality"]["definitions"] = dict(LOCALITY_DEFINITIONS)
        step("inter-layer affinity")
        res["affinity"] = affinity_summary(main)
        if len(ts) > 1:
            step("workload comparison")
            res["workloads"] = [
                {"label": lab, **analyse(t)["overall"]} for lab, t in zip(labels, ts, strict=True)
            ]
            res["comparison"] = _compare(ts, labels, 0.5, 0.9)
        res = _jsonable(res)
        if out is not None:
            step("HTML report")
            write_text(out, render_html(res), force=force, inputs=inputs)
            res["html"] = str(out)
    if not json:
        print_report(res)
    return res


class _status:
    """A rich status line on stderr while the report is computed (only on a terminal)."""

    def __init__(self, show: bool):
        self.show = show and sys.stderr.isatty()
        self._st = None

    def __enter__(self):
        if self.show:
            self._st = Console(stderr=True).status("report")
            self._st.__enter__()
        return self.step

    def step(self, what: str) -> None:
        if self._st is not None:
            self._st.update(f"report: {what}")

    def __exit__(self, *a):
        if self._st is not None:
            self._st.__exit__(*a)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        if o.dtype.kind == "f":
            a = o.astype(object)
            a[~np.isfinite(o)] = None
            return a.tolist()
        return o.tolist() if o.dtype.kind in "iub" else _jsonable(o.tolist())
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return None if not np.isfinite(f) else f
    return o


def strategy_coverage(trace: Any, keeps: tuple[float, ...] = (0.25, 0.5)) -> list[dict[str, Any]]:
    """For each trace-scored strategy the trace supports: the in-sample coverage of the set `moesift plan`
    keeps at each budget (mean over MoE layers), and the mean per-layer Spearman correlation of its scores
    with the selection counts. Frequency is the in-sample optimum; contribution (summed gate x output norm)
    tracks it, REAP's mean saliency need not (it does not see how often an expert is used)."""
    out = []
    counts = trace.counts.astype(np.float64)
    for s in ("frequency", "weighted", "contribution", "saliency"):
        try:
            sc = strategy_scores(trace, s)
        except MoesiftError:
            continue
        rho = []
        for a, b in zip(sc, counts, strict=True):
            ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
            if ra.std() > 0 and rb.std() > 0:
                rho.append(float(np.corrcoef(ra, rb)[0, 1]))
        row: dict[str, Any] = {"strategy": s, "spearman_with_counts": float(np.mean(rho)) if rho else None}
        for k in keeps:
            try:
                row[f"coverage_{k:g}"] = make_plan(trace, keep=k, strategy=s).predictions["coverage"]
            except MoesiftError:
                row[f"coverage_{k:g}"] = None
        out.append(row)
    return out
