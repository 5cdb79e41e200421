#!/usr/bin/env bash
# Everything a CUDA machine should run, in one call: install, CUDA tests (bf16), kernel check,
# benchmarks, report. Uses the machine's own python3 (torch and triton already there) and installs
# nothing from the network. Results land in benchmarks/results/ and, when $OUT is set, are copied
# there after each stage (log.txt, the CSVs and the plots), so a call cut short keeps what finished.
# Each stage has its own time limit (seconds; override with e.g. T_ENGINE=300), so one slow stage
# cannot starve the rest of a call; a short table prints last.
#
# The full benchmarks take longer than one 10-minute device call (the engine sweep alone runs
# `generate` twice for 1 to 256 pairs of 512 tokens), so run them in four calls:
#   bash benchmarks/gpu_run.sh tests
#   bash benchmarks/gpu_run.sh prefill decode
#   bash benchmarks/gpu_run.sh engine
#   bash benchmarks/gpu_run.sh detect
#   bash benchmarks/gpu_run.sh causal
# (`bash benchmarks/gpu_run.sh` alone runs every stage in turn, each within its limit.) A copy of
# the tree without .git records its commit with RETMASK_COMMIT=<hash> in front of the command.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
STAGES=${*:-tests prefill decode engine detect causal}
declare -A LIMIT=([tests]=${T_TESTS:-540} [prefill]=${T_PREFILL:-290} [decode]=${T_DECODE:-240}
                  [engine]=${T_ENGINE:-560} [detect]=${T_DETECT:-560} [causal]=${T_CAUSAL:-560})
declare -A STATUS

$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { cat "$LOG"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

save() { cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null; true; }

run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name (limit ${LIMIT[$name]} s)" | tee -a "$LOG"
  timeout --kill-after=10 "${LIMIT[$name]}" "$@" >>"$LOG" 2>&1
  local rc=$?
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="cut at ${LIMIT[$name]} s" ;;
    *) STATUS[$name]="exit $rc" ;;
  esac
  STATUS[$name]="${STATUS[$name]} ($((SECONDS - t0)) s)"
  echo "== $name: ${STATUS[$name]}" | tee -a "$LOG"
  save
}

for s in $STAGES; do
  case $s in
    tests) run_stage tests $PY -m pytest -q -m cuda tests -p no:cacheprovider
           grep -E "passed|failed|error" "$LOG" | tail -n 3 ;;
    prefill) run_stage prefill $PY benchmarks/bench_prefill.py ${PREFILL_ARGS:-} ;;
    decode) run_stage decode $PY benchmarks/bench_decode.py ${DECODE_ARGS:-} ;;
    engine) run_stage engine $PY benchmarks/bench_engine.py ${ENGINE_ARGS:-} ;;
    detect) run_stage detect $PY benchmarks/bench_detect.py --causal-lengths '' ${DETECT_ARGS:-} ;;
    causal) run_stage causal $PY benchmarks/bench_detect.py --lengths '' --sweep-length 0 ${CAUSAL_ARGS:-} ;;
    *) echo "unknown stage $s (tests prefill decode engine detect causal)"; exit 2 ;;
  esac
done
$PY benchmarks/report.py --print 2>&1 | tee "$OUT/report.md"
echo
for s in $STAGES; do printf '%-8s %s\n' "$s" "${STATUS[$s]}"; done
