#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py): parity with transformers, a ~1B training step with torch.compile, FSDP2 at world
# size 1, and the engine against transformers' compiled static-cache `generate`; one JSON log in bench/results/ (or
# $APERTUS_BENCH_RESULTS). About 8 minutes on one H200:
#     bench/gpu.sh                    # --size h200
#     bench/gpu.sh --size tiny        # the CPU smoke run (seconds; tests/test_bench_gpu.py)
# Other options go to bench/gpu.py (--sections, --no-compile, --peak-tflops). The run is stopped with SIGINT after
# $APERTUS_GPU_TIMEOUT seconds (default 480), which still writes the log: the unfinished section reads "interrupted",
# the ones not reached "pending".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, installed or not
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # sections of different shapes
exec timeout --signal=INT --kill-after=60 "${APERTUS_GPU_TIMEOUT:-480}" "$PYTHON" bench/gpu.py "$@"
