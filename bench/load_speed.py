"""Load speed: the full model (`load_model`), the resident experts only (`load_resident`, plans keeping 25 / 50
/ 75% of every layer's experts) and the trimmed checkpoints of the same plans (`load_trimmed`), each from a
cold and a warm page cache, with peak host RSS and peak device memory.

Checkpoint: Qwen3-30B-A3B-shaped layers (bench/synth_checkpoint.py; default 4 layers, 4.9 GB) of random
bf16 weights; on the CPU narrower layers (10 layers, hidden 1024, 64 experts of 512: 2.2 GB). Every load runs
in a fresh child process, one after the other (imports done before the clock starts); a wall time covers the
call alone. "read only" is the disk-speed reference: every tensor of the checkpoint read by moesift's reader,
no model.
The fixed cost a fresh process pays first (importing torch, transformers and the family's modeling module,
building the model skeleton on the meta device) is measured apart, in a child process. Cold: the checkpoint's files are
dropped from the page cache first (`posix_fadvise(DONTNEED)` after `sync`; with --drop-caches the whole
cache via /proc/sys/vm/drop_caches when writable). Peak host RSS: sampled every 2 ms during the call, minus the RSS just before it. Target (per load of
resident experts): the full model's load time x the resident byte fraction + 0.5 s, same cache state.

    python bench/load_speed.py                      # CPU, small
    python bench/load_speed.py --device cuda        # GPU, Qwen3-30B-A3B shapes, 4 layers
    python bench/load_speed.py ... --json out.json --dir /tmp/moesift-load
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hostinfo import cpu_name  # noqa: E402
from synth_checkpoint import qwen3_moe_config, write_qwen3_moe  # noqa: E402


class PeakRSS:
    """Peak resident set size of this process during a block, sampled every 2 ms by a thread, minus the
    RSS at its start."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.peak = self._rss()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.before


def load_once(kind: str, path: Path, plan: str, device: str) -> dict:
    import gc

    import torch

    from moesift.apply.resident import load_resident, load_trimmed
    from moesift.engines.hf import hf_progress, load_model

    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        with hf_progress(False), PeakRSS() as rss:
            t = time.perf_counter()
            if kind == "full":
                m = load_model(str(path), device=device, dtype="bfloat16")[0]
            elif kind == "read":
                m = read_all(path, device)
            elif kind == "resident":
                m = load_resident(str(path), plan, device=device, dtype="bfloat16")
            else:
                m = load_trimmed(str(path), device=device, dtype="bfloat16")[0]
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a failed load is a row of the table, not the end of the run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    n = sum(p.numel() * p.element_size() for p in (m.values() if isinstance(m, dict) else m.parameters()))
    out = {"wall": wall, "rss_peak_delta": rss.delta, "param_bytes": n,
           "device_peak": (torch.cuda.max_memory_allocated() - base) if cuda else None}
    del m
    return out


def read_all(path: Path, device: str) -> dict:
    """Every tensor of the checkpoint read with moesift's reader alone (no model): the disk-speed reference."""
    from moesift.engines.tensors import read_tensors
    from moesift.formats.checkpoint import checked_headers

    specs = [(name, info["dtype"], list(info["shape"]), [(f, hsize + info["data_offsets"][0],
                                                          info["data_offsets"][1] - info["data_offsets"][0])])
             for f, (header, hsize) in checked_headers(path).items() for name, info in header.items()
             if name != "__metadata__"]
    return read_tensors(path, specs, device)


def drop_cache(d: Path, system: bool) -> str:
    os.sync()
    if system:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for p in d.rglob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def warm_cache(d: Path) -> None:
    for p in d.rglob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


FIXED = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
from moesift.apply.resident import variable_expert_class
from moesift.engines.assemble import meta_model
from moesift.formats.checkpoint import load_config_dict
t2 = time.perf_counter()
cls, cfg = variable_expert_class(load_config_dict(sys.argv[1]), {})  # imports the family's modeling module
t3 = time.perf_counter()
meta_model(cls, cfg)
t4 = time.perf_counter()
mods = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m)
print(json.dumps({"torch": t1 - t0, "transformers": t2 - t1, "family": t3 - t2, "skeleton": t4 - t3,
                  "modeling_modules": mods}))
