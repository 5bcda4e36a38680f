#!/usr/bin/env bash
# Builds the warmstart agent image (the image deploy/image/Dockerfile describes) on a Debian 12 machine with no
# Docker daemon and no registry, from Debian's own packages, as root:
#   mmdebstrap  the Debian 12 root filesystem (minbase, slimmed as debian:12-slim is, + deploy/image/packages.txt)
#   CRIU        scripts/build-criu.sh's build (the one scripts/setup.sh makes), as /usr/local/sbin/criu
#   warmstart   wheels of this checkout and its dependencies (pip, from PyPI), installed by deploy/image/install.sh
#   umoci       an OCI image archive of two layers (the Debian base; CRIU and warmstart) that
#               `ctr -n k8s.io images import`, `skopeo copy oci-archive:FILE ...` and `buildah pull` accept.
# It installs what it needs (mmdebstrap, umoci, and runc to run the image in tests/test_agent_image.py) with apt,
# from the mirror this machine's apt sources already use. The image is named as the Helm chart's default
# (warmstart/agent:<version>; containerd sees docker.io/warmstart/agent:<version>).
# The archive is kept under .deps/agent-image/ and reused while its inputs are unchanged; its path is printed.
# Usage: scripts/build-agent-image.sh [--output FILE] [--name REPOSITORY:TAG] [--extras k8s[,gpu]]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
say_tag=agent-image
# shellcheck source=scripts/lib.sh
. "$repo/scripts/lib.sh"
die() { say "error: $*"; exit 1; }

version=$(awk -F'"' '/^version = / {print $2; exit}' "$repo/pyproject.toml")
name=warmstart/agent:$version
output="" extras=k8s
while [ $# -gt 0 ]; do
    case "$1" in
        --output) output=${2:?--output needs a FILE}; shift 2 ;;
        --name) name=${2:?--name needs REPOSITORY:TAG}; shift 2 ;;
        --extras) extras=${2:?--extras needs a list, e.g. k8s,gpu}; shift 2 ;;
        *) echo "usage: scripts/build-agent-image.sh [--output FILE] [--name REPOSITORY:TAG] [--extras k8s[,gpu]]" >&2
           exit 2 ;;
    esac
done
case "$name" in *:*) ;; *) die "--name $name has no tag: write it as REPOSITORY:TAG" ;; esac
tag=${name##*:}
cache=$repo/.deps/agent-image
image_dir=$repo/deploy/image
criu_prefix=${WARMSTART_PREFIX:-$repo/.deps/criu}

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap and chroot need it)"
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ "$codename" = bookworm ] || die "this builds on Debian 12 (bookworm) only, this is '$codename': use deploy/image/Dockerfile"

full_name() { # the name containerd and the kubelet give REPOSITORY:TAG (docker.io/ when no registry is named)
    local first=${1%%/*}
    case "$1" in
        */*) case "$first" in *.*|*:*|localhost) echo "$1" ;; *) echo "docker.io/$1" ;; esac ;;
        *) echo "docker.io/library/$1" ;;
    esac
}

debian_sources() {
    # One-line apt sources for bookworm, bookworm-updates and bookworm-security from this machine's own Debian
    # entries (deb822 or one-line), main only: the mirrors it already uses, never a hard-coded host.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && awk 'function out() { if (types ~ /(^| )deb( |$)/) { n = split(suites, s, " ");
                for (i = 1; i <= n; i++) if (s[i] ~ /^bookworm(-updates|-security)?$/) print "deb " uri " " s[i] " main" }
                types = ""; suites = ""; uri = "" }
            /^[[:space:]]*$/ { out(); next }
            /^Types:/ { $1 = ""; types = $0 } /^Suites:/ { $1 = ""; suites = $0 } /^URIs:/ { uri = $2 }
            END { out() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && awk '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 ~ /^bookworm(-updates|-security)?$/) print "deb " $2 " " $3 " main" }' "$f"
    done
    return 0
}

