"""The mount process runs on jemalloc where it is installed (allocator.py), and its idle
release gives jemalloc's free pages back (heap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fsrepo import allocator

from .mountutil import force_unmount, run_cli

LIBRARY = allocator.jemalloc_library()
needs_jemalloc = pytest.mark.skipif(
    LIBRARY is None and not os.environ.get("CI"),
    reason="jemalloc is not installed here (scripts/setup.sh installs libjemalloc2; under CI "
           "these tests run, and fail without it)")


def maps_jemalloc(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as fh:
        return "libjemalloc" in fh.read()


def test_the_environment_preloads_jemalloc_and_keeps_the_users_own():
    env = allocator.mount_environment({"LD_PRELOAD": "libmine.so", "PATH": "/bin"},
                                      "libjemalloc.so.2")
    assert env is not None
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libmine.so" and env["PATH"] == "/bin"
    assert env["PYTHONMALLOC"] == "malloc" and "background_thread:true" in env["MALLOC_CONF"]
    mine = allocator.mount_environment({"MALLOC_CONF": "narenas:1"}, "libjemalloc.so.2")
    assert mine is not None and mine["MALLOC_CONF"] == "narenas:1"


def test_nothing_changes_without_jemalloc_by_choice_or_when_already_preloaded():
    assert allocator.mount_environment({}, None) is None
    assert allocator.mount_environment({"IMGREPO_ALLOCATOR": "pymalloc"},
                                       "libjemalloc.so.2") is None
    assert allocator.mount_environment(
        {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
        "libjemalloc.so.2") is None


def test_the_mount_takes_out_of_its_environment_what_was_added_for_it():
    """Programs the mount runs inherit neither the preload nor Python's allocator choice;
    what the user had set stays."""
    env = allocator.mount_environment({"LD_PRELOAD": "libmine.so", "MALLOC_CONF": "x:1",
                                       "HOME": "/h"}, "libjemalloc.so.2")
    assert env is not None
    allocator.forget_preload(env)
    assert env == {"LD_PRELOAD": "libmine.so", "MALLOC_CONF": "x:1", "HOME": "/h"}
    bare = allocator.mount_environment({"HOME": "/h"}, "libjemalloc.so.2")
    assert bare is not None
    allocator.forget_preload(bare)
    assert bare == {"HOME": "/h"}


@needs_jemalloc
def test_giving_the_heap_back_returns_jemallocs_free_pages():
    """With jemalloc's own decay off, only the idle release's purge can return the pages
    a freed walk's objects held: RSS falls by most of them."""
    env = allocator.mount_environment(dict(os.environ), LIBRARY)
    assert env is not None
    env["MALLOC_CONF"] = "background_thread:false,dirty_decay_ms:-1,muzzy_decay_ms:-1"
    script = textwrap.dedent("""
        from fsrepo.heap import Heap

        def rss():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * 4096 // 2**20

        with open("/proc/self/maps") as fh:
            assert "libjemalloc" in fh.read()
        heap = Heap()
        held = [bytes(100) + str(i).encode() for i in range(1_500_000)]
        full = rss()
        del held
        kept = rss()
        heap.give_back()
        print(full, kept, rss())
    """)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    full, kept, after = map(int, res.stdout.split())
    assert full - after > 150  # ~200 MiB of small objects
    assert kept - after > 0.8 * (full - after)  # freed but kept until the purge


def test_a_foreground_mount_runs_on_jemalloc_unless_told_not_to(tmp_path, mounter):
    m = mounter(f"file://{tmp_path / 'repo'}")
    assert m.proc is not None
    assert maps_jemalloc(m.proc.pid) == (LIBRARY is not None)
    (m.path / "a.txt").write_bytes(b"on whichever allocator")
    m.unmount()
    m.env = {**m.env, "IMGREPO_ALLOCATOR": "pymalloc"}
    m.start()
    assert m.proc is not None and not maps_jemalloc(m.proc.pid)
    assert (m.path / "a.txt").read_bytes() == b"on whichever allocator"


@needs_jemalloc
def test_a_detached_mount_runs_on_jemalloc(tmp_path, mount_env):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [str(mnt), "--storage", f"file://{tmp_path / 'repo'}",
            "--cache-dir", str(tmp_path / "cache")]
    try:
        res = run_cli(args, mount_env, timeout=60)
        assert "mounted" in res.stdout
        status = run_cli(["--status", str(mnt), "--json"], mount_env)
        pid = int(json.loads(status.stdout)["pid"])
        assert maps_jemalloc(pid)
        (mnt / "b.txt").write_bytes(b"detached")
        run_cli(["--unmount", str(mnt)], mount_env, timeout=120)
    finally:
        if os.path.ismount(mnt):
            run_cli(["--unmount", str(mnt)], mount_env, timeout=120, check=False)
        force_unmount(mnt)
