"""What the benchmark measures: every figure's key, workload, label, unit and direction,
and the tools it compares (the report and the JSON are built from these tables)."""

from __future__ import annotations

TOOLS = ["imgrepo", "rclone-writes", "rclone-full", "s3fs", "fusepass", "local"]
PEERS = ["rclone-writes", "rclone-full", "s3fs"]
SERVERLESS = ("local", "fusepass")  # references that need no S3 server

# (key, workload, label, unit, higher_is_better)
METRICS: list[tuple[str, str, str, str, bool]] = [
    ("w1_cp_files_s", "W1", "W1 cp -r small files, until cp returns", "files/s", True),
    ("w1_durable_files_s", "W1", "W1 cp -r small files, until durable", "files/s", True),
    ("w2_close_mb_s", "W2", "W2 dd big file, until close", "MB/s", True),
    ("w2_durable_mb_s", "W2", "W2 dd big file, until durable", "MB/s", True),
    ("w3_cold_big_mb_s", "W3", "W3 cold read, big file", "MB/s", True),
    ("w3_cold_small_files_s", "W3", "W3 cold read, small files", "files/s", True),
    ("w4_warm_big_mb_s", "W4", "W4 warm read, big file", "MB/s", True),
    ("w4_warm_small_files_s", "W4", "W4 warm read, small files", "files/s", True),
    ("w5_ls_cold_s", "W5", "W5 ls -l big directory, cold", "s", False),
    ("w5_ls_warm_s", "W5", "W5 ls -l big directory, warm", "s", False),
    ("w6_durable_s", "W6", "W6 duplicate cp -r, until durable", "s", False),
    ("w6_sent_mib", "W6", "W6 duplicate cp -r, sent to server", "MiB", False),
    ("w1_sent_mib", "W1", "W1 cp -r small files, sent to server", "MiB", False),
    ("w7_peak_rss_mib", "W7", "W7 peak RSS of the mount during W2", "MiB", False),
    ("w7_cpu_s", "W7", "W7 CPU of the mount during W2", "s", False),
    ("w1_cpu_s", "W7", "CPU of the mount during W1", "s", False),
    ("w3_cold_small_cpu_s", "W3", "CPU of the mount during W3's small files", "s", False),
    ("w3_cpu_s", "W3", "CPU of the mount during W3's cold big read", "s", False),
    ("w8_sqlite_commits_s", "W8", "W8 SQLite (WAL) single-row commits", "commits/s", True),
]
METRIC_INFO = {m[0]: m for m in METRICS}
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8"]
# What --workloads selects: the write phase's parts, the fresh mount's reads (W3, W4: they
# read what W1 wrote, and W2's file if it ran), the big listing (W5) and the database (W8).
PHASES = ["w1", "w6", "w2", "reads", "ls", "w8"]
