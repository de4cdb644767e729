"""What both demo pipelines (transformers, and mlx-lm with `--engine mlx`) share: their settings, the output
directory's marker, the reference model's card and the summaries of reports and evaluations."""

from __future__ import annotations

import json as _json
import math
from pathlib import Path
from typing import Any

from .. import assets
from ..arch.registry import adapter_for
from ..formats.checkpoint import CheckpointIndex

MARKER = ".moesift-demo"


def mark_output(tmp: Path) -> None:
    """Mark `tmp` as a demo output (`moesift demo` may replace such a directory) and make its traces folder."""
    (tmp / MARKER).write_text("moesift demo output; `moesift demo` may replace this directory\n")
    (tmp / "traces").mkdir()


def workload_files(kind: str) -> dict[str, Path]:
    """The bundled workload file of every domain, of split `kind` ("trace" or "eval")."""
    return {d: assets.workload(d, kind) for d in assets.DOMAINS}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"trace_docs": 4, "trace_len": 64, "eval_docs": 1, "eval_len": 64, "keep": (0.5,),
                "strategies": ("frequency", "random"), "top_p": (0.5, 0.9), "other_top": False, "verify_docs": 1,
                "new_tokens": 4, "timing": True}
    return {"trace_docs": 64, "trace_len": 256, "eval_docs": 16, "eval_len": 256, "keep": (0.25, 0.5, 0.75),
            "strategies": ("frequency", "weighted", "saliency", "random"), "top_p": (0.5, 0.9), "other_top": True,
            "verify_docs": 2, "new_tokens": 8, "timing": True}


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


def report_summary(rep: dict[str, Any]) -> dict[str, Any]:
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


def eval_summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {"data": ev["data"], "tokens": ev["tokens"], "windows": ev["windows"],
            "results": [{k: r.get(k) for k in ("name", "kind", "k", "p", "ppl", "ppl_ratio", "mean_active")
                         if r.get(k) is not None} for r in ev["results"]]}


def workloads_summary(rep: dict[str, Any], cmp_: dict[str, Any]) -> dict[str, Any]:
    """A model's report and comparison of its workloads, with the mean coverage of a workload's own set and of
    the other workloads' sets."""
    cc = cmp_["cross_coverage"]
    n = len(cc)
    return {"report": report_summary(rep),
            "compare": {k: cmp_[k] for k in ("workloads", "keep", "experts_kept", "cross_coverage", "jaccard",
                                             "target", "union") if k in cmp_},
            "self_coverage": sum(cc[i][i] for i in range(n)) / n,
            "cross_coverage_mean": sum(cc[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))}


def plan_summary(plan_path: Path, pl: Any, trimmed: Path, ver: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The demo's plan, the bytes of its trimmed safetensors and the figures `keys` of its verify."""
    return {"file": plan_path.name, "keep": 0.5, "strategy": "frequency", "predictions": pl.predictions,
            "trimmed_dir": Path(trimmed).name,
            "trimmed_safetensors_bytes": sum(f.stat().st_size for f in Path(trimmed).glob("*.safetensors")),
            "verify": {k: ver.get(k) for k in keys if k in ver}}


def fewer_experts(top_k: int) -> list[int]:
    """The top-k values the demo evaluates below the model's own: half and a quarter of it, at least 1."""
    return sorted({k for k in (top_k // 2, top_k // 4) if k >= 1}, reverse=True)


def domain_row(domain: str, ev: dict[str, Any]) -> dict[str, Any]:
    """Full and plan perplexity of an eval with one plan, on one workload."""
    return {"domain": domain, "ppl_full": ev["results"][0]["ppl"], "ppl_plan": ev["results"][1]["ppl"],
            "ratio": ev["results"][1]["ppl_ratio"]}


def sweep_summary(sw: dict[str, Any], trace_name: str, domain: str, eval_file: Path) -> dict[str, Any]:
    """A sweep result for the demo's summary: points without their plans, inputs named as the page shows them."""
    for p in sw["points"]:
        p.pop("plan", None)
    sw["traces"] = [f"traces/{trace_name}.{domain}.trace"]
    sw["data"] = [f"bundled {domain} held-out texts ({eval_file.name})"]
    return sw