"""


def fixed_cost(path: Path) -> dict:
    """What a fresh process pays before reading a weight: imports (torch, transformers and moesift, the
    family's modeling module) and the model skeleton on the meta device, in a child process (the best of 3)."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", FIXED, str(path)], capture_output=True, text=True,
                                      check=True, env=_child_env()).stdout) for _ in range(3)]
    best = min(runs, key=lambda r: r["torch"] + r["transformers"] + r["family"] + r["skeleton"])
    best["total"] = best["torch"] + best["transformers"] + best["family"] + best["skeleton"]
    return best


def _target(base: tuple[dict, dict], fraction: float) -> tuple[float, float] | None:
    """(cold, warm) seconds allowed: the base load's time x the byte fraction + 0.5 s."""
    return tuple(r["wall"] * fraction + 0.5 for r in base) if all("wall" in r for r in base) else None


def _check(runs: tuple[dict, dict], target: tuple[float, float] | None) -> tuple[str, str]:
    if target is None:
        return "", ""
    ok = all("wall" in r and r["wall"] <= t for r, t in zip(runs, target, strict=True))
    return f"{target[0]:.2f} / {target[1]:.2f}", "yes" if ok else "no"


def _ratio(r: dict, full: dict) -> str:
    return f"{r['wall'] / full['wall']:.2f}" if "wall" in r and "wall" in full else "-"


def run(kind: str, path: Path, plan: str, device: str, cold: bool, system: bool) -> dict:
    """One load in a fresh child process (as a user's process loads once: memory it has never touched, no
    allocator state left by an earlier load), its imports done before the clock starts."""
    how = drop_cache(path, system) if cold else (warm_cache(path) or "warm")
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(path), plan or "-", device],
                       capture_output=True, text=True, env=_child_env())
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        out = {"error": (r.stderr.strip().splitlines() or ["child failed"])[-1]}
    out["cache"] = how
    return out


