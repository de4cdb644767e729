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
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import assets
from ..apply.trim import trim
from ..core.errors import MoesiftError
from ..core.html import esc, figure, page, table
from ..core.io import OutputDir, json_default, write_text
from ..engines.choose import require
from ..engines.hf import hf_progress
from ..evaluation.evaluate import eval_model, prepare
from ..evaluation.sweep import sweep, sweep_sections
from ..evaluation.verify import verify
from ..record.tracer import trace
from ..selection.planner import plan as make_plan
from .demo_mlx import SOURCE, MlxPipeline
from .demo_parts import (
    MARKER,
    domain_row,
    eval_summary,
    fewer_experts,
    mark_output,
    model_card,
    plan_summary,
    settings,
    sweep_summary,
    workload_files,
    workloads_summary,
)
from .report import compare as compare_traces
from .report import report as report_traces

DEFAULT_OUT = "moesift-demo"
DEFAULT_OUT_MLX = "moesift-demo-mlx"
ENGINES = ("transformers", "mlx")


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
    engine: str = "transformers",
) -> dict[str, Any]:
    """Run the pipeline on the bundled reference models and workloads; write ``index.html`` and the
    artefacts into `out` (default ``./moesift-demo``, ``./moesift-demo-mlx`` with mlx); return the summary.
    `quick`: fewer prompts and sweep points (for tests). `model` / `domain`: the model and workload the plan,
    trim, eval and sweep use. `engine` "mlx": the Qwen3-MoE reference model converted by `mlx_lm.convert`
    (4-bit) and every stage run in mlx-lm (`moesift.surfaces.demo_mlx`)."""
    if engine not in ENGINES:
        raise MoesiftError(f"unknown engine {engine!r} for the demo; use one of {', '.join(ENGINES)}")
    if model not in assets.MODELS:
        raise MoesiftError(f"unknown reference model {model!r}; choose one of {', '.join(assets.MODELS)}")
    if domain not in assets.DOMAINS:
        raise MoesiftError(f"unknown workload {domain!r}; choose one of {', '.join(assets.DOMAINS)}")
    if engine == "mlx":
        require("mlx")
        if model != SOURCE:
            raise MoesiftError(f"the mlx demo converts {SOURCE} (softmax routing, which moesift records in mlx-lm); "
                               f"drop --model {model} or use --engine transformers")
    out_dir = Path(out if out is not None else (DEFAULT_OUT_MLX if engine == "mlx" else DEFAULT_OUT))
    _check_out(out_dir)
    run: Any = MlxPipeline(quick, domain) if engine == "mlx" else _Pipeline(quick, model, domain)
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
        res = _write(run)
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
        self.st = settings(quick)
        self.models = {name: assets.reference_model(name) for name in assets.MODELS}
        self.trace_files, self.eval_files = workload_files("trace"), workload_files("eval")

    def start(self, tmp: Path) -> None:
        """Mark `tmp` as a demo output; the summary so far."""
        self.tmp, st = tmp, self.st
        mark_output(tmp)
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
            self.res["models"][name].update(workloads_summary(rep, compare_traces(paths, keep=0.5, json=True)))
        self.clock.stage("reported and compared the workloads")

    def plan_trim_verify(self) -> Any:
        """Plan 50% of the chosen model's experts for the chosen workload, trim, and verify; the plan."""
        model, domain, tmp, st = self.model, self.domain, self.tmp, self.st
        mdir = self.models[model]
        plan_path = tmp / f"plan-{domain}-50.json"
        pl = make_plan(self.traces[model][domain], keep=0.5, model=mdir, out=plan_path, strategy="frequency")
        trimmed = trim(mdir, pl, tmp / f"{model}-{domain}-50", progress=False)
        ver = verify(mdir, trimmed, data=self.eval_files[domain], max_new_tokens=st["new_tokens"],
                     max_samples=st["verify_docs"], dtype="float32", progress=False)
        self.res["plan"] = plan_summary(plan_path, pl, trimmed, ver, ("top1_agreement", "max_abs_logit_diff",
                                                                      "max_rel_logit_diff", "generations_identical",
                                                                      "ok", "prompts", "tokens", "params_full",
                                                                      "params_trimmed"))
        self.clock.stage(f"planned 50% of {model}'s experts for {domain}, trimmed and verified")
        return pl

    def evaluate(self, pl: Any) -> None:
        """Perplexity on the plan's model (full, plan, fewer experts, top-p, the plan on every workload), then
        on the other model with its own plan."""
        model, domain, st, res, ef = self.model, self.domain, self.st, self.res, self.eval_files
        m, tok = self.loaded[model]
        ev = eval_model(m, ef[domain], plans=[pl], top_k=fewer_experts(res["models"][model]["card"]["top_k"]), top_p=st["top_p"], max_length=st["eval_len"],
                        max_samples=st["eval_docs"], tokenizer=tok, progress=False, json=True)
        res["eval"] = eval_summary(ev)
        cross = []
        for d in assets.DOMAINS:
            e = ev if d == domain else eval_model(m, ef[d], plans=[pl], max_length=st["eval_len"],
                                                  max_samples=st["eval_docs"], tokenizer=tok, progress=False, json=True)
            cross.append(domain_row(d, e))
        res["plan_on_each_domain"] = cross
        self.clock.stage("evaluated perplexity (full, plan, top-k, top-p, plan across domains)")
        res["other_models"] = {}
        for name in [n for n in self.models if n != model]:
            om, otok = self.loaded[name]
            opl = make_plan(self.traces[name][domain], keep=0.5, model=self.models[name], strategy="frequency")
            oks = fewer_experts(res["models"][name]["card"]["top_k"]) if st["other_top"] else []
            oev = eval_model(om, ef[domain], plans=[opl], top_k=oks, top_p=st["top_p"] if st["other_top"] else (),
                             max_length=st["eval_len"],
                             max_samples=st["eval_docs"], tokenizer=otok, progress=False, json=True)
            res["other_models"][name] = eval_summary(oev)
        self.clock.stage("evaluated the other reference model")
        self.loaded.clear()

    def sweep(self) -> None:
        """Strategies x budgets on the plan's model and workload."""
        model, domain, st, ef = self.model, self.domain, self.st, self.eval_files
        sw = sweep(self.models[model], self.traces[model][domain], ef[domain], keep=st["keep"],
                   strategy=st["strategies"], json=True, max_length=st["eval_len"], max_samples=st["eval_docs"],
                   timing=st["timing"], dtype="float32", progress=False)
        self.res["sweep"] = sweep_summary(sw, model, domain, ef[domain])
        self.clock.stage("swept strategies x budgets")



def _write(run: Any) -> dict[str, Any]:
    """The stage times, ``index.html`` and ``summary.json`` of a finished pipeline `run`; the summary."""
    res = run.res
    res["stages"] = run.clock.stages
    res["seconds"] = run.clock.total
    res["html"] = "index.html"
    write_text(run.tmp / "index.html", render_html(res))
    (run.tmp / "summary.json").write_text(_json.dumps(res, indent=2, default=json_default) + "\n")
    return res


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
    if res.get("engine", "").startswith("mlx"):
        intro = (f"<p>The moesift pipeline inside {esc(res['engine'])}: the bundled {esc(res['converted']['source'])} "
                 f"reference model converted by <code>mlx_lm.convert</code> ({res['converted']['q_bits']}-bit, group "
                 f"size {res['converted']['q_group_size']}), then trace, report, compare, plan, trim, verify, "
                 "evaluate and sweep of that mlx-lm model folder, all run in mlx-lm, on the four bundled workloads. "
                 "Everything here was computed offline by <code>moesift demo --engine mlx</code>.</p>")
    return page("moesift demo", parts, intro)
