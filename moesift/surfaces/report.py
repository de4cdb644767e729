"""`moesift report` and `moesift compare`: is shrinking this model to my workload worth it, and how far can
the answer be trusted on traffic the trace did not see.

`report` returns one dict with every figure (the `--json` output), prints a terminal summary with rich
tables unless ``json=True``, and writes a self-contained HTML report (plotly, inlined, opens offline) with
``out=``.
"""

from __future__ import annotations

import html as _html
import os
import platform
import sys
from typing import Any

import numpy as np

from ..analysis.affinity import affinity_summary
from ..analysis.locality import locality
from ..analysis.stats import (
    BUDGETS,
    HEADLINE_BUDGETS,
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
from ..core.version import __version__
from ..formats.checkpoint import CheckpointIndex
from ..formats.trace import Trace, merge
from ..selection.planner import plan as make_plan
from ..selection.planner import strategy_scores

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
    counted with their expert (trimming slices them). Quantized tensors count at their stored sizes."""

    idx = CheckpointIndex.build(model)
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

    plans = [make_plan(t, keep=keep) for t in traces]
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
        _print_compare(out)
    return out


# ---- report --------------------------------------------------------------------------------------------

LOCALITY_DEFINITIONS = {
    "srp": "SRP(m): best F1, over one count threshold j, of predicting every token of each m-token window "
           "(stride 1, inside a document) by the experts selected by at least j of its tokens.",
    "sch": "SCH(m): hit rate of a demand cache of C experts per layer, empty at each document start, that on a "
           "miss evicts a cached expert the token does not use, the one selected least often in the next m "
           "tokens (ties: least recently used); paper-v3-demand-cache, never above Belady.",
    "lru": "LRU: the same demand cache evicting the least recently used expert.",
    "lfu": "LFU: evicts the expert selected least often so far (ties: least recently used).",
    "belady": "Belady: evicts the expert whose next use is furthest away; the most hits any cache of C experts can get.",
}


def _hit_rate_rows(loc: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(name, hit rate at each capacity of the SCH grid) for SCH at each m, then LRU, LFU and Belady."""
    sc, c = loc["sch"], loc.get("cache")
    rows = [(f"SCH m={m}", [sc["overall"][str(m)][str(r)] for r in sc["rhos"]]) for m in loc["seg_lens"]]
    if c:
        for p, name in (("lru", "LRU"), ("lfu", "LFU"), ("belady", "Belady")):
            rows.append((name, [c["overall"][str(cap)][p] for cap in sc["capacities"]]))
    return rows


def report(traces, model=None, out=None, json: bool = False, locality_tokens: int | None = 8192,
           cache_tokens: int | None = 2048, force: bool = False) -> dict[str, Any]:
    """Concentration, held-out trust, savings in bytes, locality and affinity of one or more traces of the
    same model (several traces are merged for the main figures and compared side by side)."""

    if out is not None:

        check_output_path(out, force)
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
            write_text(out, render_html(res), force=force)
            res["html"] = str(out)
    if not json:
        _print_report(res)
    return res


class _status:
    """A rich status line on stderr while the report is computed (only on a terminal)."""

    def __init__(self, show: bool):
        self.show = show and sys.stderr.isatty()
        self._st = None

    def __enter__(self):
        if self.show:
            from rich.console import Console

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


# ---- terminal ------------------------------------------------------------------------------------------


def _fmt(x, pct=False, digits=3):
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _gb(b):
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.3f} MB" if b >= 1e5 else f"{b} B"


def _console():
    from rich.console import Console

    return Console()


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


