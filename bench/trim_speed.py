"""Trim speed and memory on a synthetic multi-shard checkpoint.

Writes a qwen3_moe-style checkpoint of random bytes (per-expert tensors, several shards, a large embedding),
plans 50% of the experts of every layer, then, in fresh subprocesses, round after round in an order shuffled
per round (seed 0), with a warm page cache and with a cold one:
  - trims it (`moesift.trim`) with the blake3 checksum of every output file (the default), with sha256, and
    without checksums,
  - copies as many bytes as the trim writes from the source shards (`copy_file_range`), and
  - runs `cp` of the trimmed shards (the same bytes),
and reports MB/s of bytes written side by side, as ratios to `cp` (of the medians; the median of the
ratios within a round: a shared machine's slow spells hit both sides of a pair; and of the fastest runs:
interference only slows a run down, so the fastest is the nearest to the quiet machine), and the trimming
process's peak RSS (getrusage) against the target "1 GB plus the largest tensor". The target is met when
all three ratios of the default trim are at most 1.25x. Nothing is timed in the test suite.

Before every timed run `os.sync()` writes back what earlier runs left dirty (it is not charged to the next
run); then, cold cache: `os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)` evicts every file the run reads
(the source shards for a trim and the kernel copy, the trimmed shards for `cp`) from the page cache; warm
cache: the same files are read through just before, so they come from memory. Writes go to the page cache
in both (no fsync), as for `cp`.

    python bench/trim_speed.py [--size-gb 1.5] [--dir /tmp/moesift-bench] [--repeat 3] [--keep] [--no-cold]
    python bench/trim_speed.py --src CHECKPOINT [--keep-fraction 0.5]   # an existing qwen3_moe checkpoint
    python bench/trim_speed.py --gguf [--size-gb 1.2] [--repeat 1]        # a GGUF file (llama.cpp)

`--gguf` writes a qwen3moe GGUF file of random Q8_0 blocks instead (gguf-py's writer, tensor by tensor) and
times, side by side in one run and with a warm page cache: the GGUF trim (`moesift.trim MODEL.gguf`, each
checksum), `cp` of the source GGUF file and `cp` of the trimmed file (the bytes the trim writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
trim(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, checksum=sys.argv[4], max_shard_size=sys.argv[5])
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
import hashlib, json, os, sys, time
import blake3
b = os.urandom(64 << 20)
h = hashlib.sha256() if sys.argv[1] == "sha256" else blake3.blake3(max_threads=1 if sys.argv[1] == "blake3-1" else -1)
t = time.perf_counter()
for _ in range(4):
    h.update(b)
print(json.dumps({"mb_s": 4 * 64 * 1.048576 / (time.perf_counter() - t)}))
"""
MODES = ("blake3", "sha256", "none")  # trim --checksum
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


def write_plan(path: Path, layers: int, experts: int, keep_fraction: float) -> int:
    """A qwen3_moe plan keeping `keep_fraction` of the experts of every layer, drawn at random (seed 1), written
    to `path`; returns the experts kept per layer."""
    import numpy as np

    rng = np.random.default_rng(1)
    kept = max(1, round(experts * keep_fraction))
    plan = {"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": experts},
            "layers": [{"layer": i, "resident": sorted(rng.choice(experts, kept, replace=False).tolist())}
                       for i in range(layers)]}
    path.write_text(json.dumps(plan))
    return kept


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


def prepare(d: Path, cold: bool) -> None:
    """Before a timed run that reads the shards of `d`: write back every dirty page (what earlier runs wrote
    is not charged to this one), then drop the shards from the page cache (cold) or read them into it (warm)."""
    os.sync()
    for f in d.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 64 << 20):
                    pass
        finally:
            os.close(fd)


def cached_bytes(d: Path) -> int | None:
    """Bytes of `d`'s shards in the page cache (`fincore`), None where fincore is missing."""
    files = [str(f) for f in d.glob("*.safetensors")]
    try:
        r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *files], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in r.stdout.split())


def one_round(cold: bool, src: Path, work: Path, out: Path, copy_dst: Path, out_bytes: int,
              max_shard: str, order: list[str]) -> tuple[dict[str, float], int, float]:
    """One timed run of every mode (trim per checksum, kernel copy, cp), in `order` (shuffled per round, so
    that no mode always runs first or right after another); (seconds per mode, peak RSS, start-up)."""
    plan = str(work / "plan.json")
    times: dict[str, float] = {}
    rss, startup = 0, 0.0
    for key in order:
        if key.startswith("trim_"):
            prepare(src, cold)
            r = _run(TRIM, str(src), plan, str(out), key.removeprefix("trim_"), max_shard)
            times[key] = r["wall"]
            rss, startup = max(rss, r["maxrss"]), r["startup"]
        elif key == "copy":
            prepare(src, cold)
            times["copy"] = _run(COPY, str(src), str(copy_dst), str(out_bytes))["wall"]
        else:
            prepare(out, cold)
            times["cp"] = _cp(out, copy_dst)
    return times, rss, startup


