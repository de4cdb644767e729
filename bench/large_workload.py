"""Bounded memory on a huge workload file: peak RSS and wall time of `moesift trace` on a 50 MB text file
of one line (no blank lines, no line breaks), beside the same command on a file of one short line, each in
its own process, run alternately.

The large file is split while it is read (1 MiB at a time, 16 KiB documents cut at spaces) and a document
is cut to --max-length tokens by tokenizing only a prefix, so tracing its first 32 tokens should cost what
tracing a tiny file costs: the ratio printed is large / tiny.

Usage:
    python bench/large_workload.py                 # bundled qwen3moe-ref, 32 tokens, 3 rounds
    python bench/large_workload.py --mb 200 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import cpu_name, usable_cores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_one_line(path: Path, mb: int) -> None:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "déjà", "vu", "tokens", "expert", "router"]
    block = " ".join(rng.choice(words) for _ in range(400_000)) + " "
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mb * 2**20:
            f.write(block)


def run_trace(model: str, data: Path, out: Path, max_length: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `moesift trace` process."""
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-c", "import resource, sys; from moesift.cli import main; sys.argv = sys.argv[1:]; "
           "code = 0\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code or 0\n"
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)",
           "moesift", "trace", model, "--data", str(data), "--max-length", str(max_length), "--out", str(out),
           "--json", *extra]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"trace failed ({r.returncode}):\n{r.stderr[-2000:]}")
    rss_kb = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS"))
    return wall, rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "moesift" / "assets" / "models" / "qwen3moe-ref"))
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--all-documents", action="store_true",
                    help="trace every document of the large file (default: the first, --max-samples 1)")
    args = ap.parse_args()
    extra = [] if args.all_documents else ["--max-samples", "1"]
    with tempfile.TemporaryDirectory() as d:
        big, tiny = Path(d) / "big.txt", Path(d) / "tiny.txt"
        write_one_line(big, args.mb)
        tiny.write_text("the cat sat on a mat while tokens routed to experts")
        res: dict[str, list[tuple[float, float]]] = {"large": [], "tiny": []}
        for _ in range(args.rounds):
            res["large"].append(run_trace(args.model, big, Path(d) / "a.trace", args.max_length, extra))
            res["tiny"].append(run_trace(args.model, tiny, Path(d) / "b.trace", args.max_length, extra))
        print(f"host: {cpu_name()}, {usable_cores()} usable cores, load average {os.getloadavg()[0]:.1f}; "
              f"peak RSS of the whole process (Python, torch, model included)")
        print(f"large: {big.stat().st_size / 2**20:.1f} MiB on one line; {'every document' if args.all_documents else '--max-samples 1'}, "
              f"--max-length {args.max_length}; {args.rounds} rounds, median")
        med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in res.items()}
        for k, (w, m) in med.items():
            print(f"  {k:6s} wall {w:7.2f} s   peak RSS {m:8.1f} MiB")
        print(f"  large / tiny: wall x{med['large'][0] / med['tiny'][0]:.2f}, peak RSS x{med['large'][1] / med['tiny'][1]:.2f}")


if __name__ == "__main__":
    main()
