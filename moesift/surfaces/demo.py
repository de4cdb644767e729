"""`moesift demo`: the whole pipeline on the bundled reference models and workloads, in one command.

1. Trace the four bundled workloads (code, prose, literature, math) on both reference models: Qwen3-MoE
   (softmax routing, no shared expert) and DeepSeek-V3 (shared expert, sigmoid routing with a selection
   bias, group-limited).
2. Report and compare them: experts needed for 90% of routes per workload, and cross-coverage (a
   workload's resident set at 50% of the experts, share of another workload's routes it covers).
3. Plan at 50% for one workload, trim a checkpoint to it, and verify the trimmed model against the
   full model restricted the same way.
4. Evaluate: perplexity of the full model, of the plan (on its own domain and on the others), with
   fewer experts per token (top-k/2, top-k/4) and with dynamic top-p routing.
5. Sweep strategies x budgets: bytes, perplexity, load time and time to first token.

Writes one self-contained HTML report (``index.html``) plus the traces, the plan and the trimmed
checkpoint into the output directory (default ``./moesift-demo``), and prints a short summary. The
directory is refused unless it is new, empty, or a previous demo output (it then is replaced).
No network is used.
"""

from __future__ import annotations

import json as _json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import assets
from ..apply.trim import trim
from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.html import esc, figure, page, table
from ..core.io import OutputDir, json_default, write_text
from ..engines.hf import hf_progress
from ..evaluation.evaluate import eval_model, prepare
from ..evaluation.sweep import sweep, sweep_sections
from ..evaluation.verify import verify
from ..formats.checkpoint import CheckpointIndex
from ..record.tracer import trace
from ..selection.planner import plan as make_plan
from .report import compare as compare_traces
from .report import report as report_traces

MARKER = ".moesift-demo"
DEFAULT_OUT = "moesift-demo"


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"trace_docs": 4, "trace_len": 64, "eval_docs": 1, "eval_len": 64, "keep": (0.5,),
                "strategies": ("frequency", "random"), "top_p": (0.5, 0.9), "other_top": False, "verify_docs": 1,
                "new_tokens": 4, "timing": True}
    return {"trace_docs": 64, "trace_len": 256, "eval_docs": 16, "eval_len": 256, "keep": (0.25, 0.5, 0.75),
            "strategies": ("frequency", "weighted", "saliency", "random"), "top_p": (0.5, 0.9), "other_top": True,
            "verify_docs": 2, "new_tokens": 8, "timing": True}


# ------------------------------------------------------------------------------------------------
# Output directory
# ------------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise MoesiftError(f"the parent of the demo output {str(out)!r} does not exist; create it first")
    if out.exists():
        if not out.is_dir():
            raise MoesiftError(f"{str(out)!r} exists and is not a directory; pass another --out")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise MoesiftError(
                f"{str(out)!r} exists and is not a moesift demo output; pass another --out (or remove it yourself)"
            )


# ------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------


def model_card(model_dir: Path) -> dict[str, Any]:
    """What the reference model's files say about it: architecture, size, validation perplexity."""
    cfg = _json.loads((model_dir / "config.json").read_text())

    spec = adapter_for(cfg).spec(cfg)
    idx = CheckpointIndex.build(model_dir)
    card: dict[str, Any] = {
        "name": model_dir.name, "model_type": cfg.get("model_type"), "moe_layers": len(spec.moe_layers),
        "n_experts": spec.n_experts, "top_k": spec.top_k, "n_shared": spec.n_shared, "scoring": spec.scoring,
        "n_group": spec.n_group, "bytes": int(idx.total_bytes()), "expert_bytes": int(idx.bytes_by_kind().get("expert", 0)),
        "hidden_size": cfg.get("hidden_size"), "vocab_size": cfg.get("vocab_size"),
    }
    tj = model_dir / "training.json"
    if tj.is_file():
        try:
            t = _json.loads(tj.read_text())
        except ValueError:
            t = {}
        hist = t.get("history") or []
        last = hist[-1] if hist else {}
        vl = last.get("valid_loss") or {}
        card["training"] = {k: t.get(k) for k in ("steps", "tokens_seen", "train_seconds", "final") if k in t}
        if vl:
            card["valid_ppl"] = {d: math.exp(v) for d, v in vl.items() if isinstance(v, (int, float))}
        for key in ("unigram_ppl", "unigram_valid_ppl", "baseline_ppl"):
            if isinstance(t.get(key), dict):
                card["unigram_ppl"] = t[key]
    readme = model_dir / "README.md"
    if readme.is_file():
        table = _cardtable(readme.read_text(encoding="utf-8", errors="replace"))
        if table:  # the model card's evaluation (validation split) wins over the training log
            card["valid_ppl"] = {d: v[0] for d, v in table.items()}
            card["unigram_ppl"] = {d: v[1] for d, v in table.items()}
            card["valid_source"] = "model card (validation split)"
    return card