def _row(label: str, key: str, res: dict, caches: list[str]) -> str:
    cells = []
    for c in caches:
        m = res[c]
        runs = f"({', '.join(f'{t:.2f}' for t in m[key + '_s'])} s)"
        cells.append(f"{m[key + '_mb_s']:5.0f} MB/s {m[key + '_to_cp']:5.2f}x {m[key + '_paired_to_cp']:5.2f}x "
                     f"{m[key + '_fastest_to_cp']:5.2f}x {runs:24}")
    return f"{label:34}" + "   ".join(cells)


GGUF_TRIM = """
import json, os, sys, time
from moesift.apply.trim import trim
for f in (sys.argv[3], sys.argv[3] + ".moesift.json"):  # a fresh output, as for cp
    if os.path.exists(f):
        os.unlink(f)
os.sync()
t = time.perf_counter()
trim(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, checksum=sys.argv[4])
print(json.dumps({"wall": time.perf_counter() - t}))
"""


def write_gguf(path: Path, size_gb: float, experts: int = 64) -> tuple[int, int]:
    """A qwen3moe GGUF file of random Q8_0 blocks (experts) and F32 norms / router, about `size_gb` GiB, written
    tensor by tensor. Returns (blocks, experts)."""
    import gguf
    import numpy as np

    h, inter, vocab = H, INTER, 32768
    q = gguf.GGMLQuantizationType.Q8_0
    block, size = gguf.GGML_QUANT_SIZES[q]
    per_expert = (2 * inter * (h // block) + h * (inter // block)) * size
    n_layers = max(2, round(size_gb * (1 << 30) / (experts * per_expert)))
    rng = np.random.default_rng(0)
    tensors: list[tuple[str, tuple, int]] = [("token_embd.weight", (vocab, h // block * size), 1)]
    for b in range(n_layers):
        tensors += [(f"blk.{b}.attn_norm.weight", (h,), 0), (f"blk.{b}.ffn_gate_inp.weight", (experts, h), 0),
                    (f"blk.{b}.ffn_gate_exps.weight", (experts, inter, h // block * size), 1),
                    (f"blk.{b}.ffn_up_exps.weight", (experts, inter, h // block * size), 1),
                    (f"blk.{b}.ffn_down_exps.weight", (experts, h, inter // block * size), 1)]
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for k, v in (("block_count", n_layers), ("embedding_length", h), ("expert_count", experts),
                 ("expert_used_count", 8)):
        w.add_uint32(f"qwen3moe.{k}", v)
    for name, shape, quant in tensors:
        n = int(np.prod(shape))
        w.add_tensor_info(name, shape, np.dtype(np.uint8 if quant else np.float32), n if quant else 4 * n,
                          raw_dtype=q if quant else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, quant in tensors:
        a = (rng.integers(0, 256, size=shape, dtype=np.uint8) if quant else
             rng.standard_normal(shape).astype(np.float32))
        w.write_tensor_data(a)
    w.close()
    return n_layers, experts


def gguf_main(args: argparse.Namespace, work: Path) -> None:
    """Trim a synthetic GGUF file against cp of the source file and of the trimmed file (warm page cache)."""
    src, out = work / "model.gguf", work / "trimmed.gguf"
    n_layers, E = write_gguf(src, args.size_gb)
    kept = write_plan(work / "plan.json", n_layers, E, args.keep_fraction)
    _run(GGUF_TRIM, str(src), str(work / "plan.json"), str(out), "none")  # warm-up
    times: dict[str, list[float]] = {}

    def cp(a: Path, b: Path) -> float:
        b.unlink(missing_ok=True)
        os.sync()
        with open(a, "rb") as f:
            while f.read(64 << 20):
                pass
        t = time.perf_counter()
        subprocess.run(["cp", str(a), str(b)], check=True)
        return time.perf_counter() - t

    for _ in range(args.repeat):
        for mode in MODES:
            prepare_files([src])
            times.setdefault(f"trim_{mode}", []).append(
                _run(GGUF_TRIM, str(src), str(work / "plan.json"), str(out), mode)["wall"])
        times.setdefault("cp_source", []).append(cp(src, work / "copy.gguf"))
        times.setdefault("cp_trimmed", []).append(cp(out, work / "copy.gguf"))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"hardware": f"{cpu_name()}, {os.cpu_count()} CPUs", "source_bytes": src.stat().st_size,
           "written_bytes": out.stat().st_size, "blocks": n_layers, "experts": E, "kept": kept,
           "repeat": args.repeat, "seconds": times,
           "ratios": {f"{k}_to_cp_trimmed": med[k] / med["cp_trimmed"] for k in med},
           "ratios_to_cp_source": {f"{k}_to_cp_source": med[k] / med["cp_source"] for k in med}}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    gib = 1 << 30
    print(f"hardware: {res['hardware']}\nsource: {res['source_bytes'] / gib:.2f} GiB GGUF (qwen3moe, Q8_0 experts, "
          f"{n_layers} blocks x {E} experts); plan keeps {kept}/{E}; written {res['written_bytes'] / gib:.2f} GiB; "
          f"warm page cache, {args.repeat} run(s), median seconds")
    for k in [*(f"trim_{m}" for m in MODES), "cp_source", "cp_trimmed"]:
        print(f"{k:18} {med[k]:7.2f} s   {med[k] / med['cp_source']:5.2f}x cp of the source   "
              f"{med[k] / med['cp_trimmed']:5.2f}x cp of the trimmed file")


def prepare_files(files: list[Path]) -> None:
    """Write back dirty pages, then read `files` through (warm page cache)."""
    os.sync()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.5, help="approximate size of the synthetic checkpoint")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary directory)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--max-shard-size", default="5GB",
                    help="output shard size of the trim (several shards let their checksums run side by side)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--src", default=None, help="trim this qwen3_moe-style checkpoint instead of writing one")
    ap.add_argument("--keep-fraction", type=float, default=0.5, help="experts kept per layer (default 0.5)")
    ap.add_argument("--no-cold", action="store_true", help="warm page cache only")
    ap.add_argument("--gguf", action="store_true", help="time the trim of a synthetic GGUF file instead")
    args = ap.parse_args()

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moesift-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.gguf:
        try:
            gguf_main(args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return
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
        kept = write_plan(work / "plan.json", L, E, args.keep_fraction)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        _run(TRIM, str(src), str(work / "plan.json"), str(out), "none", args.max_shard_size)  # warm-up
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        caches = ["warm"] if args.no_cold else ["warm", "cold"]
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in caches}
        rss, startups = 0, []
        evicted_left = None
        shuffle = random.Random(0)
        for _ in range(args.repeat):
            for c in caches:
                order = [*(f"trim_{x}" for x in MODES), "copy", "cp"]
                shuffle.shuffle(order)
                times, r, st = one_round(c == "cold", src, work, out, copy_dst, out_bytes, args.max_shard_size,
                                         order)
                runs[c].append(times)
                rss, startups = max(rss, r), [*startups, st]
        if "cold" in caches:
            prepare(src, cold=True)
            evicted_left = cached_bytes(src)
        speeds = {m: _run(SHA, m)["mb_s"] for m in ("sha256", "blake3-1", "blake3")}
        base_rss = _run(IMPORT_ONLY)["maxrss"]
        res = summarize(args, runs, caches, out_bytes)
        res.update({
            "hardware": f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "source_bytes": src_bytes, "source_shards": len(list(src.glob("*.safetensors"))),
            "layers": L, "experts": E, "kept_per_layer": kept, "written_bytes": out_bytes,
            "output_shards": len(list(out.glob("*.safetensors"))), "largest_tensor_bytes": largest,
            "synthetic_write_s": t_write, "import_startup_s": statistics.median(startups),
            "sha256_mb_s": speeds["sha256"], "blake3_one_thread_mb_s": speeds["blake3-1"],
            "blake3_auto_threads_mb_s": speeds["blake3"], "cold_cache_bytes_left_after_evict": evicted_left,
            "peak_rss_bytes": rss, "peak_rss_target_bytes": (1 << 30) + largest, "python_import_rss_bytes": base_rss,
        })
        res["ok"] = res["ok"] and rss < res["peak_rss_target_bytes"]
        print(json.dumps(res, indent=2) if args.json else report(res, caches))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], caches: list[str],
              out_bytes: int) -> dict:
    """Medians, MB/s of bytes written and ratios to cp per cache state; the warm figures also under the keys
    earlier versions of this script printed (trim = the default checksum, blake3)."""
    res: dict = {"repeat": args.repeat, "ratio_target": 1.25, "cold_method": "os.sync() then posix_fadvise("
                 "DONTNEED) on every file the run reads, before each cold run (warm: os.sync(), then the files "
                 "read through)"}
    for c in caches:
        m: dict = {}
        cp = statistics.median(r["cp"] for r in runs[c])
        for key in [*(f"trim_{x}" for x in MODES), "copy", "cp"]:
            ts = [r[key] for r in runs[c]]
            med = statistics.median(ts)
            m.update({f"{key}_s": ts, f"{key}_median_s": med, f"{key}_mb_s": out_bytes / 1e6 / med,
                      f"{key}_to_cp": med / cp,
                      f"{key}_paired_to_cp": statistics.median(r[key] / r["cp"] for r in runs[c]),
                      f"{key}_fastest_to_cp": min(ts) / min(r["cp"] for r in runs[c])})
        res[c] = m
    w = res["warm"]
    res.update({
        "trim_s": w["trim_blake3_s"], "trim_no_checksums_s": w["trim_none_s"], "copy_written_bytes_s": w["copy_s"],
        "cp_s": w["cp_s"], "trim_median_s": w["trim_blake3_median_s"],
        "trim_no_checksums_median_s": w["trim_none_median_s"], "copy_median_s": w["copy_median_s"],
        "cp_median_s": w["cp_median_s"], "copy_mb_s": w["copy_mb_s"], "cp_mb_s": w["cp_mb_s"],
        "trim_mb_s": w["trim_blake3_mb_s"], "trim_no_checksums_mb_s": w["trim_none_mb_s"],
        "ratio_trim_to_cp": w["trim_blake3_to_cp"],
        "ratio_trim_to_copy": w["trim_blake3_median_s"] / w["copy_median_s"],
        "ratio_trim_no_checksums_to_copy": w["trim_none_median_s"] / w["copy_median_s"],
    })
    res["ok"] = all(max(res[c][f"trim_blake3_{k}"] for k in ("to_cp", "paired_to_cp", "fastest_to_cp")) <= 1.25
                    for c in caches)
    return res


def report(res: dict, caches: list[str]) -> str:
    gib = 1 << 30
    lines = [
        f"hardware: {res['hardware']}",
        f"source: {res['source_bytes'] / gib:.2f} GiB in {res['source_shards']} shards ({res['layers']} layers x "
        f"{res['experts']} experts); plan keeps {res['kept_per_layer']}/{res['experts']}; written "
        f"{res['written_bytes'] / gib:.2f} GiB in {res['output_shards']} shards; {res['repeat']} runs each",
        f"MB/s of bytes written (median), time / cp time, and every run's seconds; cold: {res['cold_method']}"
        + (f" ({res['cold_cache_bytes_left_after_evict'] / 2**20:.0f} MiB of the source still cached after one "
           "eviction, per fincore)" if res.get("cold_cache_bytes_left_after_evict") is not None else ""),
        "x cp: median time over median cp time; paired: median over rounds of time / cp time in the same round; "
        "fastest: fastest run over cp's fastest (a shared machine's interference only slows a run down)",
        f"{'':34}" + "   ".join(f"{c + ' cache: MB/s, x cp, paired, fastest, runs':61}" for c in caches),
    ]
    for label, key in [("trim, blake3 (default)", "trim_blake3"), ("trim, sha256", "trim_sha256"),
                       ("trim, no checksums", "trim_none"), ("kernel copy of as many bytes", "copy"),
                       ("cp of the trimmed shards", "cp")]:
        lines.append(_row(label, key, res, caches))
    lines += [
        f"(module imports before timing: {res['import_startup_s']:.2f} s, not counted)",
        f"hash speed on this CPU: sha256 {res['sha256_mb_s']:.0f} MB/s (one core), blake3 "
        f"{res['blake3_one_thread_mb_s']:.0f} MB/s (one thread), {res['blake3_auto_threads_mb_s']:.0f} MB/s "
        f"(all cores); target: trim with checksums <= {res['ratio_target']}x cp",
        f"peak RSS of the trimming process: {res['peak_rss_bytes'] / 2**20:.0f} MiB (python + imports alone: "
        f"{res['python_import_rss_bytes'] / 2**20:.0f} MiB; target < 1 GiB + largest tensor "
        f"{res['largest_tensor_bytes'] / 2**20:.0f} MiB = {res['peak_rss_target_bytes'] / 2**20:.0f} MiB)",
        "OK" if res["ok"] else "TARGET MISSED",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
