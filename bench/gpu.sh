#!/usr/bin/env bash
# Every GPU benchmark of moesift in one run, one table at the end (figure beside target).
#
#   PYTHONPATH=. bash bench/gpu.sh          # one CUDA GPU (H100/H200): Qwen3-30B-A3B shapes, a few minutes
#   PYTHONPATH=. bash bench/gpu.sh --cpu    # the same benchmarks at small shapes on the CPU (a check of the script)
#
# Builds the random-weight checkpoints it needs in $MOESIFT_BENCH_DIR/moesift-gpu-bench (default under /tmp;
# about 20 GB on the GPU run; removed at the end unless MOESIFT_BENCH_KEEP=1). Each benchmark logs to <dir>/<name>.log and writes
# <dir>/<name>.json; a failing one becomes a row saying so and the others still run. The table is printed and,
# when $OUT is set, written to $OUT/gpu-table.md, with every JSON result in $OUT/gpu-results.json and every log
# in $OUT/gpu-logs.txt (three files, whatever the number of benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
PY=${PYTHON:-python3}
WORK=${MOESIFT_BENCH_DIR:-/tmp}/moesift-gpu-bench
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s)

step() {  # step NAME COMMAND...: run, log, report rc and seconds
  local name=$1; shift
  local t=$(date +%s)
  "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $(( $(date +%s) - t )) s" >&2
  [[ $rc -eq 0 ]] || tail -n 5 "$WORK/$name.log" >&2
}

if [[ $MODE == gpu ]]; then
  step trace $PY bench/trace_overhead.py --device cuda --phase both --json "$WORK/trace.json"
  step load $PY bench/load_speed.py --device cuda --dir "$WORK/ckpt" --json "$WORK/load.json"
  step trim sh -c "$PY bench/trim_speed.py --src '$WORK/ckpt/full' --keep-fraction 0.5 --repeat 2 --dir '$WORK/trim' --json > '$WORK/trim.json'"
else
  step trace $PY bench/trace_overhead.py --device cpu --phase both --repeats 3 --decode-repeats 2 --steps 8 \
    --tokens 256 --decode-layers 2 --json "$WORK/trace.json"
  step load $PY bench/load_speed.py --device cpu --layers 2 --hidden 512 --experts 32 --moe-inter 256 \
    --dir "$WORK/ckpt" --json "$WORK/load.json"
  step trim sh -c "$PY bench/trim_speed.py --src '$WORK/ckpt/full' --keep-fraction 0.5 --repeat 1 --dir '$WORK/trim' --json > '$WORK/trim.json'"
fi

# ---- residency and selection --------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  step offload_verify $PY bench/offload_verify.py --device cuda
  step offload sh -c "$PY bench/offload_speed.py --device cuda --time-budget 85 --json > '$WORK/offload.json'"
  step calibrate $PY bench/calibrate_speed.py --device cuda --tokens 4096 --json "$WORK/calibrate.json"
else
  step offload_verify $PY bench/offload_verify.py --device cpu --samples 2
  step offload sh -c "$PY bench/offload_speed.py --device cpu --budgets 50 --time-budget 30 --json > '$WORK/offload.json'"
  step calibrate $PY bench/calibrate_speed.py --device cpu --tokens 256 --experts 32 --json "$WORK/calibrate.json"
fi
# Further benchmarks: one `step` each; "$WORK/extra-<name>.json" = {"rows": [{"what", "measured", "target", "ok"}]}
# joins the table. They may reuse "$WORK/ckpt/full", "$WORK/ckpt/plan{25,50,75}.json", "$WORK/ckpt/trim{25,50,75}".
# -------------------------------------------------------------------------------------------------------

echo "== moesift bench/gpu.sh ($MODE) $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - T0 )) s in all =="
$PY bench/gpu_table.py "$WORK" --out "$WORK/gpu-table.md"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT" && cp "$WORK/gpu-table.md" "$OUT/"
  $PY - "$WORK" "$OUT/gpu-results.json" <<'PYEOF'
import json, sys
from pathlib import Path
out = {}
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        out[p.stem] = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        out[p.stem] = {"unreadable": str(e)}
Path(sys.argv[2]).write_text(json.dumps(out, indent=2))
PYEOF
  for f in "$WORK"/*.log; do echo "===== $(basename "$f")"; cat "$f"; done > "$OUT/gpu-logs.txt"
fi
[[ "${MOESIFT_BENCH_KEEP:-0}" == 1 ]] || rm -rf "$WORK"
