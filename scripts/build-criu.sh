#!/usr/bin/env bash
# Builds CRIU >= 4.2 into PREFIX/bin/criu: Debian sid's criu source package (from the mirror this machine's
# apt sources use) with scripts/criu/*.patch applied, on Debian 12, installing the build packages it needs.
# Used by scripts/setup.sh, scripts/build-agent-image.sh and deploy/image/Dockerfile. Idempotent: a PREFIX whose
# criu is new enough and carries these patches is left alone; it is rebuilt when the patches change.
set -euo pipefail
[ $# = 1 ] || { echo "usage: scripts/build-criu.sh PREFIX" >&2; exit 2; }
prefix=$1
here=$(cd "$(dirname "$0")" && pwd)
say_tag=${say_tag:-criu}
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
criu_min=4.2
patches_id=$(cat "$here"/criu/*.patch | sha256sum | cut -c1-16)

build_deps=(build-essential pkg-config libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
    libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev
    python3-protobuf xz-utils iproute2 util-linux patch)

criu_version() { "$1" --version 2>/dev/null | awk '/^Version:/ {print $2}'; }

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
    for p in "$here"/criu/*.patch; do
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

# The checkout's own build is used even where a criu is on PATH: it carries scripts/criu/*.patch
# (threaded page reads on restore). It is rebuilt when those patches change.
if [ -x "$prefix/bin/criu" ] && have=$(criu_version "$prefix/bin/criu") && version_ok "$have" "$criu_min" \
    && [ "$(cat "$prefix/patches" 2>/dev/null)" = "$patches_id" ]; then
    say "criu $have in $prefix"; exit 0
fi
build_criu
say "criu $(criu_version "$prefix/bin/criu") installed in $prefix"