def _cardtable(text: str) -> dict[str, tuple[float, float]]:
    """{domain: (model ppl, unigram ppl)} from the first 'domain docs tokens model ppl unigram ppl' table of
    a model card's validation section; {} when there is none."""
    lines = text.splitlines()
    out: dict[str, tuple[float, float]] = {}
    for i, line in enumerate(lines):
        if line.lower().startswith("validation split"):
            for row in lines[i + 2:]:
                parts = row.split()
                if len(parts) < 6:
                    break
                try:
                    out[parts[0]] = (float(parts[3]), float(parts[4]))
                except ValueError:
                    break
            break
    return out


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------


class _Clock:
    """Wall and CPU seconds per stage (CPU time says how much work a stage was on a busy machine)."""

    def __init__(self, say: Any) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.cpu_last = time.process_time()
        self.stages: list[dict[str, Any]] = []
        self.say = say

    def stage(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.stages.append({"stage": name, "seconds": now - self.last, "cpu_seconds": cpu - self.cpu_last})
        self.last, self.cpu_last = now, cpu
        self.say(f"[{now - self.t0:6.1f}s] {name}")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def demo(
    out: str | os.PathLike | None = None,
    json: bool = False,
    quick: bool = False,
    progress: bool = True,
    model: str = "qwen3moe-ref",
    domain: str = "code",
) -> dict[str, Any]:
    """Run the pipeline on the bundled reference models and workloads; write ``index.html`` and the
    artefacts into `out` (default ``./moesift-demo``); return the summary. `quick`: fewer prompts and sweep
    points (for tests). `model` / `domain`: the model and workload the plan, trim, eval and sweep use."""
    if model not in assets.MODELS:
        raise MoesiftError(f"unknown reference model {model!r}; choose one of {', '.join(assets.MODELS)}")
    if domain not in assets.DOMAINS:
        raise MoesiftError(f"unknown workload {domain!r}; choose one of {', '.join(assets.DOMAINS)}")
    out_dir = Path(out if out is not None else DEFAULT_OUT)
    _check_out(out_dir)
    run = _Pipeline(quick, model, domain)
    verbose = progress and not json

    def say(msg: str) -> None:
        if verbose:
            sys.stderr.write(msg + "\n")

    run.clock = _Clock(say)
    dest = OutputDir(out_dir, force=True)  # replaces a previous demo output only (its marker file says so)
    tmp = dest.begin()
    try:
        run.start(tmp)
        run.trace_all()
        run.report_all()
        pl = run.plan_trim_verify()
        run.evaluate(pl)
        run.sweep()
        res = run.write()
        dest.commit()
    finally:
        dest.abort()
    res["out"] = str(out_dir)
    res["html"] = str(out_dir / "index.html")
    if not json:
        print_summary(res)
    return res


class _Pipeline:
    """The demo's stages on the bundled models and workloads, writing into `tmp`; the summary in `res`."""

    clock: _Clock

    def __init__(self, quick: bool, model: str, domain: str) -> None:
        self.quick, self.model, self.domain = quick, model, domain
        self.st = _settings(quick)
        self.models = {name: assets.reference_model(name) for name in assets.MODELS}
        self.trace_files = {d: assets.workload(d, "trace") for d in assets.DOMAINS}
        self.eval_files = {d: assets.workload(d, "eval") for d in assets.DOMAINS}

    def start(self, tmp: Path) -> None:
        """Mark `tmp` as a demo output; the summary so far."""
        self.tmp, st = tmp, self.st
        (tmp / MARKER).write_text("moesift demo output; `moesift demo` may replace this directory\n")
        (tmp / "traces").mkdir()
        self.res: dict[str, Any] = {"schema": "moesift-demo/1", "quick": self.quick,
                                    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()},
                                    "plan_model": self.model, "plan_domain": self.domain, "models": {}}
        self.loaded: dict[str, tuple[Any, Any]] = {}
        self.traces: dict[str, dict[str, Path]] = {}

    def trace_all(self) -> None:
        """Trace every workload on every reference model (saliency for the plan's model and workload)."""
        st = self.st
        for name, mdir in self.models.items():
            card = model_card(mdir)
            with hf_progress(False):  # the demo prints its own progress, one line per stage
                m, tok = prepare(mdir, device="cpu", dtype="float32")
            self.loaded[name] = (m, tok)
            self.traces[name] = {}
            for d in assets.DOMAINS:
                p = self.tmp / "traces" / f"{name}.{d}.trace"
                trace(m, self.trace_files[d], out=p, label=d, max_samples=st["trace_docs"], max_length=st["trace_len"],
                      saliency=(name == self.model and d == self.domain and "saliency" in st["strategies"]),
                      progress=False, tokenizer=tok)
                self.traces[name][d] = p
            self.res["models"][name] = {"card": card}
            self.clock.stage(f"traced 4 workloads on {name}")

    def report_all(self) -> None:
        """Report and compare the four workloads of each model."""
        for name, mdir in self.models.items():
            paths = [self.traces[name][d] for d in assets.DOMAINS]
            rep = report_traces(paths, model=mdir, json=True, locality_tokens=None, cache_tokens=None)
            cmp_ = compare_traces(paths, keep=0.5, json=True)
            mres = self.res["models"][name]
            mres["report"] = _report_summary(rep)
            mres["compare"] = {k: cmp_[k] for k in ("workloads", "keep", "experts_kept", "cross_coverage",
                                                    "jaccard", "target", "union") if k in cmp_}
            cc = cmp_["cross_coverage"]
            n = len(cc)
            mres["self_coverage"] = sum(cc[i][i] for i in range(n)) / n
            mres["cross_coverage_mean"] = sum(cc[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        self.clock.stage("reported and compared the workloads")

    def plan_trim_verify(self) -> Any:
        """Plan 50% of the chosen model's experts for the chosen workload, trim, and verify; the plan."""
        model, domain, tmp, st = self.model, self.domain, self.tmp, self.st
        mdir = self.models[model]
        plan_path = tmp / f"plan-{domain}-50.json"
        pl = make_plan(self.traces[model][domain], keep=0.5, model=mdir, out=plan_path, strategy="frequency")
        trimmed = trim(mdir, pl, tmp / f"{model}-{domain}-50", progress=False)
        trimmed_bytes = sum(f.stat().st_size for f in Path(trimmed).glob("*.safetensors"))
        ver = verify(mdir, trimmed, data=self.eval_files[domain], max_new_tokens=st["new_tokens"],
                     max_samples=st["verify_docs"], dtype="float32", progress=False)
        self.res["plan"] = {"file": plan_path.name, "keep": 0.5, "strategy": "frequency", "predictions": pl.predictions,
                            "trimmed_dir": Path(trimmed).name, "trimmed_safetensors_bytes": trimmed_bytes,
                            "verify": {k: ver.get(k) for k in ("top1_agreement", "max_abs_logit_diff",
                                                               "max_rel_logit_diff", "generations_identical", "ok",
                                                               "prompts", "tokens", "params_full", "params_trimmed")
                                       if k in ver}}
        self.clock.stage(f"planned 50% of {model}'s experts for {domain}, trimmed and verified")
        return pl

    def evaluate(self, pl: Any) -> None:
        """Perplexity on the plan's model (full, plan, fewer experts, top-p, the plan on every workload), then
        on the other model with its own plan."""
        model, domain, st, res, ef = self.model, self.domain, self.st, self.res, self.eval_files
        m, tok = self.loaded[model]
        spec_k = res["models"][model]["card"]["top_k"]
        ks = sorted({k for k in (spec_k // 2, spec_k // 4) if k >= 1}, reverse=True)
        ev = eval_model(m, ef[domain], plans=[pl], top_k=ks, top_p=st["top_p"], max_length=st["eval_len"],
                        max_samples=st["eval_docs"], tokenizer=tok, progress=False, json=True)
        res["eval"] = _eval_summary(ev)
        cross = []
        for d in assets.DOMAINS:
            e = ev if d == domain else eval_model(m, ef[d], plans=[pl], max_length=st["eval_len"],
                                                  max_samples=st["eval_docs"], tokenizer=tok, progress=False, json=True)
            cross.append({"domain": d, "ppl_full": e["results"][0]["ppl"], "ppl_plan": e["results"][1]["ppl"],
                          "ratio": e["results"][1]["ppl_ratio"]})
        res["plan_on_each_domain"] = cross
        self.clock.stage("evaluated perplexity (full, plan, top-k, top-p, plan across domains)")
        res["other_models"] = {}
        for name in [n for n in self.models if n != model]:
            om, otok = self.loaded[name]
            opl = make_plan(self.traces[name][domain], keep=0.5, model=self.models[name], strategy="frequency")
            ocard = res["models"][name]["card"]
            oks = sorted({k for k in (ocard["top_k"] // 2, ocard["top_k"] // 4) if k >= 1}, reverse=True)
            if not st["other_top"]:
                oks = []
            oev = eval_model(om, ef[domain], plans=[opl], top_k=oks, top_p=st["top_p"] if st["other_top"] else (),
                             max_length=st["eval_len"],
                             max_samples=st["eval_docs"], tokenizer=otok, progress=False, json=True)
            res["other_models"][name] = _eval_summary(oev)
        self.clock.stage("evaluated the other reference model")
        self.loaded.clear()

    def sweep(self) -> None:
        """Strategies x budgets on the plan's model and workload."""
        model, domain, st, ef = self.model, self.domain, self.st, self.eval_files
        sw = sweep(self.models[model], self.traces[model][domain], ef[domain], keep=st["keep"],
                   strategy=st["strategies"], json=True, max_length=st["eval_len"], max_samples=st["eval_docs"],
                   timing=st["timing"], dtype="float32", progress=False)
        for p in sw["points"]:
            p.pop("plan", None)
        sw["traces"] = [f"traces/{model}.{domain}.trace"]
        sw["data"] = [f"bundled {domain} held-out texts ({ef[domain].name})"]
        self.res["sweep"] = sw
        self.clock.stage("swept strategies x budgets")

    def write(self) -> dict[str, Any]:
        """The stage times, ``index.html`` and ``summary.json``; the summary."""
        res = self.res
        res["stages"] = self.clock.stages
        res["seconds"] = self.clock.total
        res["html"] = "index.html"
        write_text(self.tmp / "index.html", render_html(res))
        (self.tmp / "summary.json").write_text(_json.dumps(res, indent=2, default=json_default) + "\n")
        return res


def _report_summary(rep: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": rep.get("overall"), "tokens": rep.get("tokens")}
    if rep.get("workloads"):
        out["workloads"] = [{k: w.get(k) for k in ("label", "mean_fraction_for_90", "in_sample_coverage", "heldout_coverage")
                             if k in w} for w in rep["workloads"]]
    out["experts_for_90"] = [s["experts_for_coverage"]["90"] for s in rep.get("layers", [])]
    if rep.get("coverage_curves") is not None:
        out["coverage_curves"] = rep["coverage_curves"]
    if rep.get("savings"):
        out["savings"] = {k: rep["savings"].get(k) for k in ("total_bytes", "expert_bytes", "non_expert_bytes")}
    return out


def _eval_summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {"data": ev["data"], "tokens": ev["tokens"], "windows": ev["windows"],
            "results": [{k: r.get(k) for k in ("name", "kind", "k", "p", "ppl", "ppl_ratio", "mean_active")
                         if r.get(k) is not None} for r in ev["results"]]}


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def print_summary(res: dict[str, Any]) -> None:
    """The demo's summary on stdout (`res`: the dict `demo` returns)."""
    c = Console()
    c.print(f"[bold]moesift demo[/bold] ({res['seconds']:.0f} s){' quick' if res['quick'] else ''}: report in {res['html']}")
    for name, mres in res["models"].items():
        card = mres["card"]
        vp, ug = card.get("valid_ppl"), card.get("unigram_ppl") or {}
        c.print(f"  {name}: {card['model_type']}, {card['moe_layers']} MoE layers x {card['n_experts']} experts, "
                f"top-{card['top_k']}, {card['n_shared']} shared; "
                + (f"validation ppl {', '.join(f'{d} {v:.1f}' + (f' (unigram {ug[d]:.0f})' if d in ug else '') for d, v in vp.items())}"
                   if vp else "no validation figures"))
        c.print(f"    coverage at 50% of experts: own workload {mres['self_coverage']:.3f}, other workloads "
                f"{mres['cross_coverage_mean']:.3f}")
    p = res["plan"]
    v = p["verify"]
    c.print(f"  plan: 50% of {res['plan_model']}'s experts for {res['plan_domain']}: predicted "
            f"{p['predictions'].get('bytes', 0) / 2**20:.2f} MiB of {p['predictions'].get('bytes_full', 0) / 2**20:.2f} MiB, "
            f"held-out coverage {p['predictions'].get('heldout_coverage') or float('nan'):.3f}; trimmed and verified: "
            f"top-1 agreement {v.get('top1_agreement')}, generations identical {v.get('generations_identical')}")
    rows = ", ".join(f"{r['name']} {r['ppl']:.2f} ({r['mean_active']:.2f} experts)" for r in res["eval"]["results"])
    c.print(f"  perplexity on held-out {res['plan_domain']}: {rows}")
    c.print("  the plan on each domain (ppl x full): "
            + ", ".join(f"{x['domain']} {x['ratio']:.3f}" for x in res["plan_on_each_domain"]))
    front = [p for p in res["sweep"]["points"] if p["pareto_quality"]]
    c.print("  sweep front (bytes, ppl): " + ", ".join(
        f"{p['strategy']} {p['keep']:g}: {p['bytes'] / 2**20:.2f} MiB, x{p['ppl_ratio']:.3f}" for p in front))


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_html(res: dict[str, Any]) -> str:
    """The demo report: one page, plotly.js inlined once."""
    import plotly.graph_objects as go

    parts: list[str] = []
    # models
    rows = []
    for name, mres in res["models"].items():
        c = mres["card"]
        vp = c.get("valid_ppl") or {}
        ug = c.get("unigram_ppl") or {}
        rows.append([name, c["model_type"], c["moe_layers"], c["n_experts"], c["top_k"], c["n_shared"], c["scoring"],
                     f"{c['bytes'] / 2**20:.2f}", "; ".join(f"{d} {v:.1f}" + (f" (unigram {ug[d]:.1f})" if d in ug else "")
                                                          for d, v in vp.items())])
    parts.append("<h2>Reference models</h2>" + table(
        ["model", "family", "MoE layers", "experts", "top-k", "shared", "router", "MiB", "validation perplexity"], rows))
    # routing per workload
    parts.append("<h2>Routing is workload-conditioned</h2><p>Cross-coverage: the resident set chosen for the row "
                 "workload (50% of the experts of every MoE layer, most selected first, as <code>moesift plan --keep 0.5"
                 "</code> keeps it: whole groups for the group-limited DeepSeek-V3 router) and the share of the column "
                 "workload's routes it covers, mean over layers. The diagonal is self-coverage.</p>")
    for name, mres in res["models"].items():
        cm = mres["compare"]
        w = cm["workloads"]
        fig = go.Figure(go.Heatmap(z=cm["cross_coverage"], x=w, y=w, colorscale="Blues", zmin=0, zmax=1,
                                   text=[[f"{v:.3f}" for v in row] for row in cm["cross_coverage"]], texttemplate="%{text}"))
        fig.update_layout(title=f"{name}: cross-coverage at 50% (self {mres['self_coverage']:.3f}, cross "
                                f"{mres['cross_coverage_mean']:.3f})", xaxis_title="routes of", yaxis_title="resident set of",
                          height=420, width=560)
        fig.update_yaxes(autorange="reversed")  # first workload on top: the diagonal runs top-left to bottom-right
        parts.append(figure(fig, f"cc-{name}"))
        wl = mres["report"].get("workloads") or []
        if wl:
            parts.append(table(["workload", "mean fraction of experts for 90% of routes"],
                                [[x["label"], _f(x.get("mean_fraction_for_90"))] for x in wl]))
    # plan / trim / verify
    p = res["plan"]
    pr = p["predictions"]
    v = p["verify"]
    parts.append(f"<h2>Plan, trim, verify</h2><p>{esc(res['plan_model'])}, workload {esc(res['plan_domain'])}: "
                 f"{pr.get('experts_resident')} of {pr.get('experts_total')} experts resident (50% per MoE layer, "
                 f"frequency). Predicted checkpoint {pr.get('bytes', 0) / 2**20:.2f} MiB of "
                 f"{pr.get('bytes_full', 0) / 2**20:.2f} MiB; trimmed safetensors on disk {p['trimmed_safetensors_bytes'] / 2**20:.2f} MiB. "
                 f"Coverage in-sample {_f(pr.get('coverage'))}, held-out {_f(pr.get('heldout_coverage'))}.</p>"
                 + table(["top-1 agreement", "max |logit diff|", "max relative diff", "greedy generations identical"],
                          [[_f(v.get("top1_agreement")), _f(v.get("max_abs_logit_diff"), 8),
                            _f(v.get("max_rel_logit_diff"), 8), v.get("generations_identical")]]))
    # quality
    ev = res["eval"]
    parts.append(f"<h2>Quality</h2><p>Token-weighted perplexity on {ev['tokens']:,} held-out {esc(res['plan_domain'])} "
                 "tokens; mean routed experts active per token and MoE layer beside each.</p>"
                 + table(["setting", "perplexity", "x full", "active experts / token"],
                          [[r["name"], _f(r["ppl"]), _f(r.get("ppl_ratio")), _f(r.get("mean_active"), 2)] for r in ev["results"]]))
    parts.append("<p>The plan chosen for one workload, on every workload's held-out text:</p>" + table(
        ["domain", "perplexity full", "perplexity plan", "x full"],
        [[x["domain"], _f(x["ppl_full"]), _f(x["ppl_plan"]), _f(x["ratio"])] for x in res["plan_on_each_domain"]]))
    for name, oev in res.get("other_models", {}).items():
        parts.append(f"<p>{esc(name)} on the same text (plan: 50% for {esc(res['plan_domain'])}, its own trace):</p>" + table(
            ["setting", "perplexity", "x full", "active experts / token"],
            [[r["name"], _f(r["ppl"]), _f(r.get("ppl_ratio")), _f(r.get("mean_active"), 2)] for r in oev["results"]]))
    parts += sweep_sections(res["sweep"])
    parts.append("<h2>Run</h2>" + table(["stage", "seconds", "CPU seconds"],
                                         [[s["stage"], f"{s['seconds']:.1f}", f"{s['cpu_seconds']:.1f}"] for s in res["stages"]])
                 + f"<p>Total {res['seconds']:.1f} s{' (quick settings)' if res['quick'] else ''}.</p>")
    intro = ("<p>The moesift pipeline on two small trained reference MoE models and four bundled workloads: trace, "
             "report, compare, plan, trim, verify, evaluate and sweep. Everything here was computed offline by "
             "<code>moesift demo</code>.</p>")
    return page("moesift demo", parts, intro)
