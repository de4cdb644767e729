"""moesift: shrink a Mixture-of-Experts model to the experts a workload uses, and prove it.

Public API (each CLI command is one of these functions, with the same arguments)::

    trace, show, merge_traces, export_trace      # record and inspect routing
    report, compare                              # analyse traces
    plan, trim, restrict, load_resident, verify  # choose resident experts, shrink, prove
    load_offloaded, generate                     # full-model outputs, non-resident experts in host memory
    eval_model, sweep, demo                      # quality across budgets
    place, cache                                 # expert parallelism and offloading
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.version import __version__ as __version__

# name -> module that defines it; imported on first use so `import moesift` stays light. Stage packages
# (core, arch, formats, analysis, engines, record, selection, apply, evaluation, surfaces) never share a
# name with a public function, so `moesift.plan` is always the function.
_LAZY = {
    "MoesiftError": "core.errors",
    "Trace": "formats.trace",
    "load_trace": "formats.trace",
    "merge": "formats.trace",
    "adapter_for": "arch.registry",
    "supported_model_types": "arch.registry",
    "checkpoint_index": "formats.checkpoint",
    "CheckpointIndex": "formats.checkpoint",
    "load_model": "engines.hf",
    "trace": "record.tracer",
    "show": "record.tracer",
    "merge_traces": "record.tracer",
    "export_trace": "record.tracer",
    "read_documents": "formats.workload",
    "encode_prefix": "formats.workload",
    "load_expert_trace": "formats.trace",
    "dump_expert_trace": "formats.wcer",
    "plan": "selection.planner",
    "Plan": "formats.plan",
    "plan_diff": "formats.plan",
    "check_plan_config": "formats.plan",
    "strategy_scores": "selection.planner",
    "restrict": "engines.restrict",
    "trim": "apply.trim",
    "load_resident": "apply.resident",
    "load_trimmed": "apply.resident",
    "load_offloaded": "apply.offload",
    "generate": "apply.offload",
    "verify_offloaded": "evaluation.verify",
    "verify": "evaluation.verify",
    "report": "surfaces.report",
    "compare": "surfaces.report",
    "analyse": "analysis.stats",
    "experts_for_coverage": "analysis.stats",
    "coverage_of": "analysis.stats",
    "select_top": "analysis.stats",
    "heldout_coverage": "analysis.stats",
    "srp": "analysis.locality",
    "sch": "analysis.locality",
    "affinity_summary": "analysis.affinity",
    "eval_model": "evaluation.evaluate",
    "sweep": "evaluation.sweep",
    "measure_ttft": "evaluation.sweep",
    "calibrate": "selection.calibrate",
    "Calibration": "formats.calibration",
    "demo": "surfaces.demo",
    "place": "selection.place",
    "cache": "analysis.cachesim",
    "simulate_cache": "analysis.cachesim",
    "import_trace": "record.importers",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'moesift' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted([*_LAZY, "__version__"])
