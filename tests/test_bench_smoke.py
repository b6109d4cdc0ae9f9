"""The benchmark keeps working: a tiny run of scripts/bench (imgrepo, fusepass and a local folder,
through real FUSE mounts and the real S3 server) must produce every workload's figures.

No timing is asserted here; this only proves that every measurement is taken and written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts and drops caches as root")
@pytest.mark.timeout(240)
def test_quick_bench_measures_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--quick",
         "--tools", "imgrepo,fusepass,local", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=220, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Medians of 1 round(s)" in proc.stdout and "Ratios imgrepo / peer" in proc.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert sorted(result["workloads"]) == WORKLOADS
    medians = result["medians"]
    for workload in WORKLOADS:
        keys = result["workloads"][workload]
        assert keys, workload
        for key in keys:
            value = medians["imgrepo"][key]
            assert isinstance(value, (int, float)), (workload, key, value)
            assert value >= 0
            if key.endswith(("_s", "_mb_s", "_files_s")) and not key.endswith("cpu_s"):
                assert value > 0, (workload, key, value)
    # the local folder has no server and no mount process: those are absent, not zero
    assert medians["local"]["w1_cp_files_s"] > 0
    assert medians["local"]["w6_sent_mib"] is None
    assert medians["local"]["w7_peak_rss_mib"] is None
    # the pyfuse3 passthrough: every workload through its mount, no server involved
    for key in ("w1_cp_files_s", "w2_close_mb_s", "w3_cold_big_mb_s", "w4_warm_small_files_s",
                "w5_ls_cold_s", "w6_durable_s"):
        assert medians["fusepass"][key] > 0, key
    assert medians["fusepass"]["w6_sent_mib"] is None
    assert medians["fusepass"]["w7_peak_rss_mib"] > 0  # its process is measured
    # one round each: rounds hold exactly one figure per metric
    assert all(len(v) == 1 for v in result["rounds"]["imgrepo"].values())
    ratios = result["ratios_imgrepo_over"]["local"]
    assert ratios["w1_cp_files_s"] > 0
    # dedup is measured: the duplicate copy sends (almost) nothing, the first copy its data
    data_mib = medians["imgrepo"]["w1_sent_mib"]
    assert data_mib > 1.0
    assert medians["imgrepo"]["w6_sent_mib"] < data_mib / 10
    targets = {t["metric"]: t for t in result["targets"]}
    assert "w6_sent_mib" in targets and "w7_peak_rss_mib" in targets
    # the work folder is removed and nothing stays mounted
    assert not (tmp_path / "work").exists()
    with open("/proc/mounts") as fh:
        assert str(tmp_path) not in fh.read()
