#!/usr/bin/env bash
# On the GPU machine (no network, no apt): run the GPU tests with the CRIU carried from the dev machine.
# Carry: .deps/criu-bundle (criu + its shared libraries, see docs/benchmarks.md) and .whl (pydantic for py3.12).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src WARMSTART_CRIU=$PWD/.deps/criu-bundle/criu
export LD_LIBRARY_PATH=$PWD/.deps/criu-bundle/lib WARMSTART_REQUIRE_CRIU=1 PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$WARMSTART_CRIU" --version | head -1
  "$WARMSTART_CRIU" check 2>&1 | tail -1
  python3 -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda-bindings", cuda.bindings.__version__)'
  python3 -m pytest tests/test_gpu.py tests/test_e2e.py -q -s -x -p no:cacheprovider 2>&1
} | tee "$out/gpu_check.log"
