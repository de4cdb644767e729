"""Trim speed and memory on a synthetic multi-shard checkpoint.

Writes a qwen3_moe-style checkpoint of random bytes (per-expert tensors, several shards, a large embedding),
plans 50% of the experts of every layer, then, in fresh subprocesses and alternating:
  - trims it (`moesift.trim`, sha256 of every output file included), and
  - copies as many bytes as the trim writes from the source shards (`copy_file_range`) as the baseline,
and reports wall times, their ratio, and the trimming process's peak RSS (getrusage) against the target
"1 GB plus the largest tensor". Nothing is timed in the test suite; this script prints figures side by side.

    python bench/trim_speed.py [--size-gb 1.5] [--dir /tmp/moesift-bench] [--repeat 3] [--keep]
    python bench/trim_speed.py --src CHECKPOINT [--keep-fraction 0.5]   # an existing qwen3_moe checkpoint

Also times `cp` of the trimmed shards (the same bytes, read from the page cache like the trim's source) and
reports MB/s of bytes written for the trim, the kernel copy and `cp`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hostinfo import cpu_name  # bench/hostinfo.py, beside this script
from synth_checkpoint import qwen3_moe_config, write_qwen3_moe  # beside this script

H, INTER, VOCAB = 1024, 512, 32768  # hidden, expert intermediate, vocabulary (embedding 64 MiB in bf16)


def write_synthetic(d: Path, size_gb: float, shard_bytes: int = 400 << 20) -> tuple[int, int, int]:
    """A qwen3_moe-style checkpoint of random bf16 bytes. Returns (layers, experts, largest tensor bytes)."""
    E = 64
    per_expert = 3 * H * INTER * 2
    L = max(2, round(size_gb * (1 << 30) / (E * per_expert)))
    write_qwen3_moe(d, qwen3_moe_config(L, hidden=H, experts=E, moe_inter=INTER, vocab=VOCAB, heads=8, kv_heads=4),
                    shard_bytes=shard_bytes)
    return L, E, 2 * VOCAB * H


TRIM = """
import json, resource, shutil, sys, time
from moesift.apply.trim import trim
shutil.rmtree(sys.argv[3], ignore_errors=True)
t0 = time.perf_counter()
import moesift.formats.plan, moesift.formats.checkpoint, moesift.core.io, moesift.arch  # noqa: E401,F401 - start-up, not trimming
startup = time.perf_counter() - t0
t = time.perf_counter()
trim(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, checksums=sys.argv[4] == "1", max_shard_size=sys.argv[5])
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "startup": startup,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
IMPORT_ONLY = """
import json, resource
import moesift.apply.trim, moesift.formats.checkpoint, moesift.formats.plan  # noqa: E401,F401
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
SHA = """
import hashlib, json, os, time
b = os.urandom(64 << 20)
h = hashlib.sha256()
t = time.perf_counter()
for _ in range(4):
    h.update(b)
print(json.dumps({"mb_s": 4 * 64 * 1.048576 / (time.perf_counter() - t)}))
"""
COPY = """
import json, os, shutil, sys, time
from pathlib import Path
src, dst, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shutil.rmtree(dst, ignore_errors=True); dst.mkdir()
t = time.perf_counter()
for f in sorted(src.glob("*.safetensors")):  # the same number of bytes as the trim writes, read from the source
    n = min(total, f.stat().st_size)
    if n <= 0:
        break
    with open(f, "rb") as a, open(dst / f.name, "wb") as b:
        left = n
        while left:
            left -= os.copy_file_range(a.fileno(), b.fileno(), left)
    total -= n
print(json.dumps({"wall": time.perf_counter() - t}))
"""


def _cp(src: Path, dst: Path) -> float:
    """Seconds `cp` takes to copy the safetensors shards of `src` into a fresh `dst`."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    files = sorted(str(f) for f in src.glob("*.safetensors"))
    t = time.perf_counter()
    subprocess.run(["cp", *files, str(dst)], check=True)
    return time.perf_counter() - t


