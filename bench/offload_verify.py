"""Exactness of load_offloaded on a real device: on each bundled reference model, trace a workload with the
routing log, plan for the offload runtime (`plan --offload`) at a device budget holding three quarters of the
expert bytes (the planner keeps whole groups for the DeepSeek-V3 model's group-limited router), and run
`verify --offloaded` (full model vs offloaded model, float32, and the measured hit rate vs the cache
simulation) on the device, with the host-compute rule at its default and forced to the
device path. Prints one line per run and exits 1 on any mismatch. About 20 s on a GPU.

Usage:
    python bench/offload_verify.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()

    import moesift
    from moesift.selection.offload_budget import device_bytes

    root = Path(moesift.__file__).parent / "assets"
    tmp = Path(tempfile.mkdtemp(prefix="moesift-offload-verify-"))
    bad = 0
    t0 = time.perf_counter()
    for name in ("qwen3moe-ref", "deepseekv3-ref"):
        model = root / "models" / name
        t = moesift.trace(str(model), str(root / "workloads" / "code.trace.jsonl"), max_samples=32, max_length=128,
                          log_routing=True, folds=4, progress=False, device=args.device)
        t.save(tmp / f"{name}.trace")
        idx = moesift.checkpoint_index(model)
        fixed = device_bytes(idx, {}, {})
        experts = sum(fixed["expert_bytes_per_layer"].values()) * idx.spec.n_experts
        router = sum(x.nbytes for x in idx.tensors if x.role.kind in ("router", "router_bias"))
        mem = fixed["non_expert"] + experts * 3 // 4 + router
        p = moesift.plan([str(tmp / f"{name}.trace")], memory=mem, model=model, offload=True,
                         out=tmp / f"{name}.plan.json", force=True)
        for thr in (4, 0):
            r = moesift.verify(str(model), offloaded=str(tmp / f"{name}.plan.json"), device=args.device,
                               data=str(root / "workloads" / "code.eval.jsonl"), max_samples=args.samples,
                               host_compute_max_tokens=thr, progress=False)
            bad += not r["ok"]
            print(f"{name} host_compute_max_tokens={thr}: {'OK' if r['ok'] else 'MISMATCH'} top-1 "
                  f"{r['top1_agreement']:.4f}, max rel logit diff {r['max_rel_logit_diff']:.3g}, generations "
                  f"{'identical' if r['generations_identical'] else 'DIFFER'}, hit rate {r['hit_rate']:.4f} "
                  f"(= simulation: {r['hit_rate_equals_simulation']}; plan predicted held-out "
                  f"{p.predictions['offload'].get('heldout_hit_rate')}), {r['host_pairs']} pairs on the host, "
                  f"{r['loads']} loads")
    print(f"device {args.device}, {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
