"""Valid trace / plan / WCER files built in memory, and an in-process CLI runner, for the validation
and fuzz tests."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

L, E, K, F, N = 3, 8, 2, 2, 24


def trace_parts(seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, arrays) of a complete small moesift trace: every array the format defines."""
    rng = np.random.default_rng(seed)
    log = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(L)], axis=1)
    log = log.astype(np.int16)  # [N, L, K]
    counts = np.stack([np.bincount(log[:, li].ravel(), minlength=E) for li in range(L)]).astype(np.int64)
    folds = np.zeros((F, L, E), np.int64)
    for li in range(L):
        for n in range(N):
            folds[(n // 12) % F, li, log[n, li]] += 1
    co = np.zeros((L, E, E), np.int64)
    tr = np.zeros((L - 1, E, E), np.int64)
    for n in range(N):
        for li in range(L):
            a = log[n, li]
            co[li, a[0], a[1]] += 1
            co[li, a[1], a[0]] += 1
            if li + 1 < L:
                for i in a:
                    for j in log[n, li + 1]:
                        tr[li, i, j] += 1
    arrays = {
        "prefill_counts": counts,
        "decode_counts": np.zeros((L, E), np.int64),
        "fold_counts": folds,
        "weight_mass": counts * 0.5,
        "prob_mass": counts * 0.4 + 0.01,
        "selected_prob_mass": counts * 0.3,
        "coactivation": co,
        "transitions": tr,
        "saliency_sum": counts * 1.5,
        "saliency_count": counts.copy(),
        "routing_log": log,
        "doc_offsets": np.array([0, 12, N], np.int64),
        "log_phase": np.zeros(N, np.uint8),
    }
    meta = {
        "schema": "moesift-trace/1",
        "model": {"name": "synthetic", "model_type": "qwen3_moe", "config_hash": "abc", "moe_layers": [0, 1, 2],
                  "n_experts": E, "top_k": K, "n_shared": 0, "hash_layers": []},
        "workload": {"label": "w", "sources": [{"path": "w.txt", "sha256": "0"}], "token_sha256": "0",
                     "documents": 2, "prefill_tokens": N, "decode_tokens": 0},
        "tool": {"name": "moesift"},
        "extra": {},
    }
    return meta, arrays


def write_trace(path: Path, meta: Any, arrays: dict[str, np.ndarray], raw_meta: str | None = None) -> Path:
    """Write a trace file as is (no validation), metadata given as an object or a raw string."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"moesift": raw_meta if raw_meta is not None else json.dumps(meta)})
    return path


def wcer_dict(seed: int = 0) -> dict[str, Any]:
    meta, arrays = trace_parts(seed)
    from moesift.formats.trace import Trace
    from moesift.formats.wcer import dump_expert_trace

    return dump_expert_trace(Trace(model=meta["model"], workload=meta["workload"], arrays=arrays))


def plan_dict() -> dict[str, Any]:
    return {"schema": "moesift-plan/1",
            "model": {"name": "synthetic", "model_type": "qwen3_moe", "config_hash": "abc", "n_experts": E,
                      "top_k": K, "moe_layers": [0, 1, 2]},
            "layers": [{"layer": i, "moe_index": i, "resident": [0, 1, 2, 5]} for i in range(L)]}


def cli(args: list[str]) -> tuple[int, str, str]:
    """Run `moesift ARGS` in this process through the real entry point: (exit code, stdout, stderr)."""
    from moesift.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["moesift", *[str(a) for a in args]]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(code: int, out: str, err: str, what: str = "") -> None:
    """Exit 2 with exactly one `moesift: error:` line (the last, after any progress output; a usage error
    adds its `--help` hint) and no traceback."""
    assert "Traceback" not in err and "Traceback" not in out, f"{what}: traceback\n{err[-3000:]}"
    assert code == 2, f"{what}: exit {code}, stderr {err[-2000:]!r}"
    lines = [x for x in err.splitlines() if x.strip()]
    errs = [x for x in lines if "moesift: error:" in x]
    assert len(errs) == 1 and errs[0].startswith("moesift: error: "), f"{what}: stderr {err[-2000:]!r}"
    assert lines[-1] == errs[0] or lines[-1].startswith("(see `"), f"{what}: stderr {err[-2000:]!r}"
