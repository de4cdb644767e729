"""Trimmed checkpoints in serving engines: for every family each engine runs, a tiny random model (and the
bundled reference models where the engine reads them) is trimmed to a uniform half of its experts and
`moesift.verify(..., engine=...)` compares the engine's run of the trimmed checkpoint with moesift's restricted
full model in transformers (float32, CPU). Prints top-1 agreement, max relative logit difference, whether
greedy generations are identical, and seconds per check, one row per (engine, model).

llama.cpp needs `pip install "moesift[gguf]"` (llama-cpp-python builds llama.cpp from source) and llama.cpp's
converter, which the llama-cpp-python wheel leaves out: this script takes it from the sdist of the installed
version (`--sdist FILE`, or `pip download` into --cache) and extracts vendor/llama.cpp there, unless
MOESIFT_LLAMA_CPP already names one. `--tests` also runs tests/test_engines_llamacpp.py and
tests/test_llamacpp_engine.py (skipped in CI).

`--eval` prints the llama.cpp eval table instead: the bundled qwen3moe-ref converted to an F32 GGUF by llama.cpp's
converter and quantized to Q8_0 and Q4_0 by llama.cpp's quantizer (llama_model_quantize), each evaluated in
llama.cpp (`moesift eval FILE.gguf --engine llama.cpp`) at top-k 4 (its own), 2 and 1 and trimmed to uniform
50% and 25% plans (frequency, traced with transformers on the bundled prose trace workload), on the bundled
prose eval workload tokenized by the checkpoint's tokenizer; beside it the transformers perplexities of the same
windows and settings. Perplexity, file bytes, tokens/s of prefill and decode, side by side in one run.

    python bench/engines.py [--engine mlx --engine llama.cpp] [--tests] [--eval] [--sdist llama_cpp_python-0.3.36.tar.gz]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from hostinfo import cpu_name, usable_cores  # bench/hostinfo.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def llama_cpp_converter(cache: Path, sdist: Path | None) -> Path:
    """A directory holding llama.cpp's convert_hf_to_gguf.py matching the installed llama-cpp-python."""
    from importlib.metadata import version

    if os.environ.get("MOESIFT_LLAMA_CPP"):
        return Path(os.environ["MOESIFT_LLAMA_CPP"])
    ver = version("llama-cpp-python")
    dest = cache / f"llama.cpp-{ver}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    if sdist is None:
        sdist = cache / f"llama_cpp_python-{ver}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                            f"llama-cpp-python=={ver}", "-d", str(cache)], check=True)
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(keep)]
        for m in members:
            m.name = m.name[len(prefix):]
        tf.extractall(tmp, members=members, filter="data")
    os.replace(tmp, dest)
    return dest


def check(engine: str, model_type: str | None, ref: str | None, work: Path) -> dict:
    from engine_models import engine_model
    from test_trim import plan_for

    from moesift.apply.trim import trim
    from moesift.assets import reference_model
    from moesift.evaluation.verify import verify
    from moesift.formats.checkpoint import CheckpointIndex

    name = ref or model_type
    d = work / f"{engine}-{name}"
    d.mkdir(parents=True)
    src = reference_model(ref) if ref else engine_model(engine, model_type, d / "src", tokenizer=engine == "llama.cpp")
    t0 = time.perf_counter()
    out = trim(src, plan_for(CheckpointIndex.build(src).spec, uniform=True), d / "trimmed", progress=False)
    r = verify(src, out, max_new_tokens=8, max_samples=4, progress=False, engine=engine)
    r["seconds"] = time.perf_counter() - t0
    return r


def quantize(src: Path, dst: Path, ftype: int) -> Path:
    """`src` (GGUF) quantized to llama.cpp file type `ftype` by llama.cpp's own quantizer."""
    import ctypes

    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, None)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = usable_cores()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}) returned {rc}")
    return dst


