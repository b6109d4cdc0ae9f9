"""What one unit of a workload costs in FUSE requests and handler time, on imgrepo (a local
repository), fusepass, fusemem (nothing behind it: the binding's floor) or fusemem with the
kernel's writeback cache: W8's SQLite commit, and a warm `ls -l` of a big folder (W5).

    python -m scripts.request_costs TOOL WORKDIR [w8,ls]    (as root; WORKDIR is replaced)
        TOOL: imgrepo | fusepass | fusemem | fusemem-wb
        env: COMMITS (1000), ENTRIES (10000), LISTINGS (3), CPU (taskset -c CPU)

The SQLite loop is the benchmark's W8 (scripts/bench/workloads.py). Each tool runs under
scripts/fuse_requests.py, whose counts are taken around each measured phase; the figures are
wall time, requests per unit by type and the handlers' time (the mount's own work, not the
kernel's or pyfuse3's). For finding where a unit's time goes, not for the benchmark's tables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("imgrepo", "fusepass", "fusemem", "fusemem-wb")


class CountedMount:
    """One tool mounted at WORKDIR/mnt under fuse_requests."""

    def __init__(self, tool: str, work: Path) -> None:
        self.tool, self.work = tool, work
        self.mnt, self.out = work / "mnt", work / "counts.json"
        self.backing = work / "backing"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.work.exists():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            shutil.rmtree(self.work)
        for folder in (self.mnt, self.backing, self.work / "run"):
            folder.mkdir(parents=True, mode=0o700)
        home = self.work / "home"
        env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)),
                   HOME=str(home), XDG_RUNTIME_DIR=str(self.work / "run"),
                   XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
                   XDG_DATA_HOME=str(home / ".local/share"))
        target = {
            "imgrepo": ["fsrepo.cli", str(self.mnt), "--storage", f"file://{self.work}/repo",
                        "--cache-dir", str(self.work / "cache"), "--foreground"],
            "fusepass": ["scripts.fusepass", str(self.backing), str(self.mnt)],
            "fusemem": ["scripts.fusemem", str(self.mnt)],
            "fusemem-wb": ["scripts.fusemem", "--writeback-cache", str(self.mnt)],
        }[self.tool]
        pin = ["taskset", "-c", os.environ["CPU"]] if os.environ.get("CPU") else []
        with open(self.work / "log", "wb") as log:
            self.proc = subprocess.Popen(
                [*pin, sys.executable, "-m", "scripts.fuse_requests", str(self.out), *target],
                env=env, cwd=env["PYTHONPATH"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.tool} did not mount:\n"
                                 + (self.work / "log").read_text()[-2000:])
            time.sleep(0.05)
        time.sleep(1)  # the mount's own start-up requests are not the workload's

    def counts(self) -> dict[str, Any]:
        """The counts since the last call (and start again from zero)."""
        assert self.proc is not None
        self.out.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        for _ in range(200):
            if self.out.exists():
                return json.loads(self.out.read_text())
            time.sleep(0.05)
        raise SystemExit(f"{self.tool}: no counts written")

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def show(tool: str, label: str, counts: dict[str, Any], units: int, took: float) -> None:
    calls = sum(v["calls"] for v in counts.values())
    seconds = sum(v["seconds"] for v in counts.values())
    print(f"{tool} {label}: {took:.3f} s, {units / took:,.0f} per s; {calls} requests "
          f"({calls / units:.2f} per unit), handlers {seconds / units * 1e6:.1f} us per unit")
    for name, v in sorted(counts.items(), key=lambda kv: -kv[1]["calls"]):
        print(f"   {name:10s} {v['calls']:7d} {v['calls'] / units:8.3f} per unit "
              f"{v['seconds'] / v['calls'] * 1e6:9.1f} us each")


def sqlite_commits(mount: CountedMount, commits: int) -> None:
    con = sqlite3.connect(mount.mnt / "w8.sqlite", isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body TEXT)")
        body = "x" * 100
        mount.counts()
        t0 = time.perf_counter()
        for n in range(commits):
            con.execute("INSERT INTO t VALUES (?, ?)", (n, body))
        took = time.perf_counter() - t0
        show(mount.tool, "W8 SQLite commits", mount.counts(), commits, took)
    finally:
        con.close()


def warm_listings(mount: CountedMount, entries: int, listings: int) -> None:
    folder = (mount.backing if mount.tool == "fusepass" else mount.mnt) / "big"
    folder.mkdir()
    for i in range(entries):
        (folder / f"IMG_{i:05d}.jpg").write_bytes(b"x" * 100)
    command = ["ls", "-l", str(mount.mnt / "big")]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)  # now warm
    for _ in range(listings):
        mount.counts()
        t0 = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        show(mount.tool, "ls -l warm, per entry", mount.counts(), entries,
             time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] not in TOOLS:
        print(__doc__, file=sys.stderr)
        return 2
    phases = argv[2].split(",") if len(argv) == 3 else ["w8", "ls"]
    mount = CountedMount(argv[0], Path(argv[1]).resolve())
    mount.start()
    try:
        if "w8" in phases:
            sqlite_commits(mount, int(os.environ.get("COMMITS", "1000")))
        if "ls" in phases:
            warm_listings(mount, int(os.environ.get("ENTRIES", "10000")),
                          int(os.environ.get("LISTINGS", "3")))
    finally:
        mount.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
