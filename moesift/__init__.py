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
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `import moesift` stays light.
_LAZY = {
    "MoesiftError": "errors",
    "Trace": "tracefile",
    "load_trace": "tracefile",
    "merge": "tracefile",
    "adapter_for": "arch",
    "supported_model_types": "arch",
    "checkpoint_index": "checkpoint",
    "CheckpointIndex": "checkpoint",
    "load_model": "loading",
    "trace": "tracer",
    "show": "tracer",
    "merge_traces": "tracer",
    "export_trace": "tracer",
    "read_documents": "workload",
    "encode_prefix": "workload",
    "load_expert_trace": "wcer",
    "dump_expert_trace": "wcer",
    "plan": "plan",
    "Plan": "plan",
    "plan_diff": "plan",
    "check_plan_config": "plan",
    "strategy_scores": "plan",
    "restrict": "restrict",
    "trim": "trim",
    "load_resident": "resident",
    "load_trimmed": "resident",
    "load_offloaded": "offload",
    "generate": "offload",
    "verify_offloaded": "offload",
    "verify": "verify",
    "report": "report",
    "compare": "report",
    "analyse": "analysis",
    "experts_for_coverage": "analysis",
    "coverage_of": "analysis",
    "select_top": "analysis",
    "heldout_coverage": "analysis",
    "srp": "locality",
    "sch": "locality",
    "affinity_summary": "affinity",
    "eval_model": "evaluate",
    "sweep": "sweep",
    "measure_ttft": "sweep",
    "calibrate": "calibrate",
    "Calibration": "calibrate",
    "demo": "demo",
    "place": "place",
    "cache": "cachesim",
    "simulate_cache": "cachesim",
    "import_trace": "importers",
}


# Public functions that share their module's name (moesift.plan is the function in moesift/plan.py): when
# Python imports such a submodule it sets the package attribute to the module; keep the function there.
_SAME_NAME = {"plan", "trim", "restrict", "verify", "sweep", "demo", "place", "calibrate"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SAME_NAME and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'moesift' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
