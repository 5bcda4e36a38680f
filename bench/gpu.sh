#!/usr/bin/env bash
# On the GPU machine (no network, no apt), with the CRIU and wheels carried from the dev machine:
#   bench/gpu.sh tests          GPU tests + the end-to-end suite
#   bench/gpu.sh bench 1b [8b]  bench/gpu.py for those shapes; table and JSON under $OUT
#   bench/gpu.sh probe 1b [STAGE...]  bench/probes/checkpoint_size.py: what the checkpoint holds, by stage
#   bench/gpu.sh nosdk 1b [8b]  bench/nosdk.py --reach: CUDA processes without the SDK, against the upstream recipe
#   bench/gpu.sh weights 8b     the weight service's GPU test, then bench/weights_gpu.py for that shape
#   bench/gpu.sh dumps 8b [ARG...]  bench/probes/dump_options.py: one worker's CRIU dump with each variant's options
# Carry: .deps/criu-bundle (criu + its shared libraries) and .whl (pydantic for the machine's python);
# docs/benchmarks.md says how to make both.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
[ -d /tmp/site/pydantic ] && [ -d /tmp/site/cryptography ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m compileall -q -j 0 src >/dev/null  # the copied tree has no bytecode: not compiled again per command
export PYTHONPATH=/tmp/site:$PWD/src WARMSTART_CRIU=$PWD/.deps/criu-bundle/criu
export LD_LIBRARY_PATH=$PWD/.deps/criu-bundle/lib WARMSTART_REQUIRE_CRIU=1 PYTHONUNBUFFERED=1
export WARMSTART_CACHE=${WARMSTART_CACHE:-/var/tmp/warmstart-bench/cache}
mode=${1:-tests}; shift || true
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$WARMSTART_CRIU" --version | head -1
  python3 -c 'import torch, transformers, cuda.bindings; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda-bindings", cuda.bindings.__version__)'
  df -h /var/tmp | tail -1; free -g | sed -n 2p
  case "$mode" in
    tests) python3 -m pytest tests/test_gpu.py tests/test_gpu_logic.py tests/test_e2e.py -q -s -p no:cacheprovider 2>&1 ;;
    bench) python3 bench/gpu.py $(printf -- '--shape %s ' "$@") --out "$out" 2>&1 ;;
    nosdk) python3 bench/nosdk.py $(printf -- '--shape %s ' "$@") --reach --out "$out" 2>&1 ;;
    weights) python3 -m pytest tests/test_gpu.py -k weights -q -s -p no:cacheprovider 2>&1
             python3 bench/weights_gpu.py --shape "${1:-8b}" --out "$out" 2>&1 ;;
    dumps) python3 bench/probes/dump_options.py --shape "${1:-8b}" --out "$out" "${@:2}" 2>&1 ;;
    probe) model=$(python3 -c 'from warmstart.reference import model as m; print(m.ensure(getattr(m, "LLAMA_" + "'"${1:-1b}"'".upper()), "bfloat16", "cuda"))')
           python3 bench/probes/checkpoint_size.py "$model" --out "$out" ${2:+--stage "${@:2}"} 2>&1 ;;
    *) echo "usage: bench/gpu.sh tests | bench SHAPE... | nosdk SHAPE... | probe SHAPE [STAGE...] | weights SHAPE | dumps SHAPE" ;;
  esac
} | tee "$out/gpu-$mode.log"
