"""Mounting it like any Linux filesystem, on real FUSE mounts: mount(8) with an fstab-style
line, plain umount, `-o ro` without a writer lease, allow_other with the stored modes still
checked, and the systemd user unit from docs/ (Type=notify, journal-style log)."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testservers.s3proxy import S3Proxy

from .mountutil import CLI, REPO_ROOT, Mounter, file_tree, force_unmount, is_mounted, poll, run_cli

# mount(8) runs its helpers with this PATH, whatever the caller's: scripts/setup.sh links
# imgrepo-mount into it. PYTHONPATH (kept by mount) makes that entry point run this tree.
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Only a non-root run skips: as root, a missing mount.fuse3 or imgrepo-mount on mount(8)'s
# PATH is a missing install step (scripts/setup.sh), and the tests fail on it.
needs_mount8 = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and fstab need root")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to nobody)")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _pid_of(mountpoint: Path, env: dict[str, str]) -> int:
    import json
    return int(json.loads(run_cli(["--status", str(mountpoint), "--json"], env).stdout)["pid"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def mount8() -> Iterator[list[Path]]:
    """Mountpoints mounted through mount(8): at teardown, whatever the test did, each is
    unmounted and the process that served it stopped."""
    mountpoints: list[Path] = []
    yield mountpoints
    for mp in mountpoints:
        pid = _fuse_pid(mp)
        force_unmount(mp)
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGTERM)


def _fuse_pid(mountpoint: Path) -> int | None:
    """The pid of the imgrepo process serving `mountpoint`, if any."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fsrepo.cli" in cmdline and str(mountpoint).encode() in cmdline:
                return int(proc.name)
    return None


def _fstab_line(repo: Path, mnt: Path, cache: Path, extra: str) -> str:
    """The documented fstab line (docs/systemd/fstab), pointed at the test's folders."""
    doc = (REPO_ROOT / "docs" / "systemd" / "fstab").read_text()
    source, target, fstype, options, dump, passno = next(
        line.split() for line in doc.splitlines() if line and not line.startswith("#"))
    assert fstype == "fuse.imgrepo-mount"
    options = re.sub(r"cache-dir=[^,]*", f"cache-dir={cache}", options)
    return f"{repo} {mnt} {fstype} {options},{extra} {dump} {passno}\n"


@needs_mount8
def test_fstab_line_through_mount8_and_plain_umount_keeps_closed_files(
        mount8: list[Path], mounter, mount_env: dict[str, str], tmp_path: Path) -> None:
    repo, mnt, cache = tmp_path / "repo", tmp_path / "photos", tmp_path / "cache"
    mnt.mkdir()
    mount8.append(mnt)
    fstab = tmp_path / "fstab"
    fstab.write_text(_fstab_line(repo, mnt, cache, "refresh=1,noexec,x-systemd.automount,"
                                 "x-systemd.mount-timeout=30,comment=x-gvfs-show"))
    for _ in range(2):  # `mount -a` again: mount(8) knows it is mounted and skips it
        res = subprocess.run(["mount", "--fstab", str(fstab), "-a"], env=mount_env,
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    fields = next(line.split() for line in open("/proc/self/mounts")
                  if line.split()[1] == str(mnt))
    assert fields[:3] == [str(repo), str(mnt), "fuse.imgrepo-mount"]
    assert {"rw", "noexec", "nosuid", "nodev", "allow_other"} <= set(fields[3].split(","))
    pid = _pid_of(mnt, mount_env)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"  # the daemon holds no folder busy

    (mnt / "2024").mkdir()
    (mnt / "2024" / "one.jpg").write_bytes(b"one" * 1000)
    (mnt / "two.txt").write_bytes(b"two")
    res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    poll(lambda: _gone(pid), what="the mount process to exit after umount")
    assert not is_mounted(mnt)

    again = mounter(f"file://{repo}", cache_dir=cache, name="again")
    assert file_tree(again.path) == {"2024/one.jpg": b"one" * 1000, "two.txt": b"two"}
    again.wait_idle()
    again.unmount()
    fresh = mounter(f"file://{repo}", "--read-only", name="fresh")  # another machine
    assert file_tree(fresh.path) == {"2024/one.jpg": b"one" * 1000, "two.txt": b"two"}


@needs_mount8
def test_mount8_refuses_an_unknown_option_in_one_line(mount_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    mnt = tmp_path / "photos"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "fuse.imgrepo-mount", str(tmp_path / "repo"),
                          str(mnt), "-o", f"cache-dir={tmp_path / 'cache'},colour=blue"],
                         env=mount_env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "imgrepo-mount: error: unknown mount option 'colour' (see imgrepo-mount --help)"]
    assert not is_mounted(mnt) and not (tmp_path / "repo").exists()