def _print_report(r: dict[str, Any]) -> None:
    from rich.table import Table

    con = _console()
    m, w, o = r["model"], r["workload"], r["overall"]
    for n in r.get("notes") or []:
        con.print(f"note: {n}")
    con.print(f"[bold]{m.get('name') or m.get('model_type')}[/] on [bold]{w.get('label')}[/]: {r['n_layers']} MoE layers x "
              f"{r['n_experts']} experts, top-{r['top_k']}, {r['tokens']} tokens routed per layer")
    t = Table(title="experts needed per layer to cover a share of routes")
    t.add_column("layer", justify="right")
    for p in PCTS:
        t.add_column(f"{p}%", justify="right")
    t.add_column("max/mean", justify="right")
    t.add_column("entropy", justify="right")
    t.add_column("gini", justify="right")
    t.add_column("never", justify="right")
    lay = r["layers"]
    show = lay if len(lay) <= 16 else lay[:6] + [None] + lay[-6:]
    for s in show:
        if s is None:
            t.add_row("...", *[""] * (len(PCTS) + 4))
            continue
        t.add_row(str(s["layer"]), *[str(s["experts_for_coverage"][str(p)]) for p in PCTS], _fmt(s["imbalance"]),
                  _fmt(s["entropy"]), _fmt(s["gini"]), str(len(s["never_selected"])))
    t.add_row("mean", *[f"{o['mean_experts_for_coverage'][str(p)]:.1f}" for p in PCTS], _fmt(o["mean_imbalance"]),
              _fmt(o["mean_entropy"]), _fmt(o["mean_gini"]), str(o["never_selected"]), style="bold")
    con.print(t)
    con.print(f"mean fraction of experts for 90% coverage: [bold]{100 * o['mean_fraction_for_90']:.1f}%[/]")
    for row in r.get("strategies") or []:
        rho = row.get("spearman_with_counts")
        con.print(f"strategy {row['strategy']:<12} in-sample coverage at keep 25% "
                  f"{_fmt(row.get('coverage_0.25'))}, 50% {_fmt(row.get('coverage_0.5'))}; rank correlation with "
                  f"selection counts {_fmt(rho)}")
    t = Table(title="coverage at each budget (fraction of experts kept), mean over layers")
    t.add_column("budget", justify="right")
    t.add_column("in-sample", justify="right")
    if "heldout_coverage" in o:
        t.add_column("held-out (leave one fold out)", justify="right")
        t.add_column("fold spread (std)", justify="right")
    for b in r["budgets"]:
        row = [b, _fmt(o["in_sample_coverage"][b], pct=True)]
        if "heldout_coverage" in o:
            row += [_fmt(o["heldout_coverage"][b], pct=True), _fmt(o["heldout_std"][b], pct=True)]
        t.add_row(*row)
    con.print(t)
    um = f"unseen routing mass: Good-Turing {_fmt(o['unseen_mass_good_turing'], pct=True)}, Chao {_fmt(o['unseen_mass_chao'], pct=True)}"
    if "unseen_mass_heldout" in o:
        um += f", measured on held-out folds {_fmt(o['unseen_mass_heldout'], pct=True)}"
    con.print(um)
    lc = r.get("learning_curve")
    if lc:
        for b, e in lc["estimates"].items():
            con.print(f"budget {b}: gap in-sample - held-out {_fmt(e['gap_at_full'], pct=True)} at {int(lc['tokens_traced']):,} tokens; "
                      + _need_text(e))
    else:
        con.print("[yellow]no folds in this trace: held-out coverage cannot be measured (trace with --folds 2 or more)[/]")
    ph = r.get("phases")
    if ph:
        con.print(f"prefill vs decode: 90% coverage needs {100 * ph['prefill']['mean_fraction_for_90']:.1f}% / "
                  f"{100 * ph['decode']['mean_fraction_for_90']:.1f}% of experts; a prefill-chosen half covers "
                  f"{100 * ph['prefill_set_on_decode']:.1f}% of decode routes")
    sv = r.get("savings")
    if sv:
        t = Table(title=f"checkpoint bytes ({', '.join(sv['dtypes'])}): total {_gb(sv['total_bytes'])}, experts "
                  f"{_gb(sv['expert_bytes'])}, other {_gb(sv['non_expert_bytes'])}")
        t.add_column("budget", justify="right")
        t.add_column("experts/layer", justify="right")
        t.add_column("predicted size", justify="right")
        t.add_column("saved", justify="right")
        t.add_column("held-out cov.", justify="right")
        for row in sv["budgets"]:
            if float(row["budget"]) in HEADLINE_BUDGETS:
                t.add_row(row["budget"], str(row["experts_per_layer"]), _gb(row["predicted_bytes"]),
                          _fmt(row["saved_fraction"], pct=True), _fmt(row.get("heldout_coverage"), pct=True))
        for row in sv["coverage_targets"]:
            t.add_row(f"{row['coverage']}% cov.", f"{row['mean_experts_per_layer']:.1f}", _gb(row["predicted_bytes"]),
                      _fmt(row["saved_fraction"], pct=True), "")
        con.print(t)
    loc = r.get("locality")
    if loc:
        t = Table(title=f"routing locality: SRP ({loc['tokens_used']} of {loc['tokens_in_log']} logged tokens)")
        t.add_column("segment m", justify="right")
        t.add_column("SRP", justify="right")
        t.add_column("|S|/k", justify="right")
        for m in loc["seg_lens"]:
            s = loc["srp"]["overall"][str(m)]
            t.add_row(str(m), _fmt(s["srp"]), _fmt(s["experts_ratio"]))
        con.print(t)
        sc = loc["sch"]
        t = Table(title=f"per-layer expert cache hit rate ({sc['tokens_used']} tokens, MoE layers "
                  f"{', '.join(map(str, sc['moe_layers']))}, empty cache at each document start)")
        t.add_column("cache (experts)", justify="left")
        for cap in sc["capacities"]:
            t.add_column(str(cap), justify="right")
        for name, rows in _hit_rate_rows(loc):
            t.add_row(name, *[_fmt(v) for v in rows])
        con.print(t)
        for line in LOCALITY_DEFINITIONS.values():
            con.print(f"  {line}")
    af = r.get("affinity")
    if af:
        ao = af["overall"]
        con.print(f"inter-layer affinity: normalised MI {_fmt(ao['mean_nmi'])} (excess over independence "
                  f"{_fmt(ao['mean_nmi_excess'])}), lift of the best successor {_fmt(ao['mean_lift'])}x")
        if af["chains"]:
            ch = af["chains"][0]
            con.print(f"most affine chain: {' > '.join(map(str, ch['experts'][:12]))}{' ...' if len(ch['experts']) > 12 else ''}")
    if r.get("comparison"):
        _print_compare(r["comparison"])
    if r.get("html"):
        con.print(f"HTML report: {r['html']}")


