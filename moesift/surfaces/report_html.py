"""The HTML side of `moesift report`: one self-contained page (plotly.js inlined, opens offline)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from ..analysis.stats import PCTS
from ..core.html import esc, figure, page, table
from ..core.values import fmt_bytes
from .report_text import LOCALITY_DEFINITIONS, fmt, hit_rate_rows, need_text


def render_html(r: dict[str, Any]) -> str:
    """One self-contained HTML page (plotly.js inlined, no network)."""
    figs = _coverage_figures(r)
    if r.get("savings"):
        figs.append(("bytes", _savings_figure(r["savings"])))
    if r.get("locality"):
        figs += _locality_figures(r["locality"])
    if r.get("comparison"):
        figs.append(("compare", _compare_figure(r["comparison"])))
    parts = [f if isinstance(f, str) else figure(f, name) for name, f in figs]
    return _page(r, parts)


def _coverage_figures(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """Coverage curves, per-layer usage, in-sample vs held-out coverage, and the learning curve."""
    import plotly.graph_objects as go

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
    return figs


def _savings_figure(sv: dict[str, Any]) -> Any:
    """Predicted checkpoint size against the budget."""
    import plotly.graph_objects as go

    unit, div = ("GiB", 2**30) if sv["total_bytes"] >= 2**30 else ("MiB", 2**20)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[float(b["budget"]) for b in sv["budgets"]], y=[b["predicted_bytes"] / div for b in sv["budgets"]],
                             mode="lines+markers", name=f"predicted checkpoint ({unit})"))
    fig.add_hline(y=sv["total_bytes"] / div, line_dash="dash", annotation_text="full checkpoint")
    fig.add_hline(y=sv["non_expert_bytes"] / div, line_dash="dot", annotation_text="non-expert bytes")
    fig.update_layout(title="Checkpoint size vs budget", xaxis_title="fraction of experts kept", yaxis_title=unit, height=420)
    return fig


def _locality_figures(loc: dict[str, Any]) -> list[tuple[str, Any]]:
    """The locality definitions, SRP against segment length, and cache hit rates against capacity."""
    import plotly.graph_objects as go

    figs: list[tuple[str, Any]] = []
    defs = "".join(f"<li>{esc(v)}</li>" for v in LOCALITY_DEFINITIONS.values())
    figs.append(("locality-definitions", f"<h2>Routing locality</h2><ul>{defs}</ul>"))
    fig = go.Figure()
    ms = loc["seg_lens"]
    fig.add_trace(go.Scatter(x=ms, y=[loc["srp"]["overall"][str(m)]["srp"] for m in ms], mode="lines+markers", name="SRP"))
    fig.update_layout(title=f"SRP against segment length ({loc['tokens_used']} tokens, all MoE layers)",
                      xaxis_title="segment length m", xaxis_type="log", yaxis_title="SRP (best F1)", height=400)
    figs.append(("locality", fig))
    sc = loc["sch"]
    fig = go.Figure()
    for name, rows in hit_rate_rows(loc):
        style = {"dash": "dot"} if name.startswith("SCH") else ({"width": 3} if name == "Belady" else {})
        fig.add_trace(go.Scatter(x=sc["capacities"], y=rows, mode="lines+markers", name=name, line=style))
    fig.update_layout(title=f"Per-layer cache hit rate: SCH(m) and LRU / LFU / Belady ({sc['tokens_used']} tokens, "
                            f"MoE layers {', '.join(map(str, sc['moe_layers']))}; Belady is the optimum)",
                      xaxis_title="cache capacity (experts per layer)", xaxis_type="log", yaxis_title="hit rate",
                      height=450)
    figs.append(("cache", fig))
    return figs


def _compare_figure(cmp_: dict[str, Any]) -> Any:
    """Cross-coverage of the workloads as a heatmap."""
    import plotly.graph_objects as go

    w = cmp_["workloads"]
    fig = go.Figure(go.Heatmap(z=cmp_["cross_coverage"], x=w, y=w, colorscale="Blues", zmin=0, zmax=1,
                               text=[[f"{v:.3f}" for v in row] for row in cmp_["cross_coverage"]], texttemplate="%{text}"))
    fig.update_layout(title=f"Cross-coverage (row's resident set at keep {cmp_['keep']:g}, as plan keeps it, "
                            "on column's routes)", xaxis_title="routes of", yaxis_title="resident set of", height=420)
    fig.update_yaxes(autorange="reversed")
    return fig


def _page(r: dict[str, Any], parts: list[str]) -> str:
    """The page: summary and notes, coverage at each budget, the figures, experts needed per layer."""
    m, w, o = r["model"], r["workload"], r["overall"]
    held = "heldout_coverage" in o
    budget_rows = [[b, fmt(o["in_sample_coverage"][b], pct=True)]
                   + ([fmt(o["heldout_coverage"][b], pct=True), fmt(o["heldout_std"][b], pct=True)] if held else [])
                   for b in r["budgets"]]
    layer_rows = [[s["layer"], *[s["experts_for_coverage"][str(p)] for p in PCTS], fmt(s["imbalance"]),
                   fmt(s["entropy"]), fmt(s["gini"]), len(s["never_selected"])] for s in r["layers"]]
    note_html = "".join(f"<li>{n}</li>" for n in _notes(r))
    intro = (f"\n<p>{r['n_layers']} MoE layers x {r['n_experts']} experts, top-{r['top_k']}; {r['tokens']:,} tokens "
             f"routed per layer;\ntraces: {esc(', '.join(r['traces']))}; moesift {esc(r['tool']['version'])} on "
             f"{esc(platform.platform())}.</p>\n<p>Mean fraction of experts for 90% coverage: "
             f"<b>{100 * o['mean_fraction_for_90']:.1f}%</b>.</p>\n<ul>{note_html}</ul>")
    budgets = ("<h2>Coverage at each budget (mean over layers)</h2>\n"
               + table(["budget", "in-sample", *(["held-out", "fold std"] if held else [])], budget_rows) + "\n")
    layers = ("\n<h2>Experts needed per layer</h2>\n"
              + table(["layer", *[f"{p}%" for p in PCTS], "max/mean", "entropy", "gini", "never selected"], layer_rows))
    title = f"moesift report: {m.get('name') or m.get('model_type')} on {w.get('label')}"
    return page(title, [budgets, *parts, layers], intro)


def _notes(r: dict[str, Any]) -> list[str]:
    """Notes of the page (HTML): unseen mass, learning curve, checkpoint bytes, and the report's notes."""
    o = r["overall"]
    notes = []
    notes.append(f"Unseen routing mass: Good-Turing {fmt(o['unseen_mass_good_turing'], pct=True)}, Chao-Jost "
                 f"{fmt(o['unseen_mass_chao'], pct=True)}"
                 + (f", measured on held-out folds {fmt(o['unseen_mass_heldout'], pct=True)}" if "unseen_mass_heldout" in o else ""))
    lc = r.get("learning_curve")
    if lc:
        for b, e in lc["estimates"].items():
            notes.append(f"Budget {b}: in-sample exceeds held-out by {fmt(e['gap_at_full'], pct=True)} at "
                         f"{int(lc['tokens_traced']):,} tokens; " + esc(need_text(e)))
    else:
        notes.append("No folds in this trace: held-out coverage cannot be measured.")
    sv = r.get("savings")
    if sv:
        notes.append(f"Checkpoint {esc(sv['model'])}: total {fmt_bytes(sv['total_bytes'])}, experts {fmt_bytes(sv['expert_bytes'])}, "
                     f"non-expert {fmt_bytes(sv['non_expert_bytes'])} ({esc(', '.join(sv['dtypes']))}).")
    notes += [esc(n) for n in r.get("notes") or []]
    return notes
