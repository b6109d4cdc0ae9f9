#!/usr/bin/env bash
# Installs everything imgrepo and its tests need on a Debian/Ubuntu machine (run as root):
# the FUSE 3 library and tools, jemalloc (the mount's allocator: fsrepo/allocator.py), a
# Python virtual environment in .venv with the project,
# the node packages of the test OpenID Connect provider, and imgrepo-mount on root's PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need_apt=()
packages=(fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc libjemalloc2)
if [ "${1:-}" = "--tests" ]; then
    packages+=(rsync openssl)  # the tests drive a mount with rsync, and make a TLS certificate
fi
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[test]"

if [ "${1:-}" = "--tests" ] && [ -f tests/oidc/package.json ]; then
    if ! command -v npm >/dev/null 2>&1; then
        apt-get install -y -qq nodejs npm >/dev/null
    fi
    (cd tests/oidc && npm install --silent --no-audit --no-fund >/dev/null)
fi
# mount(8) runs its helpers with a fixed PATH (/usr/local/bin among it): the link lets
# `mount -t fuse.imgrepo-mount` and fstab lines find the command.
link=/usr/local/bin/imgrepo-mount
if [ "$(id -u)" = 0 ]; then
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        echo "setup: $link exists and is not a link; left as it is" >&2
    else
        ln -sfn "$PWD/.venv/bin/imgrepo-mount" "$link"
        echo "setup: linked $link"
    fi
else
    echo "setup: not root: for mount(8) and fstab, link $link to .venv/bin/imgrepo-mount"
fi
echo "setup: ready ($PWD/.venv/bin/imgrepo-mount)"
