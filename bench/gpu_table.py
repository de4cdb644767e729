"""The one table of bench/gpu.sh: every figure beside its target, read from the benchmarks' JSON files.

    python bench/gpu_table.py WORK_DIR [--out table.md]

Reads WORK_DIR/trace.json (bench/trace_overhead.py --json), load.json (bench/load_speed.py --json) and
trim.json (bench/trim_speed.py --json); any WORK_DIR/extra-*.json holding {"rows": [{"what", "measured",
"target", "ok"}]} adds its rows as they are (the hook for further benchmarks). A missing or failed
benchmark is a row saying so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(work: Path) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    out: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    tr = _load(work / "trace.json")
    if tr is None:
        out.append(("trace overhead", "not run / failed (see trace.log)", "", ""))
    else:
        notes.append(f"trace: {tr['hardware']}, torch {tr['torch']}")
        for phase, target in (("prefill", 1.01), ("decode", 1.02)):
            ph = tr["phases"].get(phase)
            if ph is None:
                continue
            v = ph["variants"]
            m, p = v["moesift"], v["plain"]
            out.append((f"{phase}: traced / plain ({ph['layers']} layers, {ph['shape']})",
                        f"{m['ratio']:.4f}x (plain {p['best_ms']:.3f} ms, traced {m['best_ms']:.3f} ms)",
                        f"<= {target:.2f}x", "yes" if m["ratio"] <= target else "no"))
            for name in ("hooks-only", "per-layer"):
                if name in v:
                    out.append((f"{phase}: {name} / plain", f"{v[name]['ratio']:.4f}x", "(reference)", ""))
            if "alone_ms" in m:
                out.append((f"{phase}: recorder work alone, one forward replayed", f"{m['alone_ms']:.3f} ms", "", ""))
    ld = _load(work / "load.json")
    if ld is None:
        out.append(("load speed", "not run / failed (see load.log)", "", ""))
    else:
        notes.append(f"load: {ld['hardware']}, checkpoint {ld['checkpoint_bytes'] / 1e9:.2f} GB")
        for r in ld["rows"]:
            if r.get("errors"):
                out.append((r["load"], "failed: " + "; ".join(r["errors"]), "", "no"))
                continue
            dev = f", device peak {r['device_peak_gib']:.2f} GiB" if r.get("device_peak_gib") is not None else ""
            meas = (f"cold {r['cold_s']:.2f} s / warm {r['warm_s']:.2f} s ({r['bytes'] / 1e9:.2f} GB), "
                    f"peak RSS +{r['rss_peak_mib']:.0f} MiB{dev}")
            tgt = "" if not r.get("target_s") else f"<= {r['target_s'][0]:.2f} / {r['target_s'][1]:.2f} s"
            out.append((r["load"], meas, tgt or "(reference)", r.get("ok") or ""))
    tm = _load(work / "trim.json")
    if tm is None:
        out.append(("trim speed", "not run / failed (see trim.log)", "", ""))
    else:
        out.append((f"trim, {tm['kept_per_layer']}/{tm['experts']} experts kept, sha256 on "
                    f"({tm['written_bytes'] / 1e9:.2f} GB written, {tm['output_shards']} shard(s))",
                    f"{tm['trim_median_s']:.2f} s = {tm['trim_mb_s']:.0f} MB/s; cp {tm['cp_median_s']:.2f} s = "
                    f"{tm['cp_mb_s']:.0f} MB/s; ratio {tm['ratio_trim_to_cp']:.2f}x; sha256 {tm['sha256_mb_s']:.0f} MB/s "
                    f"on one core; peak RSS {tm['peak_rss_bytes'] / 2**20:.0f} MiB",
                    "<= 1.25x cp", "yes" if tm["ratio_trim_to_cp"] <= 1.25 else "no"))
        out.append(("trim, sha256 off", f"{tm['trim_no_checksums_median_s']:.2f} s = {tm['trim_no_checksums_mb_s']:.0f} MB/s",
                    "(reference)", ""))
    of = _load(work / "offload.json")
    if of is not None:  # bench/offload_speed.py --json
        i = of["info"]
        notes.append(f"offload: {i['machine']}, torch {i['torch']}, {i['layers']} layers of hidden {i['hidden']}, "
                     f"{i['experts']} experts top-{i['top_k']}, {i['dtype']}; skipped: {', '.join(i['skipped']) or 'none'}")
        full = next((r for r in of["rows"] if r["variant"] == "full"), None)
        for r in of["rows"]:
            if r["variant"] == "full":
                out.append(("offload: whole model on the device", f"decode b1 {r['decode_b1']:.1f} / b8 "
                            f"{r['decode_b8']:.1f} tok/s, prefill {r['prefill']:.0f} tok/s", "(reference)", ""))
                continue
            hit = f", hit {r['hit_rate']:.3f}" if r.get("hit_rate") is not None else ""
            pred = (f" (predicted held-out {r['predicted_heldout_hit_rate']:.3f})"
                    if r.get("predicted_heldout_hit_rate") is not None else "")
            meas = (f"decode b1 {r.get('decode_b1', 0):.1f} tok/s = {r.get('decode_b1_vs_full', 0):.2f}x full, "
                    f"b8 {r.get('decode_b8_vs_full', 0):.2f}x, prefill {r.get('prefill_vs_full', 0):.2f}x{hit}{pred}")
            tgt, ok = "", ""
            if r["variant"] == "moesift" and r["budget"] == 50 and full is not None:
                acc = next((a for a in of["rows"] if a["variant"] == "accelerate" and a["budget"] == 50), None)
                vs = r["decode_b1"] / acc["decode_b1"] if acc and acc.get("decode_b1") else None
                meas += f"; {vs:.1f}x accelerate offload" if vs else "; accelerate offload not measured"
                tgt = ">= 0.6x full, >= 3x accelerate"
                ok = "yes" if r.get("decode_b1_vs_full", 0) >= 0.6 and (vs or 0) >= 3 else "no"
            out.append((f"offload: {r['variant']} at {r['budget']}% of expert bytes", meas, tgt, ok))
    cal = _load(work / "calibrate.json")
    if cal is not None:  # bench/calibrate_speed.py --json
        out.append((f"calibrated selection: one layer, {cal['experts']} experts -> {cal['kept']}, {cal['tokens']} tokens, "
                    f"{cal['dtype']}", f"{cal['layer_s']:.2f} s ({cal['forwards']} block forwards of "
                    f"{cal['block_forward_ms']:.1f} ms); {cal['layers']} layers: {cal['estimate_s']:.0f} s",
                    "minutes for 30B-A3B", "yes" if cal["estimate_s"] <= 600 else "no"))
    for p in sorted(work.glob("extra-*.json")):
        x = _load(p)
        if x is None:
            out.append((p.stem, "unreadable", "", ""))
            continue
        for r in x.get("rows", []):
            out.append((str(r.get("what", p.stem)), str(r.get("measured", "")), str(r.get("target", "")),
                        str(r.get("ok", ""))))
    return out, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    a = ap.parse_args()
    rs, notes = rows(Path(a.work))
    lines = ["| what | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {w} | {m} | {t} | {o} |" for w, m, t, o in rs]
    text = "\n".join(lines + [""] + notes) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