def _need_text(e: dict[str, Any]) -> str:
    if e["status"] == "agrees":
        return "already within 1 point"
    if e["status"] == "extrapolated":
        return f"about {int(e['tokens_needed']):,} tokens for agreement within 1 point ({e['note']})"
    return f"cannot estimate the tokens needed: {e['note']}"


def _print_compare(c: dict[str, Any]) -> None:
    from rich.table import Table

    con = _console()
    t = Table(title=f"cross-coverage (row's resident set at --keep {c['keep']:g}, as `moesift plan` keeps it, on "
                    "column's routes)")
    t.add_column("resident set of")
    for w in c["workloads"]:
        t.add_column(w, justify="right")
    for i, w in enumerate(c["workloads"]):
        t.add_row(w, *[_fmt(x, pct=True) for x in c["cross_coverage"][i]])
    con.print(t)
    for note in c.get("budget_notes") or []:
        con.print(f"note: {note}")
    t = Table(title="Jaccard similarity of resident sets")
    t.add_column("")
    for w in c["workloads"]:
        t.add_column(w, justify="right")
    for i, w in enumerate(c["workloads"]):
        t.add_row(w, *[f"{x:.2f}" for x in c["jaccard"][i]])
    con.print(t)
    u = c["union"]
    con.print(f"smallest union giving every workload >= {100 * c['target']:.0f}% coverage: {u['mean_size']:.1f} experts per "
              f"layer on average ({100 * u['mean_fraction']:.1f}%), max {u['max_size']}; union of each workload's own "
              f"set: {u['mean_union_of_own_sets']:.1f}")


# ---- HTML ----------------------------------------------------------------------------------------------


