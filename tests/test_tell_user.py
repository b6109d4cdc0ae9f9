"""What the user is told, without FUSE: the outage logged once, pending files by path,
duplicates from the manifests, progress lines that fit, the mount table read, the errors
for a refused connection and a web server that is not S3, the cache key's endpoint."""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from fsrepo.cli.mounts import imgrepo_mounts
from fsrepo.cli.progress import fit, progress_text
from fsrepo.config import Settings
from fsrepo.connectivity import GuardedStore
from fsrepo.endpoint_check import not_s3_reason
from fsrepo.errors import ImgrepoError
from fsrepo.maintenance.duplicates import duplicate_groups, files_under
from fsrepo.manifest import DirEntry, FileEntry
from fsrepo.mount import check_fuse
from fsrepo.pending_list import pending_files

from .coreutil import running_engine, write_file


def _file(sha: str, size: int) -> FileEntry:
    return FileEntry(sha256=sha * 64 if len(sha) == 1 else sha, size=size, mtime_ns=0,
                     mode=0o644)


# -- the outage in the log ------------------------------------------------------------------

@pytest.mark.expected_logs(r"unreachable, working offline", reason="the S3 endpoint is "
                           "stopped on purpose, to make an outage")
def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(tmp_path, caplog,
                                                                       s3_bucket, s3_proxy):
    """Twenty files in four folders written during an outage: one WARNING when it starts,
    one line when it ends saying what was held back, none per file or folder."""
    caplog.set_level(logging.DEBUG, logger="fsrepo")

    def guarded(store):  # noqa: ANN001, ANN202
        return GuardedStore(store, patience=0.2, check_every=0.2, probe_every=0.1)

    async def main() -> None:
        async with running_engine(s3_bucket.url, s3_proxy.url, tmp_path / "cache",
                                  wrap_store=guarded) as eng:
            await write_file(eng, "first.txt", b"before the outage")
            await eng.uploader.wait_idle()
            s3_proxy.pause()
            for i in range(20):
                await write_file(eng, f"d{i % 4}/f{i}.jpg", os.urandom(1000 + i))
            with trio.fail_after(30):
                while eng.store.online:
                    await trio.sleep(0.05)
            await trio.sleep(1.5)  # the uploader keeps retrying meanwhile
            summary = pending_files(eng.journal, eng.uploader)
            s3_proxy.resume()
            with trio.fail_after(60):
                await eng.uploader.wait_idle()
            assert eng.store.online
            # Pending files by path, largest first, none already in the bucket.
            assert summary["total_files"] == 20 and summary["listed_all"]
            assert summary["files"][0]["path"] == "/d3/f19.jpg"
            assert summary["files"][0]["size"] == 1019
            assert "/first.txt" not in {f["path"] for f in summary["files"]}

    trio.run(main)
    fsrepo_lines = [r for r in caplog.records if r.name.startswith("fsrepo")]
    warnings = [r.getMessage() for r in fsrepo_lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable, working offline" in warnings[0], warnings
    back = [r.getMessage() for r in fsrepo_lines if "reachable again" in r.getMessage()]
    assert len(back) == 1 and "held back meanwhile are retried now" in back[0], back
    assert int(back[0].split("; ")[1].split()[0]) > 0  # it counted what it held back
    infos = [r for r in fsrepo_lines if r.levelno == logging.INFO]
    assert len(infos) <= 3, [r.getMessage() for r in infos]  # not one per retry
    assert not any("b'" in r.getMessage() for r in fsrepo_lines)


# -- duplicates -----------------------------------------------------------------------------

def test_duplicates_are_grouped_by_content_largest_saving_first():
    files = [("/a/x.jpg", _file("a", 100)), ("/b/x copy.jpg", _file("a", 100)),
             ("/b/y.jpg", _file("b", 5000)), ("/c/y.jpg", _file("b", 5000)),
             ("/c/y2.jpg", _file("b", 5000)), ("/only.jpg", _file("c", 9999)),
             ("/e1", _file("d", 0)), ("/e2", _file("d", 0))]
    groups = duplicate_groups(files)
    assert [g["paths"] for g in groups] == [["/b/y.jpg", "/c/y.jpg", "/c/y2.jpg"],
                                            ["/a/x.jpg", "/b/x copy.jpg"]]
    assert groups[0]["space_without_dedup"] == 15000 and groups[0]["saved"] == 10000
    assert groups[1]["count"] == 2 and groups[1]["size"] == 100


def test_duplicates_walk_names_every_file_by_its_path_and_reads_each_folder_once():
    tree = {"root": {b"a": DirEntry("A", 0), b"top.jpg": _file("1", 10)},
            "A": {b"b": DirEntry("B", 0), "é.jpg".encode(): _file("1", 10)},
            "B": {b"deep.jpg": _file("2", 20), b"\xff.raw": _file("1", 10)}}
    reads: list[str] = []

    async def read_dir(dir_id: str) -> dict:
        reads.append(dir_id)
        await trio.sleep(0)
        return tree[dir_id]

    found = trio.run(files_under, read_dir, "root", "/")
    assert sorted(reads) == ["A", "B", "root"]
    assert sorted(p for p, _ in found) == sorted(["/a/b/deep.jpg", "/a/b/\\xff.raw",
                                                 "/a/é.jpg", "/top.jpg"])
    assert duplicate_groups(found)[0]["count"] == 3


# -- progress lines -------------------------------------------------------------------------

@pytest.mark.parametrize("width", [200, 80, 60, 40, 20])
def test_progress_lines_fit_the_terminal(width):
    reply = {"phase": "progress", "done_files": 1200, "to_fetch": 5198,
             "done_bytes": 3 << 30, "bytes": 40 << 30, "elapsed": 95.0,
             "fetch_elapsed": 40.0, "in_flight": 8, "failed": 0}
    line = fit(progress_text("sync", reply), width)
    assert len(line) < width
    full = progress_text("sync", reply)
    if width >= len(full) + 1:
        assert line == full
    elif width >= 80:
        assert line.endswith("left")  # the bar gives way before the estimate does


def test_sync_progress_shows_the_walk_and_estimates_from_bytes_and_files():
    walk = progress_text("sync", {"phase": "walk", "folders": 363, "files_found": 5198,
                                  "elapsed": 3.2})
    assert "363 read" in walk and "5198 files found" in walk
    # Half the files but a tenth of the bytes after 40 s: neither 40 s nor 6 min left.
    reply = {"phase": "progress", "done_files": 50, "to_fetch": 100, "done_bytes": 10,
             "bytes": 100, "elapsed": 60.0, "fetch_elapsed": 40.0}
    text = progress_text("sync", reply)
    assert "~1m" in text, text  # 40 s * (1 - 0.3) / 0.3 = 93 s


# -- the mount table ------------------------------------------------------------------------

def test_imgrepo_mounts_are_read_from_the_kernel_table(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "50 22 0:45 / /home/u/my\\040photos rw,nosuid,nodev - fuse.imgrepo imgrepo rw\n"
        "51 22 0:46 / /mnt/b rw - fuse.imgrepo-mount s3://b/p rw\n"
        "52 22 0:47 / /mnt/other rw - fuse.sshfs host: rw\n")
    assert imgrepo_mounts(info) == [Path("/home/u/my photos"), Path("/mnt/b")]
    assert imgrepo_mounts(tmp_path / "missing") == []


# -- errors at mount time -------------------------------------------------------------------

def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_refused_connection_is_called_so_at_once(tmp_path):
    from fsrepo.store import open_store
    port = _refused_port()
    store = open_store("s3://photos/lib", f"http://127.0.0.1:{port}", "us-east-1")
    guard = GuardedStore(store)

    async def main() -> bool:
        try:
            with trio.fail_after(20):
                return await guard.reachable()
        finally:
            await guard.aclose()

    assert trio.run(main) is False
    assert guard.unreachable_because == "connection refused"


def test_a_web_server_that_is_not_s3_is_recognised(tmp_path, s3_bucket):
    (tmp_path / "index.html").write_text("<html>hello</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reason = not_s3_reason(f"http://127.0.0.1:{server.server_address[1]}", "photos")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert reason is not None and "404" in reason and "text/html" in reason
    # A real S3 server (moto) is recognised, whether the bucket exists or not.
    assert not_s3_reason(s3_bucket.endpoint_url, s3_bucket.bucket) is None
    assert not_s3_reason(s3_bucket.endpoint_url, "no-such-bucket-here") is None


def test_fuse_is_checked_with_the_reason(tmp_path):
    with pytest.raises(ImgrepoError, match="missing.*modprobe fuse"):
        check_fuse(str(tmp_path / "no-fuse"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImgrepoError, match="FUSE is not usable: cannot open .*dir: Is a dir"):
        check_fuse(str(tmp_path / "dir"))


# -- the cache key --------------------------------------------------------------------------

def test_the_same_bucket_on_two_endpoints_has_two_caches(tmp_path):
    a = Settings(storage="s3://photos/lib", endpoint_url="http://a:9000", cache_root=tmp_path)
    b = Settings(storage="s3://photos/lib", endpoint_url="http://b:9000/", cache_root=tmp_path)
    a2 = Settings(storage="s3://photos/lib/", endpoint_url="HTTP://A:9000/",
                  cache_root=tmp_path)
    plain = Settings(storage="s3://photos/lib", cache_root=tmp_path)
    local = Settings(storage="file:///srv/repo", endpoint_url="http://a:9000",
                     cache_root=tmp_path)
    assert a.state_dir() != b.state_dir() and a.state_dir() == a2.state_dir()
    assert a.legacy_state_dir() == plain.state_dir() and plain.legacy_state_dir() is None
    assert local.legacy_state_dir() is None  # file:// keys never changed


def test_an_old_cache_moves_to_the_key_with_the_endpoint(tmp_path, capsys):
    from fsrepo.cli.daemon import adopt_legacy_state
    settings = Settings(storage="s3://photos/lib", endpoint_url="http://a:9000",
                        cache_root=tmp_path)
    old = settings.legacy_state_dir()
    assert old is not None
    old.mkdir(parents=True)
    (old / "state.db").write_bytes(b"the old state")
    adopt_legacy_state(settings)
    assert not old.exists()
    assert (settings.state_dir() / "state.db").read_bytes() == b"the old state"
    assert "moved the local cache" in capsys.readouterr().err
    adopt_legacy_state(settings)  # once only: nothing left to move, nothing happens
    assert (settings.state_dir() / "state.db").exists()


# -- the upload summary and the upload rate -------------------------------------------------

def test_uploads_are_summed_up_at_a_steady_pace_only_when_something_moved(caplog):
    from fsrepo.upload_log import final_line, log_uploads
    from fsrepo.uploader import UploadStatus
    caplog.set_level(logging.INFO, logger="fsrepo.upload_log")
    status = UploadStatus()
    pending = {"blobs": 2, "bytes": 2048, "ops": 3}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log_uploads, status, lambda: pending, 1.0)
            await trio.sleep(2.5)  # (trio's clock below is virtual: no real waiting)
            status.uploaded_blobs, status.uploaded_bytes, status.skipped_blobs = 5, 5 << 20, 2
            await trio.sleep(3.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["uploads: 5 files (5.0 MiB) sent, 2 already in the bucket (dedup), 0 "
                     "folder updates; queued: 2 files (2.0 KiB), 3 changes"]
    assert final_line(UploadStatus(), pending) is None
    assert final_line(status, pending).startswith("this session's uploads: 5 files")


def test_the_upload_rate_comes_from_the_queue_going_down():
    from fsrepo.cli.progress import UploadRate
    rate = UploadRate()
    assert rate.text(10 << 20, now=100.0) == ""  # nothing to measure yet
    assert rate.text(6 << 20, now=102.0) == ", 2.0 MiB/s, ~3s left"


def test_the_guard_notes_every_success(tmp_path):
    from fsrepo.store import open_store
    (tmp_path / "repo").mkdir()
    guard = GuardedStore(open_store(f"file://{tmp_path / 'repo'}", None, None))

    async def main() -> None:
        assert guard.status()["storage_success_at"] is None
        await guard.put("k", b"x")
        await guard.get("k")
        await guard.aclose()

    trio.run(main)
    assert guard.status()["storage_success_at"] is not None


def test_sync_reports_the_walk_from_its_first_moment_and_times_the_whole_run(tmp_path):
    replies: list[dict] = []

    async def send(reply: dict) -> None:
        replies.append(reply)

    async def main() -> dict:
        repo = tmp_path / "repo"
        repo.mkdir()
        async with running_engine(f"file://{repo}", None, tmp_path / "cache") as eng:
            for i in range(6):
                await write_file(eng, f"y{i % 3}/m{i}/p{i}.jpg", b"photo %d" % i)
            await eng.uploader.wait_idle()
            return await eng.syncer.run([], send)

    final = trio.run(main)
    assert replies[0]["phase"] == "walk"  # before anything else: the walk shows at once
    start = next(r for r in replies if r["phase"] == "start")
    assert start["folders"] == 10 and start["files"] == 6  # root, 3 years, 6 months
    assert final["elapsed"] >= start["elapsed"]  # the walk is part of the run's time


class _Tty:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("not a real terminal")

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_a_progress_line_on_a_terminal_is_redrawn_within_its_width(monkeypatch):
    from fsrepo.cli.progress import ProgressLine
    monkeypatch.setenv("COLUMNS", "50")
    tty = _Tty()
    with ProgressLine(tty) as line:  # type: ignore[arg-type]
        line.show("uploading: 1200 files (3.0 GiB) and 1300 changes pending, 20.0 MiB/s, "
                  "~2m30s left")
    drawn = [part for part in tty.text.split("\r\033[K") if part]
    assert drawn and all(len(part) < 50 for part in drawn)
    assert tty.text.endswith("\r\033[K")  # erased when done
