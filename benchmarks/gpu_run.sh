#!/usr/bin/env bash
# Everything a CUDA machine should run, in one call: install, CUDA tests (bf16), benchmarks, report.
# Uses the machine's own python3 (torch and triton already there); installs nothing from the network.
# Results land in benchmarks/results/ (and in $OUT when that is set), a short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
$PY -m retmask.cli check-kernels 2>&1 | tee "$OUT/check_kernels.txt" | tail -n 14
$PY benchmarks/bench_prefill.py ${PREFILL_ARGS:-} 2>&1 | tee "$OUT/prefill.log" | grep -v "^|" | tail -n 5
$PY benchmarks/bench_decode.py ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | grep -v "^|" | tail -n 5
cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null
$PY benchmarks/report.py --print
echo "cuda tests exit code: $tests_rc"