def test_ro_option_mounts_without_the_writer_lease(moto_server, s3_bucket, mounter) -> None:
    # A server without conditional writes: writers take turns with a lease.
    with S3Proxy(moto_server.url, strip_conditions=True) as proxy:
        writer = mounter(s3_bucket.url, endpoint_url=proxy.url, name="writer")
        assert writer.status()["write_mode"].startswith("single writer (lease held")
        (writer.path / "a.txt").write_bytes(b"from the writer")
        writer.wait_idle()
        proxy.reset_counts()
        ro = mounter(s3_bucket.url, "-o", f"ro,endpoint-url={proxy.url}", name="ro")
        assert ro.status()["write_mode"] == "read-only"  # mounted while the lease is held
        assert (ro.path / "a.txt").read_bytes() == b"from the writer"
        options = next(line.split()[3] for line in open("/proc/self/mounts")
                       if line.split()[1] == str(ro.path))
        assert "ro" in options.split(",")
        for change in (lambda: (ro.path / "b.txt").write_bytes(b"x"),
                       lambda: (ro.path / "a.txt").unlink(),
                       lambda: os.truncate(ro.path / "a.txt", 0)):
            with pytest.raises(OSError) as err:
                change()
            assert err.value.errno == errno.EROFS
        ro.unmount()
        writes = [f"{r.method} {r.path}" for r in proxy.requests
                  if r.method in ("PUT", "POST", "DELETE")
                  and not r.path.endswith("/lease.json")]
        assert writes == []  # (the lease's renewals are the writer's)
        writer.unmount()


@pytest.fixture
def open_mounter(mount_env: dict[str, str]) -> Iterator[Mounter]:
    """A mounter whose mountpoints other users can reach (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="imgrepo-shared-"))
    top.chmod(0o755)
    m = Mounter(top, mount_env)
    try:
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)


@needs_root
def test_allow_other_lets_another_user_in_and_modes_still_apply(open_mounter: Mounter,
                                                                tmp_path: Path) -> None:
    shared = open_mounter(f"file://{tmp_path / 'repo'}", "-o",
                          "allow_other,default_permissions", name="shared")
    (shared.path / "public.txt").write_bytes(b"for everyone")
    (shared.path / "public.txt").chmod(0o644)
    (shared.path / "private.txt").write_bytes(b"mine")
    (shared.path / "private.txt").chmod(0o600)
    readable = subprocess.run([*NOBODY, "cat", str(shared.path / "public.txt")],
                              capture_output=True, timeout=60)
    assert (readable.returncode, readable.stdout) == (0, b"for everyone")
    refused = subprocess.run([*NOBODY, "cat", str(shared.path / "private.txt")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    written = subprocess.run([*NOBODY, "sh", "-c", f"echo x >> {shared.path}/public.txt"],
                             capture_output=True, text=True, timeout=60)
    assert written.returncode != 0 and "Permission denied" in written.stderr
    assert (shared.path / "public.txt").read_bytes() == b"for everyone"

    own = open_mounter(f"file://{tmp_path / 'repo2'}", name="own")  # no allow_other
    (own.path / "public.txt").write_bytes(b"x")
    (own.path / "public.txt").chmod(0o644)
    res = subprocess.run([*NOBODY, "cat", str(own.path / "public.txt")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Permission denied" in res.stderr


@needs_root
def test_allow_other_as_a_user_without_user_allow_other_is_one_line(
        mount_env: dict[str, str]) -> None:
    fuse_conf = Path("/etc/fuse.conf")
    if fuse_conf.exists() and "user_allow_other" in [
            line.strip() for line in fuse_conf.read_text().splitlines()]:
        pytest.skip("this machine's /etc/fuse.conf allows user_allow_other")
    home = Path(tempfile.mkdtemp(prefix="imgrepo-nobody-"))
    try:
        (home / "mnt").mkdir()
        os.chown(home, 65534, 65534)
        os.chown(home / "mnt", 65534, 65534)
        home.chmod(0o755)
        env = {**mount_env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / "data"),
               "XDG_RUNTIME_DIR": str(home / "run")}
        res = subprocess.run([*NOBODY, *CLI, str(home / "data"), str(home / "mnt"), "-o",
                              "allow_other"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=REPO_ROOT)
        assert res.returncode != 0
        assert res.stderr.strip().splitlines() == [
            "imgrepo-mount: error: -o allow_other needs root, or the line user_allow_other "
            "in /etc/fuse.conf"]
        assert not is_mounted(home / "mnt")
    finally:
        force_unmount(home / "mnt")
        shutil.rmtree(home, ignore_errors=True)


def _unit_commands(home: Path) -> dict[str, list[str]]:
    """The user unit's [Service] commands, as systemd would run them for this HOME, with
    the installed entry point replaced by this tree's."""
    unit = (REPO_ROOT / "docs" / "systemd" / "imgrepo.service").read_text()
    service = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    out: dict[str, list[str]] = {}
    for line in service.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            argv = shlex.split(value.replace("%h", str(home)))
            if argv and argv[0] == "/usr/local/bin/imgrepo-mount":
                argv = [*CLI, *argv[1:]]
            out[key.strip()] = argv
    return out


