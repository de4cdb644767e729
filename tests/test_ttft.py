"""Time to first token is measured one way in the sweep and the demo: warm-up runs, then the median of
timed runs; the pages say so."""

from __future__ import annotations

import time

import torch

from moesift.evaluation.sweep import TTFT_REPEATS, TTFT_WARMUP, measure_ttft


class _SlowFirst(torch.nn.Module):
    """A model whose first forwards pay a one-off cost (as freshly loaded weights do)."""

    def __init__(self, cold: int, cold_s: float, warm_s: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.cold, self.cold_s, self.warm_s = 0, cold, cold_s, warm_s

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        time.sleep(self.cold_s if self.calls <= self.cold else self.warm_s)
        return type("Out", (), {"logits": torch.zeros(1, input_ids.shape[1], 5)})()


def test_warm_up_runs_are_not_timed():
    m = _SlowFirst(cold=2, cold_s=0.2, warm_s=0.002)
    r = measure_ttft(m, torch.zeros(1, 4, dtype=torch.long), warmup=2, repeats=5)
    assert m.calls == 7 and r["ttft_runs"] == 5 and r["ttft_warmup"] == 2
    assert r["ttft_s"] < 0.1 and r["ttft_first_s"] >= 0.2  # the cold runs are reported apart, not in the median
    assert r["ttft_min_s"] <= r["ttft_s"] <= r["ttft_max_s"]
    # without warm-up the same model's median would be dominated by nothing but the timed runs themselves
    m = _SlowFirst(cold=2, cold_s=0.2, warm_s=0.002)
    r0 = measure_ttft(m, torch.zeros(1, 4, dtype=torch.long), warmup=0, repeats=3)
    assert r0["ttft_s"] >= 0.2  # what the old single-pass median reported: two of three runs cold
    assert TTFT_WARMUP >= 1 and TTFT_REPEATS >= 5


def test_sweep_and_demo_pages_say_how_timings_were_measured():
    from moesift.evaluation.sweep import sweep_sections

    pt = {"strategy": "full", "keep": 1.0, "bytes": 2**20, "ppl": 2.0, "ppl_ratio": 1.0, "heldout_coverage": 1.0,
          "pareto": True, "pareto_quality": True, "load_s": 0.1, "ttft_s": 0.01}
    r = {"tokens": 10, "data": ["d"], "traces": ["t"], "timing": True, "prompt_tokens": 8, "points": [pt],
         "skipped": [], "strategies": [], "device": "cpu", "ttft_method": "warm-up runs then the median of 7 timed runs"}
    html = "".join(sweep_sections(r))
    assert "How timings were measured" in html and "median of 7 timed runs" in html and "8-token prompt" in html
