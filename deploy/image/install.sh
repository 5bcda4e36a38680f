#!/usr/bin/env bash
# Installs warmstart into /opt/warmstart inside the agent image, offline, from the wheels in WHEELS (warmstart's
# own and its dependencies', and pip's, which runs from its wheel and is not left in the image), with the image's
# Debian python3. deploy/image/Dockerfile and scripts/build-agent-image.sh (in a chroot) both run it.
set -euo pipefail
[ $# = 2 ] || { echo "usage: install.sh WHEELS EXTRAS (e.g. /wheels k8s)" >&2; exit 2; }
wheels=$1 extras=$2
pip_wheel=$(ls "$wheels"/pip-*.whl 2>/dev/null | head -n1)
[ -n "$pip_wheel" ] || { echo "install.sh: no pip wheel in $wheels: put one there (pip download pip)" >&2; exit 1; }
python3 -m venv --without-pip /opt/warmstart
/opt/warmstart/bin/python "$pip_wheel/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$wheels" "warmstart[$extras]"
/opt/warmstart/bin/warmstart --help >/dev/null
