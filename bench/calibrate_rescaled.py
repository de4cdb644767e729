"""Calibration with and without the closed form for the other tokens, side by side.

Routers that take a softmax over the resident experts and do not renormalise the top-k (OLMoE, Qwen2-MoE)
move every token's output when an expert goes: the others' weights scale by 1 / (1 - p). The greedy of
`moesift.calibrate` scores those tokens in closed form and re-routes only each candidate's own tokens
(``others: rescaled`` in the calibration's layers); ``measured`` re-routes and scores every token for every
candidate. Per model and workload this runs both, one after the other, on the same loaded model (float32,
CPU) and prints the seconds of each, their ratio, and whether the removal orders are the same.

    OMP_NUM_THREADS=1 python bench/calibrate_rescaled.py --models moesift/assets/models/olmoe-ref \\
        moesift/assets/models/qwen2moe-ref --corpus build/corpus --domains code prose
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import moesift
from moesift.selection import calib_greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="model directories")
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"), help="{domain}.trace.jsonl files")
    ap.add_argument("--domains", nargs="+", default=["code", "prose"])
    ap.add_argument("--docs", type=int, default=32, help="calibration documents (32)")
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()
    for name in a.models:
        m, tok = moesift.load_model(name, device="cpu", dtype="float32")
        for dom in a.domains:
            got = {}
            for mode in ("rescaled", "measured"):
                calib_greedy.RESCALE = mode == "rescaled"
                t = time.perf_counter()
                cal = moesift.calibrate(name, a.corpus / f"{dom}.trace.jsonl", max_samples=a.docs,
                                        max_length=a.max_length, progress=False, loaded=(m, tok), dtype="float32",
                                        device="cpu")
                got[mode] = (cal, time.perf_counter() - t)
            calib_greedy.RESCALE = True
            (r, tr), (s, ts) = got["rescaled"], got["measured"]
            same = all(x["order"] == y["order"] for x, y in zip(r.layers, s.layers, strict=True))
            diff = max(float(np.max(np.abs(np.subtract(x["error"], y["error"])) / (np.asarray(y["error"]) + 1e-12)))
                       for x, y in zip(r.layers, s.layers, strict=True) if x.get("error"))
            paths = [x.get("others", "local") for x in r.layers if x.get("order") is not None]
            print(f"{Path(name).name} {dom}: rescaled {tr:.1f} s, measured {ts:.1f} s ({ts / tr:.2f}x); same orders: "
                  f"{same}; largest relative error difference {diff:.1e}; layers: {', '.join(paths)}", flush=True)


if __name__ == "__main__":
    main()