def _run(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"subprocess failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.5, help="approximate size of the synthetic checkpoint")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary directory)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--max-shard-size", default="5GB",
                    help="output shard size of the trim (several shards let their sha256 run side by side)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--src", default=None, help="trim this qwen3_moe-style checkpoint instead of writing one")
    ap.add_argument("--keep-fraction", type=float, default=0.5, help="experts kept per layer (default 0.5)")
    args = ap.parse_args()
    import numpy as np

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moesift-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out, copy_dst = work / "src", work / "trimmed", work / "copy"
    try:
        t0 = time.perf_counter()
        if args.src:
            src = Path(args.src)
            cfg = json.loads((src / "config.json").read_text())
            L, E = cfg["num_hidden_layers"], cfg["num_experts"]
            largest = 2 * cfg["vocab_size"] * cfg["hidden_size"]
        else:
            L, E, largest = write_synthetic(src, args.size_gb)
        t_write = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        kept = max(1, round(E * args.keep_fraction))
        plan = {"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": E},
                "layers": [{"layer": i, "resident": sorted(rng.choice(E, kept, replace=False).tolist())}
                           for i in range(L)]}
        (work / "plan.json").write_text(json.dumps(plan))
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        trims, plain, copies, startups, cps = [], [], [], [], []
        rss = 0
        _run(TRIM, str(src), str(work / "plan.json"), str(out), "0", args.max_shard_size)  # warm-up: page cache as in later runs
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        for _ in range(args.repeat):
            r = _run(TRIM, str(src), str(work / "plan.json"), str(out), "1", args.max_shard_size)
            trims.append(r["wall"])
            startups.append(r["startup"])
            rss = max(rss, r["maxrss"])
            copies.append(_run(COPY, str(src), str(copy_dst), str(out_bytes))["wall"])
            cps.append(_cp(out, copy_dst))
            r = _run(TRIM, str(src), str(work / "plan.json"), str(out), "0", args.max_shard_size)
            plain.append(r["wall"])
            rss = max(rss, r["maxrss"])
        sha_mb_s = _run(SHA)["mb_s"]
        base_rss = _run(IMPORT_ONLY)["maxrss"]
        t_trim, t_plain, t_copy = statistics.median(trims), statistics.median(plain), statistics.median(copies)
        t_cp = statistics.median(cps)
        target_rss = (1 << 30) + largest
        res = {
            "hardware": f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "source_bytes": src_bytes, "source_shards": len(list(src.glob("*.safetensors"))),
            "layers": L, "experts": E, "kept_per_layer": kept, "written_bytes": out_bytes,
            "output_shards": len(list(out.glob("*.safetensors"))), "largest_tensor_bytes": largest,
            "synthetic_write_s": t_write, "trim_s": trims, "copy_written_bytes_s": copies,
            "trim_no_checksums_s": plain, "import_startup_s": statistics.median(startups), "trim_median_s": t_trim, "trim_no_checksums_median_s": t_plain,
            "copy_median_s": t_copy, "ratio_trim_to_copy": t_trim / t_copy,
            "ratio_trim_no_checksums_to_copy": t_plain / t_copy, "ratio_target": 1.25,
            "copy_mb_s": out_bytes / 1e6 / t_copy, "sha256_mb_s": sha_mb_s,
            "cp_s": cps, "cp_median_s": t_cp, "cp_mb_s": out_bytes / 1e6 / t_cp, "trim_mb_s": out_bytes / 1e6 / t_trim,
            "trim_no_checksums_mb_s": out_bytes / 1e6 / t_plain, "ratio_trim_to_cp": t_trim / t_cp,
            "peak_rss_bytes": rss, "peak_rss_target_bytes": target_rss, "python_import_rss_bytes": base_rss,
            "ok": t_trim / min(t_copy, t_cp) <= 1.25 and rss < target_rss,
            "ok_without_checksums": t_plain / t_copy <= 1.25 and rss < target_rss,
        }
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            gib = 1 << 30
            print(f"hardware: {res['hardware']}")
            print(f"source: {src_bytes / gib:.2f} GiB in {res['source_shards']} shards ({L} layers x {E} experts); "
                  f"plan keeps {kept}/{E}; written {out_bytes / gib:.2f} GiB in {res['output_shards']} shards")
            print(f"trim (incl. sha256 of outputs): {', '.join(f'{t:.2f}' for t in trims)} s   median {t_trim:.2f} s")
            print(f"trim (checksums=False):         {', '.join(f'{t:.2f}' for t in plain)} s   median {t_plain:.2f} s")
            print(f"(module imports before timing: {res['import_startup_s']:.2f} s, not counted)")
            print(f"plain copy of as many bytes:    {', '.join(f'{t:.2f}' for t in copies)} s   median {t_copy:.2f} s")
            print(f"cp of the trimmed shards:       {', '.join(f'{t:.2f}' for t in cps)} s   median {t_cp:.2f} s")
            print(f"MB/s of bytes written: trim {res['trim_mb_s']:.0f} (checksums on), {res['trim_no_checksums_mb_s']:.0f} "
                  f"(off); kernel copy {res['copy_mb_s']:.0f}; cp {res['cp_mb_s']:.0f}; trim / cp {t_trim / t_cp:.2f}x")
            print(f"ratio trim / copy: {t_trim / t_copy:.2f}x with checksums, {t_plain / t_copy:.2f}x without "
                  f"(target <= 1.25x); copy runs at {res['copy_mb_s']:.0f} MB/s, sha256 on this CPU at "
                  f"{sha_mb_s:.0f} MB/s (one core)")
            print(f"peak RSS of the trimming process: {rss / 2**20:.0f} MiB (python + imports alone: "
                  f"{base_rss / 2**20:.0f} MiB; target < 1 GiB + largest tensor {largest / 2**20:.0f} MiB = "
                  f"{target_rss / 2**20:.0f} MiB)")
            print("OK" if res["ok"] else ("OK without checksums; with them the time is bound by sha256 throughput"
                                          if res["ok_without_checksums"] else "TARGET MISSED"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
