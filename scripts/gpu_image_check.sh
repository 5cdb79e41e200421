#!/usr/bin/env bash
# Rehearse a GPU run on this CPU machine: a scratch venv with the GPU image's versions
# (triton 3.6.0, transformers 5.17.0) and without the packages that image lacks (rouge-score,
# datasets, trl), then the checks that need no GPU:
#   - every Triton kernel compiles for sm_90 and sm_80 with that Triton (retmask.kernels.aot);
#   - pytest collects and the engine, heads, NIAH and detection tests pass with that transformers;
#   - the model-level benchmarks run in their tiny mode.
# torch stays at this machine's 2.13.0 CPU build (the image has 2.11). Takes ~5 minutes.
#
#   bash scripts/gpu_image_check.sh [venv folder, default /tmp/retmask-gpu-image]
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:-/tmp/retmask-gpu-image}
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.17.0}
if [ ! -x "$V/bin/python" ]; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0
  "$V/bin/pip" install -q --no-deps "triton==$TRITON_VERSION"
  "$V/bin/pip" install -q "transformers==$TRANSFORMERS_VERSION" numpy tabulate tqdm matplotlib safetensors pytest
fi
"$V/bin/pip" install -q --no-deps --no-build-isolation -e .
for m in rouge_score datasets trl; do
  if "$V/bin/python" -c "import $m" 2>/dev/null; then echo "$m is installed in $V; the GPU image has none"; exit 1; fi
done
"$V/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
TRITON_INTERPRET=0 "$V/bin/python" -m retmask.kernels.aot 90 80 | tail -n 1
"$V/bin/python" -m pytest -q -p no:cacheprovider -m cuda tests | tail -n 1  # collection works without those packages
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_host.py tests/test_heads.py tests/test_niah.py \
  tests/test_scoring.py -k "not triton and not rouge" | tail -n 1  # ROUGE needs rouge-score
out=$(mktemp -d)
"$V/bin/python" benchmarks/bench_engine.py --tiny --out "$out/engine.csv" | tail -n 2
"$V/bin/python" benchmarks/bench_detect.py --tiny --out "$out/detect.csv" | tail -n 2
echo "gpu image rehearsal passed"