def render_html(r: dict[str, Any]) -> str:
    """One self-contained HTML page (plotly.js inlined, no network)."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    figs: list[tuple[str, Any]] = []
    E = r["n_experts"]
    curves = np.array(r["coverage_curves"], dtype=float)
    x = np.arange(E + 1) / E
    fig = go.Figure()
    for i, s in enumerate(r["layers"]):
        fig.add_trace(go.Scatter(x=x, y=curves[i], mode="lines", name=f"layer {s['layer']}", line={"width": 1}))
    fig.update_layout(title="Coverage curves (most-selected experts first)", xaxis_title="fraction of experts kept",
                      yaxis_title="share of routes covered", height=450)
    figs.append(("coverage", fig))
    fig = go.Figure(go.Heatmap(z=np.array(r["usage"], dtype=float), colorscale="Viridis",
                               y=[str(s["layer"]) for s in r["layers"]], colorbar={"title": "share"}))
    fig.update_layout(title="Per-layer expert usage (share of the layer's routes)", xaxis_title="expert id",
                      yaxis_title="decoder layer", height=max(350, 14 * len(r["layers"]) + 120))
    figs.append(("usage", fig))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=np.nanmean(curves, axis=0), mode="lines", name="in-sample"))
    if r.get("heldout_curves") is not None:
        hm = np.array(r["heldout_curves"], dtype=float)
        hs = np.array(r["heldout_curves_std"], dtype=float)
        with np.errstate(invalid="ignore"):
            mm, ss = np.nanmean(hm, axis=0), np.nanmean(hs, axis=0)
        fig.add_trace(go.Scatter(x=x, y=mm, mode="lines", name="held-out (leave one fold out)",
                                 error_y={"type": "data", "array": ss, "visible": True, "thickness": 0.5}))
    fig.update_layout(title="In-sample vs held-out coverage (mean over layers, fold spread as error bars)",
                      xaxis_title="fraction of experts kept", yaxis_title="coverage", height=450)
    figs.append(("heldout", fig))
    lc = r.get("learning_curve")
    if lc and lc["points"]:
        fig = go.Figure()
        toks = [p["tokens"] for p in lc["points"]]
        for b in lc["estimates"]:
            fig.add_trace(go.Scatter(x=toks, y=[p[b]["in_sample"] for p in lc["points"]], mode="lines+markers",
                                     name=f"in-sample, budget {b}", line={"dash": "dot"}))
            fig.add_trace(go.Scatter(x=toks, y=[p[b]["heldout"] for p in lc["points"]], mode="lines+markers",
                                     name=f"held-out, budget {b}"))
        fig.update_layout(title="Learning curve: coverage against tokens traced (fold subsets)", xaxis_title="tokens",
                          xaxis_type="log", yaxis_title="coverage", height=450)
        figs.append(("learning", fig))
    sv = r.get("savings")
    if sv:
        unit, div = ("GB", 1e9) if sv["total_bytes"] >= 1e9 else ("MB", 1e6)
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[float(b["budget"]) for b in sv["budgets"]], y=[b["predicted_bytes"] / div for b in sv["budgets"]],
                                 mode="lines+markers", name=f"predicted checkpoint ({unit})"))
        fig.add_hline(y=sv["total_bytes"] / div, line_dash="dash", annotation_text="full checkpoint")
        fig.add_hline(y=sv["non_expert_bytes"] / div, line_dash="dot", annotation_text="non-expert bytes")
        fig.update_layout(title="Checkpoint size vs budget", xaxis_title="fraction of experts kept", yaxis_title=unit, height=420)
        figs.append(("bytes", fig))
    loc = r.get("locality")
    if loc:
        defs = "".join(f"<li>{_html.escape(v)}</li>" for v in LOCALITY_DEFINITIONS.values())
        figs.append(("locality-definitions", f"<h2>Routing locality</h2><ul>{defs}</ul>"))
        fig = go.Figure()
        ms = loc["seg_lens"]
        fig.add_trace(go.Scatter(x=ms, y=[loc["srp"]["overall"][str(m)]["srp"] for m in ms], mode="lines+markers", name="SRP"))
        fig.update_layout(title=f"SRP against segment length ({loc['tokens_used']} tokens, all MoE layers)",
                          xaxis_title="segment length m", xaxis_type="log", yaxis_title="SRP (best F1)", height=400)
        figs.append(("locality", fig))
        sc = loc["sch"]
        fig = go.Figure()
        for name, rows in _hit_rate_rows(loc):
            style = {"dash": "dot"} if name.startswith("SCH") else ({"width": 3} if name == "Belady" else {})
            fig.add_trace(go.Scatter(x=sc["capacities"], y=rows, mode="lines+markers", name=name, line=style))
        fig.update_layout(title=f"Per-layer cache hit rate: SCH(m) and LRU / LFU / Belady ({sc['tokens_used']} tokens, "
                                f"MoE layers {', '.join(map(str, sc['moe_layers']))}; Belady is the optimum)",
                          xaxis_title="cache capacity (experts per layer)", xaxis_type="log", yaxis_title="hit rate",
                          height=450)
        figs.append(("cache", fig))
    cmp_ = r.get("comparison")
    if cmp_:
        w = cmp_["workloads"]
        fig = go.Figure(go.Heatmap(z=cmp_["cross_coverage"], x=w, y=w, colorscale="Blues", zmin=0, zmax=1,
                                   text=[[f"{v:.3f}" for v in row] for row in cmp_["cross_coverage"]], texttemplate="%{text}"))
        fig.update_layout(title=f"Cross-coverage (row's resident set at keep {cmp_['keep']:g}, as plan keeps it, "
                                "on column's routes)", xaxis_title="routes of", yaxis_title="resident set of", height=420)
        fig.update_yaxes(autorange="reversed")
        figs.append(("compare", fig))
    parts = [f if isinstance(f, str) else
             f.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config={"displaylogo": False})
             for name, f in figs]
    return _page(r, parts, get_plotlyjs())


def _page(r: dict[str, Any], parts: list[str], plotlyjs: str) -> str:
    esc = _html.escape
    m, w, o = r["model"], r["workload"], r["overall"]
    rows = "".join(
        f"<tr><td>{s['layer']}</td>" + "".join(f"<td>{s['experts_for_coverage'][str(p)]}</td>" for p in PCTS)
        + f"<td>{_fmt(s['imbalance'])}</td><td>{_fmt(s['entropy'])}</td><td>{_fmt(s['gini'])}</td>"
        f"<td>{len(s['never_selected'])}</td></tr>"
        for s in r["layers"]
    )
    head = "".join(f"<th>{p}%</th>" for p in PCTS)
    budget_rows = "".join(
        f"<tr><td>{b}</td><td>{_fmt(o['in_sample_coverage'][b], pct=True)}</td>"
        + (f"<td>{_fmt(o['heldout_coverage'][b], pct=True)}</td><td>{_fmt(o['heldout_std'][b], pct=True)}</td>" if "heldout_coverage" in o else "")
        + "</tr>"
        for b in r["budgets"]
    )
    notes = []
    notes.append(f"Unseen routing mass: Good-Turing {_fmt(o['unseen_mass_good_turing'], pct=True)}, Chao-Jost "
                 f"{_fmt(o['unseen_mass_chao'], pct=True)}"
                 + (f", measured on held-out folds {_fmt(o['unseen_mass_heldout'], pct=True)}" if "unseen_mass_heldout" in o else ""))
    lc = r.get("learning_curve")
    if lc:
        for b, e in lc["estimates"].items():
            notes.append(f"Budget {b}: in-sample exceeds held-out by {_fmt(e['gap_at_full'], pct=True)} at "
                         f"{int(lc['tokens_traced']):,} tokens; " + esc(_need_text(e)))
    else:
        notes.append("No folds in this trace: held-out coverage cannot be measured.")
    sv = r.get("savings")
    if sv:
        notes.append(f"Checkpoint {esc(sv['model'])}: total {_gb(sv['total_bytes'])}, experts {_gb(sv['expert_bytes'])}, "
                     f"non-expert {_gb(sv['non_expert_bytes'])} ({esc(', '.join(sv['dtypes']))}).")
    notes += [esc(n) for n in r.get("notes") or []]
    note_html = "".join(f"<li>{n}</li>" for n in notes)
    title = esc(f"moesift report: {m.get('name') or m.get('model_type')} on {w.get('label')}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}h1{{font-size:1.4em}}</style>
<script type="text/javascript">{plotlyjs}</script></head>
<body><h1>{title}</h1>
<p>{r['n_layers']} MoE layers x {r['n_experts']} experts, top-{r['top_k']}; {r['tokens']:,} tokens routed per layer;
traces: {esc(', '.join(r['traces']))}; moesift {esc(r['tool']['version'])} on {esc(platform.platform())}.</p>
<p>Mean fraction of experts for 90% coverage: <b>{100 * o['mean_fraction_for_90']:.1f}%</b>.</p>
<ul>{note_html}</ul>
<h2>Coverage at each budget (mean over layers)</h2>
<table><tr><th>budget</th><th>in-sample</th>{'<th>held-out</th><th>fold std</th>' if 'heldout_coverage' in o else ''}</tr>{budget_rows}</table>
{''.join(parts)}
<h2>Experts needed per layer</h2>
<table><tr><th>layer</th>{head}<th>max/mean</th><th>entropy</th><th>gini</th><th>never selected</th></tr>{rows}</table>
</body></html>
"""
