"""What the user is told, through real mounts: the machine's mounts (a dead one with its
cleanup), the files not uploaded yet by path, conflicts by path with how to resolve them,
only current problems, duplicates, --verify given a mountpoint, the process's name, and
the mount-time errors for a refused connection and an endpoint that is not S3."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from .mountutil import force_unmount, poll, run_cli

KiB = 1024


def status_json(m, *extra: str) -> dict:  # noqa: ANN001
    return json.loads(run_cli(["--status", str(m.path), "--json", *extra], m.env).stdout)


@pytest.mark.expected_logs(r"unreachable, working offline|conflict: /shared.txt was changed",
                           reason="machine B is cut off while A writes the same name; B's "
                                  "version becomes a conflict copy when it is back")
def test_pending_files_and_conflicts_are_named_by_path(s3_bucket, s3_proxy, mounter):
    a = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url, name="a")
    b = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="b")
    (b.path / "seen.txt").write_bytes(b"so that B has loaded the root")
    b.wait_idle()
    s3_proxy.pause()
    try:
        (a.path / "shared.txt").write_bytes(b"A's version")
        a.wait_idle()
        (b.path / "shared.txt").write_bytes(b"B's version, written offline")
        (b.path / "album").mkdir()
        big = os.urandom(300 * KiB)
        (b.path / "album" / "big.jpg").write_bytes(big)
        poll(lambda: status_json(b)["online"] is False, what="B to notice the outage")
        st = status_json(b, "--pending")
        listed = {f["path"]: f["size"] for f in st["pending"]["files"]}
        assert listed == {"/album/big.jpg": 300 * KiB, "/shared.txt": 28}
        assert st["pending"]["files"][0]["path"] == "/album/big.jpg"  # largest first
        human = run_cli(["--status", "--pending", str(b.path)], b.env).stdout
        assert "not uploaded: 2 files" in human and "/album/big.jpg" in human
        assert "UNREACHABLE" in human
    finally:
        s3_proxy.resume()
    done = b.wait_idle()
    assert done["conflicts"] == 1 and done["last_error"] is None  # the outage is over
    copy = done["conflict_copies"][0]
    assert copy["path"] == "/shared.txt" and copy["copy"].startswith("/shared (conflict ")
    assert (b.path / copy["copy"].lstrip("/")).read_bytes() == b"B's version, written offline"
    human = run_cli(["--status", str(b.path)], b.env).stdout
    assert "conflicts:    1 since mounted" in human and copy["copy"] in human
    assert "to resolve:" in human
    assert "last error" not in human  # only current problems
    assert "not uploaded" not in human  # listed only when asked for
    assert status_json(b, "--pending")["pending"]["total_files"] == 0
    # --verify and --gc given a mountpoint check that mount's repository (here through
    # the proxy's endpoint, which only the mount knows).
    res = run_cli(["--verify", str(b.path)], b.env)
    assert "no problems found" in res.stdout and s3_bucket.url in res.stdout
    res = run_cli(["--gc", "--dry-run", str(b.path)], b.env)
    assert "would delete 0 blobs" in res.stdout


def test_duplicates_lists_identical_files_from_the_manifests(tmp_path, mounter):
    m = mounter(f"file://{tmp_path / 'repo'}")
    photo, other = os.urandom(200 * KiB), os.urandom(50 * KiB)
    for rel, data in {"phone1/IMG_1.jpg": photo, "phone2/IMG_0001.jpg": photo,
                      "backup/phone1/IMG_1.jpg": photo, "phone1/IMG_2.jpg": other,
                      "backup/phone1/IMG_2.jpg": other, "unique.jpg": b"only once"}.items():
        (m.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (m.path / rel).write_bytes(data)
    r = json.loads(run_cli(["--duplicates", str(m.path), "--json"], m.env).stdout)
    assert r["files"] == 6 and r["path"] == "/"
    assert [g["paths"] for g in r["groups"]] == [
        ["/backup/phone1/IMG_1.jpg", "/phone1/IMG_1.jpg", "/phone2/IMG_0001.jpg"],
        ["/backup/phone1/IMG_2.jpg", "/phone1/IMG_2.jpg"]]
    assert r["groups"][0]["space_without_dedup"] == 3 * 200 * KiB
    assert r["saved"] == 2 * 200 * KiB + 50 * KiB
    # Under a folder only, given as a path in the mount; the human output names the paths.
    out = run_cli(["--duplicates", str(m.path), str(m.path / "phone1")], m.env).stdout
    assert "no two files have the same content" in out
    out = run_cli(["--duplicates", str(m.path), "backup"], m.env).stdout
    assert "no two files" in out
    out = run_cli(["--duplicates", str(m.path)], m.env).stdout
    assert "3 copies of 200.0 KiB (would take 600.0 KiB without dedup)" in out
    assert "  /phone2/IMG_0001.jpg" in out
    res = run_cli(["--duplicates", str(m.path), "/etc"], m.env, check=False)
    assert res.returncode != 0 and "is not inside the mount" in res.stderr
    assert "Traceback" not in res.stderr


def test_status_lists_the_mounts_and_says_how_to_clean_up_a_dead_one(tmp_path, mounter):
    live = mounter(f"file://{tmp_path / 'repo1'}", name="live")
    dead = mounter(f"file://{tmp_path / 'repo2'}", name="dead")
    # The mount is seen under its own name.
    found = subprocess.run(["pgrep", "-x", "imgrepo-mount"], capture_output=True, text=True)
    assert str(live.proc.pid) in found.stdout.split()
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    out = run_cli(["--status"], live.env).stdout
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    assert "online" in lines[str(live.path)] and f"file://{tmp_path / 'repo1'}" in out
    assert "NOT ANSWERING" in lines[str(dead.path)]
    assert f"imgrepo-mount --unmount {dead.path}" in lines[str(dead.path)]
    mounts = json.loads(run_cli(["--status", "--json"], live.env).stdout)["mounts"]
    mine = {m["mountpoint"]: m for m in mounts if m["mountpoint"] in (str(live.path),
                                                                      str(dead.path))}
    assert mine[str(live.path)]["answering"] and not mine[str(dead.path)]["answering"]
    assert mine[str(live.path)]["pending_files"] == 0
    # Reads count as successes too (a mount that only downloads is not "never succeeded").
    assert status_json(live)["last_success_at"] is not None
    res = run_cli(["--status", str(dead.path)], live.env, check=False)
    assert res.returncode != 0 and "does not answer" in res.stderr
    assert f"imgrepo-mount --unmount {dead.path}" in res.stderr
    # The advice works: the dead mount is cleaned up.
    res = run_cli(["--unmount", str(dead.path)], live.env)
    assert "unmounted" in res.stdout
    assert str(dead.path) not in run_cli(["--status"], live.env).stdout


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mount_errors_say_connection_refused_and_not_s3(tmp_path, mount_env):
    (tmp_path / "mnt").mkdir()
    res = run_cli([str(tmp_path / "mnt"), "--storage", "s3://photos/lib", "--endpoint-url",
                   f"http://127.0.0.1:{_refused_port()}", "--cache-dir",
                   str(tmp_path / "cache")], mount_env, check=False, timeout=60)
    assert res.returncode != 0 and "connection refused" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = b"<html><body>Welcome to my web server</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_PUT = do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        res = run_cli([str(tmp_path / "mnt"), "--storage", "s3://photos/lib",
                       "--endpoint-url", f"http://127.0.0.1:{server.server_address[1]}",
                       "--cache-dir", str(tmp_path / "cache")], mount_env, check=False,
                      timeout=60)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert res.returncode != 0 and "does not speak S3" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.expected_logs(r"unreachable, working offline|starting offline",
                           reason="the second mount starts with the storage cut off on purpose")
def test_mounting_offline_says_so_and_what_is_queued(s3_bucket, s3_proxy, mounter):
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    (m.path / "before.txt").write_bytes(b"uploaded while online")
    m.unmount()
    s3_proxy.pause()
    try:
        # The user's way: detached, the command returns once the mount serves.
        res = run_cli(m.cli_args(), m.env, timeout=60)
        try:
            assert "mounted" in res.stdout and "working offline" in res.stdout, res.stdout
            assert "connection refused" in res.stdout
            pid = status_json(m)["pid"]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                assert b"imgrepo-mount" in fh.read()  # `pgrep -f imgrepo-mount` finds it
            (m.path / "later.txt").write_bytes(b"queued")
            res = run_cli(["--unmount", str(m.path)], m.env, timeout=120)
            assert "stay queued" in res.stderr and "1 file " in res.stderr, res.stderr
        finally:
            if os.path.ismount(m.path):
                run_cli(["--unmount", str(m.path)], m.env, timeout=120, check=False)
            force_unmount(m.path)
    finally:
        s3_proxy.resume()
