"""The scale tools keep working: synthetic repositories are valid, and a tiny run of
scripts/scale_bench.py produces every figure of its table.

No timing and no target is asserted here (the targets are what later work must meet); this
only proves that the generator writes what `--verify` accepts and that every measure is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYNTH = REPO / "scripts" / "synth_repo.py"
BENCH = REPO / "scripts" / "scale_bench.py"
ROWS = ["idle_requests_per_interval", "rss_at_mount_mib", "rss_after_find_mib",
        "hwm_after_find_mib", "rss_after_idle_mib", "status_fresh_s", "status_fresh_requests",
        "status_json_fresh_s", "status_json_fresh_requests", "status_after_find_s",
        "status_after_find_requests", "warm_find_s", "warm_find_requests", "remount_find_s",
        "remount_find_requests", "remount_find_other_requests", "cold_find_s",
        "cold_find_requests", "verify_peak_rss_mib", "gc_peak_rss_mib"]


def env_for(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGREPO_")}
    env.update({"HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "home" / ".cache"),
                "XDG_CONFIG_HOME": str(tmp / "home" / ".config"), "PYTHONPATH": str(REPO)})
    return env


def verify(location: str, env: dict[str, str]) -> dict:
    res = subprocess.run([sys.executable, "-m", "fsrepo.cli", "--verify", "--json",
                          "--storage", location], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("distinct", [False, True], ids=["shared-blobs", "distinct-blobs"])
def test_synthetic_repository_passes_verify(tmp_path: Path, distinct: bool) -> None:
    location = f"file://{tmp_path / 'repo'}"
    env = env_for(tmp_path)
    cmd = [sys.executable, str(SYNTH), location, "--files", "1001", "--folders", "12",
           "--blob-kib", "8"]
    res = subprocess.run([*cmd, *(["--distinct-blobs"] if distinct else [])], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wrote 1,001 files in 12 event folders" in res.stdout
    report = verify(location, env)
    assert report["problems"] == [], report["problems"][:5]
    assert report["files"] == 1001
    # root, one year, 12 months (one event each at this size), 12 events
    assert report["directories"] == 1 + 1 + 12 + 12
    assert report["blobs"] == (1001 if distinct else 16)
    # a second run into the same place is refused, and leaves it valid
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode != 0 and "is not empty" in again.stderr
    assert verify(location, env)["problems"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts with FUSE as root")
@pytest.mark.timeout(240)
def test_tiny_scale_bench_measures_every_row(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--files", "2000", "--folders", "20", "--refresh", "1",
         "--intervals", "2", "--json", str(out), "--workdir", str(work)],
        capture_output=True, text=True, timeout=220, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Scale: 2,000 files in 20 event folders" in proc.stdout
    result = json.loads(out.read_text())
    figures = result["results"]
    for key in ROWS:
        value = figures[key]
        assert isinstance(value, (int, float)) and value >= 0, (key, value)
        assert key in result["targets_met"], key
    for key in ("cold_find_s", "warm_find_s", "remount_find_s", "status_fresh_s",
                "rss_at_mount_mib", "verify_peak_rss_mib", "gc_peak_rss_mib"):
        assert figures[key] > 0, key
    # a cold walk of an empty cache reads every manifest at least once (the root's is read
    # when the mount starts, before the walk)
    assert figures["cold_find_manifest_requests"] >= result["config"]["directories"] - 1
    # every row is in the printed table, with its verdict where there is a target
    assert proc.stdout.count(" ok") + proc.stdout.count(" missed") >= 12
    # nothing is left behind: the work folder is gone and nothing stays mounted
    assert not work.exists()
    with open("/proc/mounts") as fh:
        assert str(tmp_path) not in fh.read()