def eval_table(work: Path, max_length: int = 128, decode_tokens: int = 32, repeats: int = 9) -> None:
    """The llama.cpp eval table of qwen3moe-ref (see the module docstring)."""
    import llama_cpp

    from moesift.assets import reference_model, workload
    from moesift.engines.llamacpp import convert
    from moesift.evaluation.eval_gguf import eval_llamacpp
    from moesift.evaluation.evaluate import eval_model
    from moesift.record.tracer import trace
    from moesift.selection.planner import plan

    ref = reference_model("qwen3moe-ref")
    f32 = work / "qwen3moe-ref-F32.gguf"
    convert(ref, f32)
    files = {"F32": f32, "Q8_0": quantize(f32, work / "qwen3moe-ref-Q8_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
             "Q4_0": quantize(f32, work / "qwen3moe-ref-Q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)}
    t = trace(ref, workload("prose", "trace"), max_length=max_length, progress=False, device="cpu", dtype="float32")
    plans = [plan(t, keep=k, uniform=True, model=ref, progress=False) for k in (0.5, 0.25)]
    for p, k in zip(plans, (50, 25), strict=True):
        p.source = f"{k}%"
    data = [workload("prose", "eval")]
    hf = eval_model(ref, data, plans=plans, top_k=[2, 1], max_length=max_length, device="cpu", dtype="float32",
                    progress=False)
    hf_ppl = {r["name"]: r["ppl"] for r in hf["results"]}
    print(f"qwen3moe-ref (top-4 of 32 experts), {hf['tokens']} tokens of prose.eval in {hf['windows']} windows of "
          f"<= {max_length}; tokens/s: median of {repeats}, prefill of the longest window, {decode_tokens} greedy tokens")
    print(f"{'file':<5} {'setting':<9} {'ppl':>8} {'x full':>7} {'transformers':>12} {'MB':>6} {'prefill t/s':>11} "
          f"{'decode t/s':>10}")
    for name, f in files.items():
        r = eval_llamacpp(f, data, plans=plans, top_k=[2, 1], max_length=max_length, hf_model=ref, progress=False,
                          decode_tokens=decode_tokens, repeats=repeats)
        for x in r["results"]:
            setting = "top-k 4" if x["kind"] == "full" else x["name"].replace("plan ", "keep ")
            print(f"{name:<5} {setting:<9} {x['ppl']:>8.3f} {x['ppl_ratio']:>7.3f} {hf_ppl[x['name']]:>12.3f} "
                  f"{x['bytes'] / 1e6:>6.2f} {x['prefill_tokens_per_s']:>11.0f} {x['decode_tokens_per_s']:>10.1f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", action="append", choices=["mlx", "llama.cpp"], help="default: both")
    ap.add_argument("--family", action="append", help="only these model_types / bundled models (default: all)")
    ap.add_argument("--tests", action="store_true", help="also run tests/test_engines_llamacpp.py and "
                    "tests/test_llamacpp_engine.py")
    ap.add_argument("--eval", action="store_true", help="only the llama.cpp eval table (qwen3moe-ref GGUF files)")
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist holding llama.cpp's converter")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moesift")
    args = ap.parse_args()
    engines = args.engine or ["mlx", "llama.cpp"]
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(f"host: {cpu_name()}, {usable_cores()} usable cores, Python {sys.version.split()[0]}")
    from engine_models import ENGINE_FAMILIES

    from moesift.core.errors import MoesiftError

    if "llama.cpp" in engines:
        args.cache.mkdir(parents=True, exist_ok=True)
        os.environ["MOESIFT_LLAMA_CPP"] = str(llama_cpp_converter(args.cache, args.sdist))
        print(f"llama.cpp converter: {os.environ['MOESIFT_LLAMA_CPP']}")
    if args.eval:
        with tempfile.TemporaryDirectory(prefix="moesift-eval-gguf-") as tmp:
            eval_table(Path(tmp))
        return
    refs = {"mlx": ["qwen3moe-ref", "deepseekv3-ref"], "llama.cpp": ["qwen3moe-ref"]}
    print(f"{'engine':<10} {'model':<15} {'top-1':>6} {'max rel diff':>12} {'greedy':>9} {'s':>6}")
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moesift-engines-") as tmp:
        for engine in engines:
            jobs = [(mt, None) for mt in sorted(ENGINE_FAMILIES[engine])] + [(None, r) for r in refs[engine]]
            jobs = [j for j in jobs if not args.family or (j[0] or j[1]) in args.family]
            for mt, ref in jobs:
                try:
                    r = check(engine, mt, ref, Path(tmp))
                except MoesiftError as e:
                    print(f"{engine:<10} {mt or ref:<15} error: {e}")
                    continue
                worst[engine] = max(worst.get(engine, 0.0), r["max_rel_logit_diff"])
                print(f"{engine:<10} {mt or ref:<15} {r['top1_agreement']:>6.3f} {r['max_rel_logit_diff']:>12.2e} "
                      f"{'identical' if r['generations_identical'] else 'DIFFER':>9} {r['seconds']:>6.1f}", flush=True)
    for engine, w in worst.items():
        print(f"{engine}: largest relative logit difference {w:.2e}")
    if args.tests:
        t0 = time.perf_counter()
        files = [str(ROOT / "tests" / f) for f in ("test_engines_llamacpp.py", "test_llamacpp_engine.py")]
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        print(f"tests/test_engines_llamacpp.py tests/test_llamacpp_engine.py: exit code {rc}, "
              f"{time.perf_counter() - t0:.0f} s")
        sys.exit(rc)


if __name__ == "__main__":
    main()
