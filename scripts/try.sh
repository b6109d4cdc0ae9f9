#!/usr/bin/env bash
# Installs everything imgrepo needs, then mounts the embedded default repository
# (a local folder, no cloud account needed) on MOUNTPOINT (default ~/imgrepo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # as root it also links imgrepo-mount into /usr/local/bin
mountpoint=${1:-$HOME/imgrepo}
mkdir -p "$mountpoint"
if mountpoint -q "$mountpoint"; then
    echo "try: $mountpoint is already mounted"
    exit 0
fi
.venv/bin/imgrepo-mount "$mountpoint"
echo "try: copy files into $mountpoint; 'imgrepo-mount --status $mountpoint' shows progress,"
echo "     'imgrepo-mount --unmount $mountpoint' unmounts once everything is stored."
