#!/usr/bin/env bash
# On the dev machine: build what bench/gpu.sh needs on the GPU machine (no network there), in ignored folders:
#   .deps/criu-bundle/{criu,lib/}   the CRIU scripts/setup.sh built, with the shared libraries ldd lists (not glibc's)
#   .deps/reach/counter             bench/reach/counter.cu built with nvcc for Hopper (bench/nosdk.py --reach), if nvcc is here
#   .whl/                           pydantic, cryptography and their dependencies as wheels for the GPU machine's python (3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
criu=${WARMSTART_CRIU:-.deps/criu/bin/criu}
[ -x "$criu" ] || { echo "error: no CRIU at $criu — run scripts/setup.sh first"; exit 3; }
rm -rf .deps/criu-bundle && mkdir -p .deps/criu-bundle/lib
cp "$criu" .deps/criu-bundle/criu
ldd "$criu" | awk '/=> \//{print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
  | xargs -I{} cp -L {} .deps/criu-bundle/lib/
if command -v nvcc >/dev/null; then
  mkdir -p .deps/reach && nvcc -O2 -arch=sm_90 -o .deps/reach/counter bench/reach/counter.cu
else
  echo "warning: no nvcc here: bench/nosdk.py --reach skips its CUDA C program"
fi
rm -rf .whl && mkdir .whl
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --implementation cp -d .whl \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "cryptography==$(.venv/bin/python -c 'import cryptography; print(cryptography.__version__)')"
ls .deps/criu-bundle/lib | wc -l | xargs echo "criu-bundle: libraries:"; ls .whl