hash_files() { # a digest of these files' names and contents
    (cd "$1" && shift && find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
}

stage_source() { # the checkout's package source, as `docker build` copies it (no caches, no build output)
    mkdir -p "$1"
    tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' -cf - pyproject.toml README.md src \
        | tar -C "$1" -xf -
}

build_wheels() { # build_wheels SOURCE DIR: wheels of warmstart[extras], its dependencies and pip
    local pyvenv=$cache/pip
    [ -x "$pyvenv/bin/pip" ] || python3 -m venv "$pyvenv" || die "python3 -m venv failed: install python3-venv"
    say "building wheels of warmstart[$extras] and its dependencies (PyPI)"
    "$pyvenv/bin/pip" wheel --quiet --disable-pip-version-check --wheel-dir "$2" "$1[$extras]" 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    "$pyvenv/bin/pip" download --quiet --disable-pip-version-check --no-deps --dest "$2" pip 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    ls "$2"/warmstart-*.whl >/dev/null 2>&1 || die "pip built no warmstart wheel from $1: see pip's output above"
}

build_base() { # build_base LAYOUT: an OCI layout whose tag "base" is the Debian 12 root filesystem
    local sources bundle=$work/base
    sources=$(debian_sources | awk '!seen[$0]++')
    echo "$sources" | grep -q ' bookworm main$' \
        || die "no Debian 12 (bookworm) entry in /etc/apt/sources.list*: add one for your Debian mirror"
    umoci init --layout "$1"
    umoci new --image "$1:base"
    umoci unpack --image "$1:base" "$bundle" >/dev/null
    say "making the Debian 12 root filesystem with mmdebstrap (about a minute)"
    local includes
    includes=$(sed 's/#.*//' "$image_dir/packages.txt" | xargs | tr ' ' ,)
    # shellcheck disable=SC2016  # the hook's $1 is mmdebstrap's (the root filesystem)
    # merged-usr: /usr merged as debian:12's is, without the usrmerge package (and the perl it pulls in).
    mmdebstrap --quiet --variant=minbase --include="$includes" --dpkgopt="$image_dir/slim.dpkg.cfg" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --aptopt='Acquire::Languages "none"' \
        --customize-hook='rm -f "$1"/etc/resolv.conf "$1"/etc/hostname' \
        bookworm "$bundle/rootfs" - <<<"$sources" >"$work/mmdebstrap.log" 2>&1 \
        || { tail -20 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed: see its output above"; }
    slim "$bundle/rootfs"
    umoci repack --image "$1:base" "$bundle"
    rm -rf "$bundle"
}

slim() { # what slim.dpkg.cfg keeps out of later packages, taken out of the essential ones dpkg unpacked before it
    local r=$1
    find "$r/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$r"/usr/share/{groff,info,linda,lintian/overrides,locale,man}/*
    find "$r/dev" -mindepth 1 -delete  # the container runtime provides /dev
}

in_rootfs() { # in_rootfs ROOTFS COMMAND...: run it chrooted, with no host environment and a private /dev
    local r=$1 rc=0
    shift
    mount -t tmpfs -o mode=755 warmstart-dev "$r/dev" || return 1
    { mknod -m 666 "$r/dev/null" c 1 3 && mknod -m 666 "$r/dev/zero" c 1 5 && mknod -m 666 "$r/dev/urandom" c 1 9 \
        && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$r" "$@"; } || rc=$?
    umount "$r/dev"
    return "$rc"
}

add_warmstart() { # add_warmstart LAYOUT WHEELS: tag $tag = base + CRIU + warmstart, configured as the agent
    local bundle=$work/app rootfs=$work/app/rootfs
    umoci unpack --image "$1:base" "$bundle" >/dev/null
    install -D -m 0755 "$criu_prefix/bin/criu" "$rootfs/usr/local/sbin/criu"
    mkdir -p "$rootfs/tmp/wheels"
    cp "$2"/*.whl "$rootfs/tmp/wheels/"
    cp "$image_dir/install.sh" "$rootfs/tmp/install.sh"
    say "installing warmstart[$extras] into the image"
    in_rootfs "$rootfs" bash /tmp/install.sh /tmp/wheels "$extras" \
        || die "deploy/image/install.sh failed in the image: see its output above"
    in_rootfs "$rootfs" /usr/local/sbin/criu --version >/dev/null \
        || die "criu does not run in the image: add the library it lacks to deploy/image/packages.txt"
    rm -rf "$rootfs/tmp/wheels" "$rootfs/tmp/install.sh"
    umoci repack --image "$1:$tag" "$bundle"
    rm -rf "$bundle"
    # The same configuration as deploy/image/Dockerfile's.
    umoci config --image "$1:$tag" --author warmstart --config.workingdir / \
        --config.env PATH=/opt/warmstart/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.env PYTHONUNBUFFERED=1 --config.entrypoint warmstart --config.cmd agent \
        --config.label org.opencontainers.image.title=warmstart-agent \
        --config.label "org.opencontainers.image.version=$version" \
        --config.label "org.opencontainers.image.description=warmstart's Kubernetes node agent (warmstart[$extras], CRIU)"
    umoci rm --image "$1:base"
    umoci gc --layout "$1"
}

name_index() { # name_index LAYOUT: containerd's annotation, so `ctr images import` names the image $name
    python3 - "$1/index.json" "$(full_name "$name")" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
EOF
}

install_debs --no-install-recommends mmdebstrap umoci runc
say_tag=agent-image "$repo/scripts/build-criu.sh" "$criu_prefix"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time (a test and a person may both ask)
work=$(mktemp -d "$cache/work.XXXXXX")
# --one-file-system: never into a /dev still mounted under it (in_rootfs unmounts its own)
trap 'rm -rf --one-file-system "$work"' EXIT
stage_source "$work/src"
# What each part is made of: the base layer, then the whole image (this script is part of both).
base_key=$(printf '%s\n' "$(debian_sources)" \
    "$(hash_files "$repo" deploy/image/packages.txt deploy/image/slim.dpkg.cfg scripts/build-agent-image.sh)" \
    | sha256sum | cut -c1-16)
key=$(printf '%s\n' "$base_key" "$(hash_files "$work/src" .)" "$(sha256sum <"$criu_prefix/bin/criu")" "$extras" "$name" \
    "$(hash_files "$repo" deploy/image/install.sh)" | sha256sum | cut -c1-16)
archive=$cache/$(echo "${name##*/}" | tr : -).oci.tar  # e.g. agent-0.1.0.oci.tar
if [ "$(cat "$archive.inputs" 2>/dev/null)" = "$key" ] && [ -f "$archive" ]; then
    say "$name is up to date (inputs $key)"
else
    rm -f "$archive" "$archive.inputs"
    base=$cache/base-$base_key
    if [ ! -f "$base/index.json" ]; then
        rm -rf "$cache"/base-*
        build_base "$work/base-layout"
        mv "$work/base-layout" "$base"
    fi
    cp -a "$base" "$work/layout"
    build_wheels "$work/src" "$work/wheels"
    add_warmstart "$work/layout" "$work/wheels"
    name_index "$work/layout"
    tar -C "$work/layout" --sort=name --owner=0 --group=0 --numeric-owner -cf "$archive.part" oci-layout index.json blobs
    mv "$archive.part" "$archive"
    echo "$key" >"$archive.inputs"
    say "built $name ($(du -h "$archive" | cut -f1)): import with ctr -n k8s.io images import $archive"
fi
if [ -n "$output" ] && [ "$(readlink -f "$output")" != "$(readlink -f "$archive")" ]; then
    mkdir -p "$(dirname "$output")"
    cp "$archive" "$output.part" && mv "$output.part" "$output"
    archive=$(readlink -f "$output")
fi
echo "$archive"