def _child_env() -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def child(kind: str, path: str, plan: str, device: str) -> None:
    """The child of `run`: import what loading needs (the family's modeling module included), then time it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import moesift.apply.resident  # noqa: F401
    import moesift.engines.hf  # noqa: F401

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    print(json.dumps(load_once(kind, Path(path), plan, device)))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="default: 4 on CUDA, 10 on CPU")
    ap.add_argument("--hidden", type=int, default=None, help="default: 2048 on CUDA, 1024 on CPU")
    ap.add_argument("--experts", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    ap.add_argument("--moe-inter", type=int, default=None, help="default: 768 on CUDA, 512 on CPU")
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--drop-caches", action="store_true",
                    help="cold = drop the whole page cache (/proc/sys/vm/drop_caches, root only) instead of "
                         "posix_fadvise(DONTNEED) on the checkpoint's files")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    layers = args.layers or (4 if cuda else 10)
    hidden = args.hidden or (2048 if cuda else 1024)
    experts = args.experts or (128 if cuda else 64)
    inter = args.moe_inter or (768 if cuda else 512)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moesift-load-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    rows = []
    try:
        import numpy as np

        from moesift.apply.trim import trim

        src = work / "full"
        t0 = time.perf_counter()
        cfg = qwen3_moe_config(layers, hidden, experts, inter)
        if not (src / "config.json").is_file():
            write_qwen3_moe(src, cfg)
        full_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        t_build = time.perf_counter() - t0
        fixed = fixed_cost(src)
        res = {}
        for cold in (True, False):
            res[("full", cold)] = run("full", src, "", args.device, cold, args.drop_caches)
            res[("read", cold)] = run("read", src, "", args.device, cold, args.drop_caches)
        rng = np.random.default_rng(0)
        fracs = [float(x) for x in args.fractions.split(",")]
        for f in fracs:
            k = max(1, round(experts * f))
            plan = {"schema": "moesift-plan/1", "model": {"model_type": "qwen3_moe", "n_experts": experts},
                    "layers": [{"layer": i, "resident": sorted(rng.choice(experts, k, replace=False).tolist())}
                               for i in range(layers)]}
            pp = work / f"plan{int(f * 100)}.json"
            pp.write_text(json.dumps(plan))
            tdir = work / f"trim{int(f * 100)}"
            if not tdir.exists():
                trim(str(src), str(pp), str(tdir), progress=False)
            tbytes = sum(p.stat().st_size for p in tdir.glob("*.safetensors"))
            for cold in (True, False):
                res[("resident", f, cold)] = run("resident", src, str(pp), args.device, cold, args.drop_caches)
                res[("trimmed", f, cold)] = run("trimmed", tdir, "", args.device, cold, args.drop_caches)
            res[("bytes", f)] = tbytes
        hw = cpu_name()
        if cuda:
            import torch

            hw = f"{torch.cuda.get_device_name()}, host {cpu_name()}"
        print(f"hardware: {args.device} ({hw}); checkpoint {layers} layers x {experts} experts, hidden {hidden}, "
              f"expert intermediate {inter}: {full_bytes / 1e9:.2f} GB (written in {t_build:.1f} s); "
              f"cold cache via {res[('full', True)].get('cache')}")
        print(f"fixed cost of a fresh process (best of 3, not in the times below): {fixed['total']:.2f} s = import "
              f"torch {fixed['torch']:.2f} s + transformers and moesift {fixed['transformers']:.2f} s + the family's "
              f"modeling module {fixed['family']:.2f} s + skeleton on the meta device {fixed['skeleton']:.3f} s; "
              f"modeling modules imported: {', '.join(fixed['modeling_modules'])}")
        print("target: the full load's time x the byte fraction + 0.5 s; disk target: the same with the time of "
              "reading the whole checkpoint alone (no model), both per cache state")
        print(f"{'load':<22}{'cold s':>8}{'warm s':>8}{'GB/s warm':>10}{'RSS MiB':>9}{'dev GiB':>9}"
              f"{'bytes':>7}{'x full (c/w)':>14}{'target s (c/w)':>16}{'ok':>4}{'disk target s':>16}{'ok':>4}")

        def line(name, cold_r, warm_r, nbytes, target=None, disk=None):
            def s(r):
                return f"{r['wall']:.2f}" if "wall" in r else "fail"
            rss = max(r.get("rss_peak_delta", 0) for r in (cold_r, warm_r)) / 2**20
            dev = max((r.get("device_peak") or 0) for r in (cold_r, warm_r)) / 2**30
            gbs = nbytes / 1e9 / warm_r["wall"] if "wall" in warm_r else float("nan")
            tgt, ok = _check((cold_r, warm_r), target)
            dtgt, dok = _check((cold_r, warm_r), disk)
            rel = f"{_ratio(cold_r, fc)} / {_ratio(warm_r, fw)}"
            print(f"{name:<22}{s(cold_r):>8}{s(warm_r):>8}{gbs:>10.2f}{rss:>9.0f}{dev:>9.2f}"
                  f"{nbytes / full_bytes:>7.2f}{rel:>14}{tgt:>16}{ok:>4}{dtgt:>16}{dok:>4}")
            rows.append({"load": name, "cold_s": cold_r.get("wall"), "warm_s": warm_r.get("wall"),
                         "byte_fraction": nbytes / full_bytes,
                         "bytes": nbytes, "rss_peak_mib": rss, "device_peak_gib": dev if cuda else None,
                         "target_s": target, "ok": ok or None, "disk_target_s": disk, "disk_ok": dok or None,
                         "errors": [r["error"] for r in (cold_r, warm_r) if "error" in r] or None})

        fc, fw = res[("full", True)], res[("full", False)]
        rc, rw = res[("read", True)], res[("read", False)]
        line("load_model (full)", fc, fw, full_bytes)
        line("read only (full)", rc, rw, full_bytes)
        for f in fracs:
            nb = res[("bytes", f)]
            tgt, disk = _target((fc, fw), nb / full_bytes), _target((rc, rw), nb / full_bytes)
            line(f"load_resident {int(f * 100)}%", res[("resident", f, True)], res[("resident", f, False)], nb,
                 tgt, disk)
            line(f"load_trimmed {int(f * 100)}%", res[("trimmed", f, True)], res[("trimmed", f, False)], nb,
                 tgt, disk)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": args.device, "hardware": hw, "checkpoint_bytes": full_bytes,
                                                   "fixed_cost": fixed, "rows": rows}, indent=2))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
