#!/usr/bin/env bash
# Installs what the benchmark needs (the project's .venv with moto and boto3, FUSE, rclone,
# s3fs), then runs the benchmark (scripts/bench/, `python -m scripts.bench`) with the given
# arguments (as root). Examples:
#   bash scripts/bench.sh                              # default sizes, every tool (< 15 min)
#   bash scripts/bench.sh --quick                      # tiny smoke run
#   bash scripts/bench.sh --tools imgrepo,s3fs --rounds 5
#   bash scripts/bench.sh --rtt-ms 20                  # 20 ms round trip to the server
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

bash scripts/setup.sh >/dev/null

need_apt=()
for pkg in rclone s3fs fuse3 coreutils util-linux; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "bench: installing ${need_apt[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# moto is one of the test extras; scripts/setup.sh installs them, but an older .venv may
# lack them.
.venv/bin/python -c "import moto, boto3" 2>/dev/null || .venv/bin/pip install -q -e ".[test]"

exec .venv/bin/python -m scripts.bench "$@"
