# shellcheck shell=bash
# Shell helpers for scripts/setup.sh, scripts/build-criu.sh and scripts/build-agent-image.sh (sourced, not run).
# say's tag is $say_tag (default setup).

say() { printf '[%s] %s\n' "${say_tag:-setup}" "$*" >&2; }

apt_get() {
    # Some images refuse apt's unprivileged sandbox user (gpgv is not found); fall back to root.
    apt-get "$@" 2>/dev/null || apt-get -o APT::Sandbox::User=root "$@"
}

missing_debs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || printf '%s\n' "$p"
    done
}

install_debs() { # install_debs [--no-install-recommends] PACKAGE...: those not installed yet
    local missing opts=()
    [ "${1:-}" = --no-install-recommends ] && { opts=("$1"); shift; }
    missing=$(missing_debs "$@")
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086,SC2116  # one line of names
    say "installing Debian packages: $(echo $missing)"
    apt_get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt_get install -y -qq "${opts[@]}" $missing >/dev/null
}

version_ok() { # version_ok HAVE MIN: HAVE >= MIN
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

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