def test_user_unit_notifies_systemd_and_logs_for_the_journal(mount_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    home = Path(mount_env["HOME"])
    config = home / ".config" / "imgrepo" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'storage = "file://{tmp_path / "repo"}"\n'
                      f'cache-dir = "{tmp_path / "cache"}"\n')
    unit = _unit_commands(home)
    assert unit["Type"] == ["notify"]
    subprocess.run(unit["ExecStartPre"], check=True, timeout=60)
    mnt = home / "photos"
    stderr_path = tmp_path / "journal-stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock, \
            open(stderr_path, "wb") as stream:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.settimeout(120)  # a deadline for a hung mount, not a speed target
        st = os.fstat(stream.fileno())
        env = {**mount_env, "NOTIFY_SOCKET": str(tmp_path / "notify"),
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(unit["ExecStart"], env=env, stdout=stream, stderr=stream,
                                cwd=REPO_ROOT, start_new_session=True)
        try:
            assert notify_sock.recv(256) == b"READY=1"
            assert is_mounted(mnt)  # ready means mounted
            (mnt / "one.jpg").write_bytes(b"photo")
            stop = subprocess.run(unit["ExecStop"], env=mount_env, capture_output=True,
                                  text=True, timeout=120, cwd=REPO_ROOT)
            assert stop.returncode == 0, stop.stderr
            assert notify_sock.recv(256) == b"STOPPING=1"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            force_unmount(mnt)
    lines = stderr_path.read_text().splitlines()
    assert "<6>fsrepo.mount: mounted file://" in "\n".join(lines)
    stamped = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d", line)]
    assert stamped == []  # the journal stamps the time itself
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    check = tmp_path / "check"  # another machine: sees what the stop uploaded
    check.mkdir()
    try:
        run_cli([str(check), "--storage", f"file://{tmp_path / 'repo'}",
                 "--cache-dir", str(tmp_path / "cache2"), "--read-only"], mount_env)
        assert file_tree(check) == {"one.jpg": b"photo"}
    finally:
        run_cli(["--unmount", str(check)], mount_env, check=False)
        force_unmount(check)


@needs_mount8
def test_the_install_puts_what_mount8_runs_on_its_path() -> None:
    """mount(8) runs helpers with a fixed PATH: scripts/setup.sh installs fuse3's
    mount.fuse3 and links imgrepo-mount where that PATH finds them."""
    assert shutil.which("mount.fuse3", path=HELPER_PATH), "fuse3 is not installed"
    assert shutil.which("imgrepo-mount", path=HELPER_PATH), "imgrepo-mount is not linked"
