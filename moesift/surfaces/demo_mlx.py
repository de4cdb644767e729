"""`moesift demo --engine mlx`: the demo's pipeline inside mlx-lm.

The bundled Qwen3-MoE reference model is converted by mlx-lm's own converter (`mlx_lm.convert`, 4-bit affine,
group size 64) into the demo's output directory; then every stage runs on that mlx-lm model folder, in mlx-lm:
trace the four workloads (`trace --engine mlx`, with saliency for the plan's workload), report and compare them,
plan half the experts of every layer (the same count in every layer, as mlx-lm builds one expert count), trim
the MLX folder, verify the trim against the MLX model restricted to the plan, evaluate perplexity (full, plan,
top-k, top-p, the plan on every workload) and sweep strategies x budgets (bytes of the trimmed MLX checkpoint,
perplexity and tokens per second). The summary has the keys of the transformers demo, so the page is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import assets
from ..apply.trim import trim
from ..core.errors import MoesiftError
from ..engines.mlx import mlx_version
from ..engines.mlx_native import quantization_note
from ..evaluation.evaluate import eval_model
from ..evaluation.sweep import sweep
from ..evaluation.verify import verify
from ..formats.checkpoint import CheckpointIndex
from ..record.tracer import trace
from ..selection.planner import plan as make_plan
from .demo_parts import (
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

SOURCE = "qwen3moe-ref"  # the reference model mlx-lm records: softmax routing
CONVERT = {"quantize": True, "q_bits": 4, "q_group_size": 64}


def convert_reference(src: Path, dest: Path) -> None:
    """`mlx_lm.convert` of the transformers model folder `src` into the new folder `dest`, 4-bit."""
    from mlx_lm import convert

    try:
        convert(str(src), str(dest), **CONVERT)
    except Exception as e:  # mlx-lm raises ValueError / TypeError for models it cannot convert
        raise MoesiftError(f"mlx_lm.convert could not convert {str(src)!r}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}") from None


class MlxPipeline:
    """The demo's stages in mlx-lm, writing into `tmp`; the summary in `res` (the keys of the transformers
    demo's summary, plus ``engine``)."""

    clock: Any

    def __init__(self, quick: bool, domain: str) -> None:
        self.quick, self.domain, self.model = quick, domain, SOURCE
        self.st = {**settings(quick), "strategies": ("frequency", "saliency", "random")}
        self.source = assets.reference_model(SOURCE)
        self.trace_files, self.eval_files = workload_files("trace"), workload_files("eval")

    def start(self, tmp: Path) -> None:
        """Mark `tmp` as a demo output, and convert the reference model into it with mlx-lm's converter."""
        self.tmp, st = tmp, self.st
        mark_output(tmp)
        self.name = f"{SOURCE}-mlx-4bit"
        self.mdir = tmp / self.name
        convert_reference(self.source, self.mdir)
        self.res: dict[str, Any] = {"schema": "moesift-demo/1", "quick": self.quick, "engine": f"mlx-lm {mlx_version()}",
                                    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()},
                                    "plan_model": self.name, "plan_domain": self.domain, "models": {},
                                    "converted": {"source": SOURCE, "with": "mlx_lm.convert", **CONVERT}}
        self.traces: dict[str, Path] = {}
        self.clock.stage(f"converted {SOURCE} with mlx_lm.convert (4-bit) into {self.name}")

    def card(self) -> dict[str, Any]:
        """The MLX folder's card: its own architecture and bytes, the source model's validation figures."""
        card = model_card(self.mdir)
        src = model_card(self.source)
        for k in ("valid_ppl", "unigram_ppl", "valid_source", "training"):
            if k in src:
                card[k] = src[k]
        card["weights"] = quantization_note(CheckpointIndex.build(self.mdir).config)
        card["source_bytes"] = src["bytes"]
        return card

    def trace_all(self) -> None:
        """Trace every workload on the MLX folder in mlx-lm (saliency for the plan's workload)."""
        st = self.st
        for d in assets.DOMAINS:
            p = self.tmp / "traces" / f"{self.name}.{d}.trace"
            trace(self.mdir, self.trace_files[d], out=p, label=d, max_samples=st["trace_docs"],
                  max_length=st["trace_len"], saliency=(d == self.domain), progress=False, engine="mlx")
            self.traces[d] = p
        self.res["models"][self.name] = {"card": self.card()}
        self.clock.stage(f"traced 4 workloads on {self.name} in mlx-lm")

    def report_all(self) -> None:
        """Report and compare the four workloads."""
        paths = [self.traces[d] for d in assets.DOMAINS]
        rep = report_traces(paths, model=self.mdir, json=True, locality_tokens=None, cache_tokens=None)
        self.res["models"][self.name].update(workloads_summary(rep, compare_traces(paths, keep=0.5, json=True)))
        self.clock.stage("reported and compared the workloads")

    def plan_trim_verify(self) -> Any:
        """Plan 50% of the experts of every layer for the chosen workload, trim the MLX folder, verify in mlx-lm."""
        domain, tmp, st = self.domain, self.tmp, self.st
        plan_path = tmp / f"plan-{domain}-50.json"
        pl = make_plan(self.traces[domain], keep=0.5, model=self.mdir, uniform=True, out=plan_path)
        trimmed = trim(self.mdir, pl, tmp / f"{self.name}-{domain}-50", progress=False)
        ver = verify(self.mdir, trimmed, data=self.eval_files[domain], max_new_tokens=st["new_tokens"],
                     max_samples=st["verify_docs"], progress=False)
        self.res["plan"] = plan_summary(plan_path, pl, trimmed, ver, ("top1_agreement", "max_abs_logit_diff",
                                                                      "max_rel_logit_diff", "generations_identical",
                                                                      "ok", "prompts", "tokens", "engine"))
        self.clock.stage(f"planned 50% of the experts for {domain}, trimmed the MLX folder and verified in mlx-lm")
        return pl

    def evaluate(self, pl: Any) -> None:
        """Perplexity in mlx-lm: full, plan, fewer experts, top-p; the plan on every workload."""
        domain, st, res, ef = self.domain, self.st, self.res, self.eval_files
        ks = fewer_experts(res["models"][self.name]["card"]["top_k"])
        kw = dict(max_length=st["eval_len"], max_samples=st["eval_docs"], progress=False, json=True, engine="mlx")
        ev = eval_model(self.mdir, ef[domain], plans=[pl], top_k=ks, top_p=st["top_p"], **kw)
        res["eval"] = eval_summary(ev)
        res["eval"]["tokens_per_s"] = {r["name"]: r.get("tokens_per_s") for r in ev["results"]}
        cross = []
        for d in ([domain] if self.quick else assets.DOMAINS):  # quick: the plan on its own workload only
            e = ev if d == domain else eval_model(self.mdir, ef[d], plans=[pl], **kw)
            cross.append(domain_row(d, e))
        res["plan_on_each_domain"] = cross
        res["other_models"] = {}
        self.clock.stage("evaluated perplexity in mlx-lm (full, plan, top-k, top-p, plan across domains)")

    def sweep(self) -> None:
        """Strategies x budgets in mlx-lm: bytes of the MLX trim, perplexity, tokens per second."""
        domain, st, ef = self.domain, self.st, self.eval_files
        sw = sweep(self.mdir, self.traces[domain], ef[domain], keep=st["keep"], strategy=st["strategies"], json=True,
                   max_length=st["eval_len"], max_samples=st["eval_docs"], uniform=True, progress=False,
                   engine="mlx")
        self.res["sweep"] = sweep_summary(sw, self.name, domain, ef[domain])
        self.clock.stage("swept strategies x budgets in mlx-lm")
