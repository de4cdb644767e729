"""The terminal side of `moesift report` and `moesift compare`: rich tables and lines on stdout, and the
number formats the HTML page shares."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..analysis.stats import HEADLINE_BUDGETS, PCTS
from ..core.values import fmt_bytes

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


def hit_rate_rows(loc: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(name, hit rate at each capacity of the SCH grid) for SCH at each m, then LRU, LFU and Belady."""
    sc, c = loc["sch"], loc.get("cache")
    rows = [(f"SCH m={m}", [sc["overall"][str(m)][str(r)] for r in sc["rhos"]]) for m in loc["seg_lens"]]
    if c:
        for p, name in (("lru", "LRU"), ("lfu", "LFU"), ("belady", "Belady")):
            rows.append((name, [c["overall"][str(cap)][p] for cap in sc["capacities"]]))
    return rows


def fmt(x, pct=False, digits=3):
    """A figure as text: '-' for None, a percentage with `pct`, `digits` significant digits for floats."""
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)




def need_text(e: dict[str, Any]) -> str:
    """How many tokens the learning curve says in-sample and held-out coverage need to agree."""
    if e["status"] == "agrees":
        return "already within 1 point"
    if e["status"] == "extrapolated":
        return f"about {int(e['tokens_needed']):,} tokens for agreement within 1 point ({e['note']})"
    return f"cannot estimate the tokens needed: {e['note']}"


def print_report(r: dict[str, Any]) -> None:
    """The terminal summary of a report (`r`: the dict `report` returns)."""
    con = Console()
    m, w = r["model"], r["workload"]
    for n in r.get("notes") or []:
        con.print(f"note: {n}")
    con.print(f"[bold]{m.get('name') or m.get('model_type')}[/] on [bold]{w.get('label')}[/]: {r['n_layers']} MoE layers x "
              f"{r['n_experts']} experts, top-{r['top_k']}, {r['tokens']} tokens routed per layer")
    con.print(_layers_table(r))
    _print_coverage(con, r)
    sv = r.get("savings")
    if sv:
        con.print(_savings_table(sv))
    loc = r.get("locality")
    if loc:
        _print_locality(con, loc)
    af = r.get("affinity")
    if af:
        _print_affinity(con, af)
    if r.get("comparison"):
        print_compare(r["comparison"])
    if r.get("html"):
        con.print(f"HTML report: {r['html']}")


def _layers_table(r: dict[str, Any]) -> Table:
    """Experts needed per layer for each coverage share (at most 16 rows shown), and the mean."""
    o = r["overall"]
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
        t.add_row(str(s["layer"]), *[str(s["experts_for_coverage"][str(p)]) for p in PCTS], fmt(s["imbalance"]),
                  fmt(s["entropy"]), fmt(s["gini"]), str(len(s["never_selected"])))
    t.add_row("mean", *[f"{o['mean_experts_for_coverage'][str(p)]:.1f}" for p in PCTS], fmt(o["mean_imbalance"]),
              fmt(o["mean_entropy"]), fmt(o["mean_gini"]), str(o["never_selected"]), style="bold")
    return t


def _print_coverage(con: Console, r: dict[str, Any]) -> None:
    """Strategies, coverage at each budget, unseen mass, learning curve and prefill vs decode."""
    o = r["overall"]
    con.print(f"mean fraction of experts for 90% coverage: [bold]{100 * o['mean_fraction_for_90']:.1f}%[/]")
    for row in r.get("strategies") or []:
        rho = row.get("spearman_with_counts")
        con.print(f"strategy {row['strategy']:<12} in-sample coverage at keep 25% "
                  f"{fmt(row.get('coverage_0.25'))}, 50% {fmt(row.get('coverage_0.5'))}; rank correlation with "
                  f"selection counts {fmt(rho)}")
    t = Table(title="coverage at each budget (fraction of experts kept), mean over layers")
    t.add_column("budget", justify="right")
    t.add_column("in-sample", justify="right")
    if "heldout_coverage" in o:
        t.add_column("held-out (leave one fold out)", justify="right")
        t.add_column("fold spread (std)", justify="right")
    for b in r["budgets"]:
        row = [b, fmt(o["in_sample_coverage"][b], pct=True)]
        if "heldout_coverage" in o:
            row += [fmt(o["heldout_coverage"][b], pct=True), fmt(o["heldout_std"][b], pct=True)]
        t.add_row(*row)
    con.print(t)
    um = f"unseen routing mass: Good-Turing {fmt(o['unseen_mass_good_turing'], pct=True)}, Chao {fmt(o['unseen_mass_chao'], pct=True)}"
    if "unseen_mass_heldout" in o:
        um += f", measured on held-out folds {fmt(o['unseen_mass_heldout'], pct=True)}"
    con.print(um)
    lc = r.get("learning_curve")
    if lc:
        for b, e in lc["estimates"].items():
            con.print(f"budget {b}: gap in-sample - held-out {fmt(e['gap_at_full'], pct=True)} at {int(lc['tokens_traced']):,} tokens; "
                      + need_text(e))
    else:
        con.print("[yellow]no folds in this trace: held-out coverage cannot be measured (trace with --folds 2 or more)[/]")
    ph = r.get("phases")
    if ph:
        con.print(f"prefill vs decode: 90% coverage needs {100 * ph['prefill']['mean_fraction_for_90']:.1f}% / "
                  f"{100 * ph['decode']['mean_fraction_for_90']:.1f}% of experts; a prefill-chosen half covers "
                  f"{100 * ph['prefill_set_on_decode']:.1f}% of decode routes")


