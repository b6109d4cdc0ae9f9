#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole test suite (real FUSE mounts,
# moto's S3 server and an OpenID Connect provider on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
.venv/bin/ruff check fsrepo tests scripts testservers
exec .venv/bin/python -m pytest "$@"
