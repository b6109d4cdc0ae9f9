"""The benchmark's rounds: for one tool, the write phase (W1, W6, W2 with W7), a fresh
mount's cold and warm reads (W3, W4) and the big directory's listing (W5), each figure
recorded per round; and the clean-up of whatever is still mounted."""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from testservers.net import stop_process

from .data import Data, LsFixture, Sizes
from .host import (
    REPO,
    BenchError,
    MiB,
    PageCache,
    all_threads_cpu,
    cores_busy_seconds,
    peak_rss_mib,
    proc_cpu_seconds,
    python_thread_names,
    reset_peak_rss,
    run,
    say,
    thread_cpu_seconds,
    unmount_path,
)
from .metrics import PHASES
from .profiling import profiled
from .server import Server
from .tools import FusePassTool, LocalTool, Tool, ToolSetup, new_tool


@dataclass
class Bench:
    """One run: its sizes, tools and work folder, the live mounts, and every round's
    figures (`results[tool][metric]`, one value per round) and errors."""

    sizes: Sizes
    tools: list[str]
    work: Path
    keep: bool = False
    profile_dir: Path | None = None
    rclone_args: list[str] = field(default_factory=list)
    s3fs_args: list[str] = field(default_factory=list)
    server: Server | None = None
    data: Data | None = None
    imgrepo_cmd: Path = REPO / ".venv" / "bin" / "imgrepo-mount"
    results: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    live: list[Tool] = field(default_factory=list)
    ls_made: dict[str, LsFixture] = field(default_factory=dict)
    # the relay's CPU seconds during each round of a tool that talks to the server
    relay_cpu: dict[str, list[float]] = field(default_factory=dict)
    page_cache: PageCache = field(default_factory=PageCache)
    phases: set[str] = field(default_factory=lambda: set(PHASES))  # what --workloads chose
    sqlite_commits: int = 1000

    def profiled(self, tool: Tool, label: str) -> AbstractContextManager[None]:
        return profiled(self.profile_dir, tool, label)

    def record(self, tool: str, key: str, value: float | None) -> None:
        self.results.setdefault(tool, {}).setdefault(key, []).append(value)

    def new_tool(self, name: str) -> Tool:
        setup = ToolSetup(self.server, self.work, self.imgrepo_cmd, self.rclone_args,
                          self.s3fs_args)
        tool = new_tool(name, setup)
        self.live.append(tool)
        return tool

    def release(self, tool: Tool) -> None:
        try:
            tool.unmount()
        finally:
            if tool in self.live:
                self.live.remove(tool)

    # ---- one round of one tool ----
    def run_round(self, name: str, rnd: int) -> None:
        assert self.data is not None
        data = self.data
        tag = f"{name}-r{rnd}"
        bucket = f"bench-{name}-r{rnd}".replace("_", "-")
        prefix = "data"
        base = self.work / "rounds" / tag
        base.mkdir(parents=True)
        tool = self.new_tool(name)
        if tool.uses_s3:
            assert self.server is not None
            self.server.create_bucket(bucket)
            if name == "s3fs":
                self.server.client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")
        mnt = base / "local" if isinstance(tool, LocalTool) else base / "mnt"
        relay_cpu0 = self.server.relay_cpu_seconds() if tool.uses_s3 and self.server else None
        try:
            data.warm()
            tool.mount(bucket, prefix, mnt, base / "cache-write")
            self._write_phase(tool, mnt)
            if "w8" in self.phases:
                self._sqlite_phase(tool, mnt)
            self.release(tool)
            if "reads" in self.phases:
                # ---- cold and warm reads on a fresh mount with an empty cache ----
                tool = self.new_tool(name)
                self.page_cache.drop()
                tool.mount(bucket, prefix, mnt, base / "cache-read")
                self.page_cache.drop()
                self._read_phase(tool, mnt)
                self.release(tool)
            if "ls" in self.phases:
                self._ls_phase(name, base)
            if relay_cpu0 is not None and self.server is not None:
                self.relay_cpu.setdefault(name, []).append(
                    self.server.relay_cpu_seconds() - relay_cpu0)
        finally:
            for t in list(self.live):
                try:
                    self.release(t)
                except Exception as exc:  # noqa: BLE001 - cleanup: report, go on
                    say(f"{t.name}: unmount: {exc}")
            if tool.uses_s3 and self.server is not None:
                self.server.delete_bucket(bucket)
            if not self.keep:
                shutil.rmtree(base, ignore_errors=True)

    def _write_phase(self, tool: Tool, mnt: Path) -> None:
        if "w1" in self.phases:
            self._w1(tool, mnt)
        if "w6" in self.phases:
            self._w6(tool, mnt)
        if "w2" in self.phases:
            self._w2(tool, mnt)

    def _w1(self, tool: Tool, mnt: Path) -> None:
        """W1: cp -r of the small files."""
        data = self.data
        assert data is not None
        name = tool.name
        nfiles = len(data.names)
        pid = tool.pid()
        sent = self.server.sent if self.server is not None else (lambda: 0)
        cpu0 = proc_cpu_seconds(pid) if pid else None
        bytes0 = sent()
        t0 = time.perf_counter()
        with self.profiled(tool, "w1-cp"):
            t_cp = run(["cp", "-r", str(data.src), str(mnt / "w1")])
        expected = {f"w1/{n}": s for n, s in data.names.items()}
        with self.profiled(tool, "w1-durable"):
            t_dur = tool.wait_durable(expected, t0)
        self.record(name, "w1_cp_files_s", nfiles / t_cp)
        self.record(name, "w1_durable_files_s", nfiles / t_dur)
        self.record(name, "w1_sent_mib", (sent() - bytes0) / MiB if tool.uses_s3 else None)
        self.record(name, "w1_cpu_s", proc_cpu_seconds(pid) - cpu0 if pid else None)
        say(f"  {name}: W1 cp {t_cp:.2f} s, durable {t_dur:.2f} s")

    def _w6(self, tool: Tool, mnt: Path) -> None:
        """W6: the same files again under another name."""
        data = self.data
        assert data is not None
        name = tool.name
        sent = self.server.sent if self.server is not None else (lambda: 0)
        bytes0 = sent()
        t0 = time.perf_counter()
        with self.profiled(tool, "w6"):
            run(["cp", "-r", str(data.src), str(mnt / "w6")])
            t6 = tool.wait_durable({f"w6/{n}": s for n, s in data.names.items()}, t0)
        self.record(name, "w6_durable_s", t6)
        self.record(name, "w6_sent_mib", (sent() - bytes0) / MiB if tool.uses_s3 else None)
        say(f"  {name}: W6 durable {t6:.2f} s, sent {(sent() - bytes0) / MiB:.1f} MiB")

    def _w2(self, tool: Tool, mnt: Path) -> None:
        """W2 (+W7): one big file with dd bs=1M."""
        data = self.data
        assert data is not None
        name = tool.name
        pid = tool.pid()
        if pid:
            reset_peak_rss(pid)
            cpu0 = proc_cpu_seconds(pid)
            threads0 = thread_cpu_seconds(pid)
        cores = os.sched_getaffinity(0)
        busy0, children0, everyone0 = cores_busy_seconds(cores), os.times(), all_threads_cpu()
        preempted0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nivcsw
        t0 = time.perf_counter()
        with self.profiled(tool, "w2-close"):
            t_close = run(["dd", f"if={data.big}", f"of={mnt / 'big.bin'}", "bs=1M",
                           "status=none"])
        busy, children = cores_busy_seconds(cores), os.times()
        say(f"  {name}: W2 until close: dd's CPU "
            f"{children.children_user + children.children_system - children0.children_user - children0.children_system:.2f} s, "
            f"busy cores (ours: {sorted(cores)}) " + ", ".join(
                f"{core} {busy[core] - busy0[core]:.2f} s" for core in sorted(busy)))
        others = sorted(((cpu - everyone0.get(key, ("", 0.0))[1], comm, key[0])
                         for key, (comm, cpu) in all_threads_cpu().items()
                         if key[0] not in (pid, os.getpid())), reverse=True)
        say(f"  {name}: W2 until close, other threads: " + ", ".join(
            f"{comm}[{owner}] {cpu:.2f} s" for cpu, comm, owner in others[:6] if cpu >= 0.01))
        if pid:  # where the mount's CPU went until close, by thread
            names = python_thread_names(pid)
            spent = {tid: (ran - threads0.get(tid, (0.0, 0.0))[0],
                           waited - threads0.get(tid, (0.0, 0.0))[1])
                     for tid, (ran, waited) in thread_cpu_seconds(pid).items()}
            say(f"  {name}: W2 CPU until close by thread (ran/waited for a CPU): " + ", ".join(
                f"{names.get(tid, tid)} {ran:.2f}/{waited:.2f} s" for tid, (ran, waited) in
                sorted(spent.items(), key=lambda kv: -kv[1][0]) if ran >= 0.01))
        preempted = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nivcsw - preempted0
        say(f"  {name}: W2 until close: dd was preempted {preempted} times")
        with self.profiled(tool, "w2-durable"):
            t_dur = tool.wait_durable({"big.bin": data.big_size}, t0)
        mb = data.big_size / 1e6
        self.record(name, "w2_close_mb_s", mb / t_close)
        self.record(name, "w2_durable_mb_s", mb / t_dur)
        self.record(name, "w7_peak_rss_mib", peak_rss_mib(pid) if pid else None)
        self.record(name, "w7_cpu_s", proc_cpu_seconds(pid) - cpu0 if pid else None)
        say(f"  {name}: W2 close {t_close:.2f} s, durable {t_dur:.2f} s")

    def _sqlite_phase(self, tool: Tool, mnt: Path) -> None:
        """W8: a database in WAL mode with synchronous=FULL (an fsync of its WAL at every
        commit, as applications that keep their data in SQLite run), one row per commit."""
        path = mnt / "w8.sqlite"
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body TEXT)")
            body = "x" * 100
            t0 = time.perf_counter()
            with self.profiled(tool, "w8-sqlite"):
                for n in range(self.sqlite_commits):
                    con.execute("INSERT INTO t VALUES (?, ?)", (n, body))
            elapsed = time.perf_counter() - t0
        finally:
            con.close()
        self.record(tool.name, "w8_sqlite_commits_s", self.sqlite_commits / elapsed)
        say(f"  {tool.name}: W8 {self.sqlite_commits} SQLite commits {elapsed:.2f} s")

    def _read_phase(self, tool: Tool, mnt: Path) -> None:
        """W3 cold, then W4 warm: the small files (in name order, one `cat`), and the big
        file if W2 wrote it."""
        assert self.data is not None
        name = tool.name
        nfiles = len(self.data.names)
        mb = self.data.big_size / 1e6
        read_big = ["dd", f"if={mnt / 'big.bin'}", "of=/dev/null", "bs=1M", "status=none"]
        read_small = ["sh", "-c", 'cat -- "$1"/* > /dev/null', "sh", str(mnt / "w1")]
        # (what is read, its command, the rate's unit count, the W3 CPU figure)
        reads = [("big", read_big, mb, "w3_cpu_s")] if "w2" in self.phases else []
        if "w1" in self.phases:
            reads.append(("small", read_small, nfiles, "w3_cold_small_cpu_s"))
        for label in ("w3_cold", "w4_warm"):
            said = []
            for what, command, units, cpu_key in reads:
                pid = tool.pid()
                cpu0 = proc_cpu_seconds(pid) if pid else 0.0
                with self.profiled(tool, f"{label[:2]}-{what}"):
                    took = run(command)
                rate = "mb_s" if what == "big" else "files_s"
                self.record(name, f"{label}_{what}_{rate}", units / took)
                if label == "w3_cold":
                    self.record(name, cpu_key, proc_cpu_seconds(pid) - cpu0 if pid else None)
                said.append(f"{what} {took:.2f} s")
            say(f"  {name}: {label[:2].upper()} {', '.join(said)}")

    def _ls_phase(self, name: str, base: Path) -> None:
        bucket, prefix, local_dir = self.ls_made[name]
        tool = self.new_tool(name)
        self.page_cache.drop()
        if isinstance(tool, FusePassTool):
            tool.backing = local_dir
            mnt = base / "mnt-ls"
            tool.mount("", "", mnt, base / "cache-ls")
        elif local_dir is not None:
            mnt = local_dir
            tool.mount("", "", mnt, base / "cache-ls")
        else:
            mnt = base / "mnt-ls"
            tool.mount(bucket, prefix, mnt, base / "cache-ls")
        self.page_cache.drop()
        cmd = ["ls", "-l", str(mnt / "big")]
        with self.profiled(tool, "w5-cold"):
            cold = run(cmd, shell_stdout_null=True)
        with self.profiled(tool, "w5-warm"):
            warm = run(cmd, shell_stdout_null=True)
        listed = subprocess.run(["ls", str(mnt / "big")], capture_output=True).stdout.count(b"\n")
        if listed != self.sizes.ls_entries:
            raise BenchError(f"{name}: ls shows {listed} entries, not {self.sizes.ls_entries}")
        self.record(name, "w5_ls_cold_s", cold)
        self.record(name, "w5_ls_warm_s", warm)
        say(f"  {name}: W5 ls -l cold {cold:.2f} s, warm {warm:.2f} s")
        self.release(tool)

    def cleanup(self) -> None:
        for tool in list(self.live):
            try:
                self.release(tool)
            except Exception:  # noqa: BLE001 - last-ditch cleanup
                if tool.mnt is not None:
                    unmount_path(tool.mnt)
                stop_process(tool.proc)
        if self.server is not None:
            self.server.stop()

