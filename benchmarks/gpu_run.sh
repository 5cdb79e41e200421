#!/usr/bin/env bash
# Everything a CUDA machine should run, in one call: install, CUDA tests (bf16), kernel check,
# benchmarks, report. Uses the machine's own python3 (torch and triton already there) and installs
# nothing from the network. Results land in benchmarks/results/ and, when $OUT is set, are copied
# there (log.txt, the CSVs and the plots); a short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { cat "$LOG"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"
$PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee -a "$LOG" | tail -n 8
tests_rc=${PIPESTATUS[0]}
$PY -m retmask.cli check-kernels 2>&1 | tee -a "$LOG" | tail -n 3
$PY benchmarks/bench_prefill.py ${PREFILL_ARGS:-} >>"$LOG" 2>&1 || echo "bench_prefill failed (see log.txt)"
$PY benchmarks/bench_decode.py ${DECODE_ARGS:-} >>"$LOG" 2>&1 || echo "bench_decode failed (see log.txt)"
$PY benchmarks/bench_engine.py ${ENGINE_ARGS:-} >>"$LOG" 2>&1 || echo "bench_engine failed (see log.txt)"
$PY benchmarks/bench_detect.py ${DETECT_ARGS:-} >>"$LOG" 2>&1 || echo "bench_detect failed (see log.txt)"
cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null
$PY benchmarks/report.py --print
echo "cuda tests exit code: $tests_rc"
