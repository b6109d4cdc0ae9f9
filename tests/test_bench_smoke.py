"""The benchmark keeps working: a tiny run of scripts/bench (imgrepo, fusepass and a local folder,
through real FUSE mounts and the real S3 server) must produce every workload's figures.

No benchmark figure is asserted here; this only proves that every measurement is taken and
written. The relay's added round trip (--rtt-ms) is timed, on an echo server behind it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testservers.net import free_port, stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8"]
RTT_MS = 20  # the round trip the relay adds in the tests of --rtt-ms


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


def _echo_server(sock: socket.socket) -> None:
    """Send every byte back, on each connection, until the client closes."""
    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


@pytest.fixture
def delayed_echo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An echo server on loopback behind the relay with a 20 ms round trip: (relay port,
    the relay's counter file)."""
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo_server, args=(listener,), daemon=True).start()
    counters = tmp_path / "counters"
    counters.write_bytes(b"\0" * 16)
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench.relay", str(port),
         str(listener.getsockname()[1]), str(counters), "-1", str(RTT_MS)], cwd=REPO)
    try:
        wait_listening(port, relay, what="the relay", timeout=30)
        yield port, counters
    finally:
        stop_process(relay)
        listener.close()



def test_relay_adds_the_round_trip_in_order(delayed_echo: tuple[int, Path]) -> None:
    port, counters = delayed_echo
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(5):  # one request, one answer: a full round trip each
            t0 = time.perf_counter()
            conn.sendall(b"ping%d" % i)
            got = b""
            while len(got) < 5:
                got += conn.recv(16)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            assert got == b"ping%d" % i
            assert elapsed_ms >= RTT_MS, elapsed_ms
        # many chunks back to back come out in the order they went in, none lost
        sent = b"".join(b"%06d" % i for i in range(20000))
        for start in range(0, len(sent), 1000):
            conn.sendall(sent[start:start + 1000])
        got = b""
        while len(got) < len(sent):
            got += conn.recv(1 << 16)
        assert got == sent
    # the bytes each way are counted, as without a delay
    deadline = time.monotonic() + 5
    expected = len(sent) + 5 * 5
    while time.monotonic() < deadline:
        up, down = struct.unpack("<QQ", counters.read_bytes())
        if (up, down) == (expected, expected):
            break
        time.sleep(0.05)
    assert (up, down) == (expected, expected)


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts and drops caches as root")
@pytest.mark.timeout(240)
def test_quick_bench_with_an_added_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--quick", "--tools", "imgrepo",
         "--rtt-ms", str(RTT_MS), "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=220, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Round trip to the server: {RTT_MS} ms added by the relay" in proc.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["config"]["rtt_ms"] == RTT_MS
    assert result["relay"]["rtt_ms"] == RTT_MS
    relay_cpu = result["relay"]["cpu_s"]["imgrepo"]
    assert len(relay_cpu) == 1 and relay_cpu[0] > 0
    assert result["medians"]["imgrepo"]["w1_durable_files_s"] > 0