def _savings_table(sv: dict[str, Any]) -> Table:
    """Predicted checkpoint bytes at the headline budgets and coverage targets."""
    t = Table(title=f"checkpoint bytes ({', '.join(sv['dtypes'])}): total {fmt_bytes(sv['total_bytes'])}, experts "
              f"{fmt_bytes(sv['expert_bytes'])}, other {fmt_bytes(sv['non_expert_bytes'])}")
    t.add_column("budget", justify="right")
    t.add_column("experts/layer", justify="right")
    t.add_column("predicted size", justify="right")
    t.add_column("saved", justify="right")
    t.add_column("held-out cov.", justify="right")
    for row in sv["budgets"]:
        if float(row["budget"]) in HEADLINE_BUDGETS:
            t.add_row(row["budget"], str(row["experts_per_layer"]), fmt_bytes(row["predicted_bytes"]),
                      fmt(row["saved_fraction"], pct=True), fmt(row.get("heldout_coverage"), pct=True))
    for row in sv["coverage_targets"]:
        t.add_row(f"{row['coverage']}% cov.", f"{row['mean_experts_per_layer']:.1f}", fmt_bytes(row["predicted_bytes"]),
                  fmt(row["saved_fraction"], pct=True), "")
    return t


def _print_locality(con: Console, loc: dict[str, Any]) -> None:
    """SRP per segment length, cache hit rates per capacity, and the definitions."""
    t = Table(title=f"routing locality: SRP ({loc['tokens_used']} of {loc['tokens_in_log']} logged tokens)")
    t.add_column("segment m", justify="right")
    t.add_column("SRP", justify="right")
    t.add_column("|S|/k", justify="right")
    for m in loc["seg_lens"]:
        s = loc["srp"]["overall"][str(m)]
        t.add_row(str(m), fmt(s["srp"]), fmt(s["experts_ratio"]))
    con.print(t)
    sc = loc["sch"]
    t = Table(title=f"per-layer expert cache hit rate ({sc['tokens_used']} tokens, MoE layers "
              f"{', '.join(map(str, sc['moe_layers']))}, empty cache at each document start)")
    t.add_column("cache (experts)", justify="left")
    for cap in sc["capacities"]:
        t.add_column(str(cap), justify="right")
    for name, rows in hit_rate_rows(loc):
        t.add_row(name, *[fmt(v) for v in rows])
    con.print(t)
    for line in LOCALITY_DEFINITIONS.values():
        con.print(f"  {line}")


def _print_affinity(con: Console, af: dict[str, Any]) -> None:
    """Inter-layer affinity and the most affine expert chain."""
    ao = af["overall"]
    con.print(f"inter-layer affinity: normalised MI {fmt(ao['mean_nmi'])} (excess over independence "
              f"{fmt(ao['mean_nmi_excess'])}), lift of the best successor {fmt(ao['mean_lift'])}x")
    if af["chains"]:
        ch = af["chains"][0]
        con.print(f"most affine chain: {' > '.join(map(str, ch['experts'][:12]))}{' ...' if len(ch['experts']) > 12 else ''}")


def print_compare(c: dict[str, Any]) -> None:
    """The terminal summary of a comparison (`c`: the dict `compare` returns)."""
    con = Console()
    t = Table(title=f"cross-coverage (row's resident set at --keep {c['keep']:g}, as `moesift plan` keeps it, on "
                    "column's routes)")
    t.add_column("resident set of")
    for w in c["workloads"]:
        t.add_column(w, justify="right")
    for i, w in enumerate(c["workloads"]):
        t.add_row(w, *[fmt(x, pct=True) for x in c["cross_coverage"][i]])
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
