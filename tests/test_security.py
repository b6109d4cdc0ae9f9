"""Security: the mount is private to its user, secrets never leak, TLS is verified.

(Login tokens are the auth tests' business; here it is the AWS credentials from the
environment that must never show up anywhere the tests can see: logs, status output, error
messages, the process title, the local state.)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from fsrepo import control
from fsrepo.auth.store import TokenStore
from fsrepo.config import runtime_dir
from fsrepo.errors import ConfigError, ImgrepoError, StorageError
from fsrepo.logsetup import PrivateRotatingFileHandler
from fsrepo.retry import REQUEST
from fsrepo.store import open_store
from fsrepo.store.s3 import S3Store

from .mountutil import MountProcess, run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _mountinfo(path: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at `path`."""
    target = str(path)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == target:
                return set(fields[5].split(",")), set(right.split()[2].split(","))
    raise AssertionError(f"{path} is not mounted")


def _ls_as_nobody(path: Path) -> subprocess.CompletedProcess:
    def demote() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return subprocess.run(["/bin/ls", str(path)], capture_output=True, text=True,
                          preexec_fn=demote, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                              "LC_ALL": "C"})


@pytest.fixture
def public_dir():
    """A folder other users may traverse (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="imgrepo-sec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_mount_is_private_nosuid_and_runs_as_its_user(public_dir: Path, mounter, mount_env,
                                                      tmp_path: Path):
    m = MountProcess(public_dir / "mnt", f"file://{tmp_path}/repo", tmp_path / "cache",
                     mount_env)
    mounter.mounts.append(m)  # cleaned up at teardown
    m.start()
    (m.path / "photo.jpg").write_bytes(b"private")
    (public_dir / "plain").mkdir()
    (public_dir / "plain" / "x").write_bytes(b"x")

    per_mount, super_opts = _mountinfo(m.path)
    assert {"nosuid", "nodev"} <= per_mount, per_mount
    assert "allow_other" not in super_opts and "allow_root" not in super_opts, super_opts
    assert f"user_id={os.getuid()}" in super_opts
    # The daemon runs as the user who started it, nothing more.
    with open(f"/proc/{m.proc.pid}/status") as fh:
        uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(os.getuid())}
    # Another user is turned away by the kernel (no allow_other), while the same user can
    # read an ordinary folder beside it: the refusal is the mount's privacy.
    res = _ls_as_nobody(public_dir / "plain")
    assert res.returncode == 0 and res.stdout.split() == ["x"], res.stderr
    res = _ls_as_nobody(m.path)
    assert res.returncode != 0 and "Permission denied" in res.stderr, (res.stdout, res.stderr)
    # The local cache (copies of the files, their names) is private too.
    status = m.status()
    state_dir = Path(status["log_file"]).parent if status.get("log_file") else None
    if state_dir is None:
        state_dir = next((tmp_path / "cache" / "repos").iterdir())
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    log_file = state_dir / "imgrepo.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def _all_text(root: Path) -> bytes:
    out = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                out.append(p.read_bytes())
        except OSError:
            pass
    return b"\n".join(out)


def test_aws_secrets_never_leak(s3_bucket, s3_proxy, mounter, mount_env, tmp_path: Path):
    secret = "SeCrEt" + secrets.token_hex(16)
    token = "ToKeN" + secrets.token_hex(24)
    mount_env["AWS_SECRET_ACCESS_KEY"] = secret
    mount_env["AWS_SESSION_TOKEN"] = token
    m = mounter(s3_bucket.url, "--verbose", endpoint_url=s3_proxy.url)
    cmdline = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes()
    outputs: list[str] = []
    # Errors of every kind, so that error paths write their messages too.
    s3_proxy.inject(method="PUT", path="/blobs/", status=403, times=3)  # AccessDenied
    s3_proxy.inject(method="PUT", path="/dirs/", status=500, times=2)
    s3_proxy.inject(method="GET", status=400, code="InvalidToken", times=1)
    for i in range(5):
        (m.path / f"f{i}").write_bytes(os.urandom(1000 + i))
    status = m.wait_idle()
    outputs.append(json.dumps(status))
    outputs.append(run_cli(["--status", str(m.path)], mount_env).stdout)
    extra = ["--storage", s3_bucket.url, "--endpoint-url", s3_proxy.url]
    for args in (["--verify", "--data"], ["--verify", "--json"], ["--gc", "--dry-run"]):
        res = run_cli([*args, *extra], mount_env, check=False)
        outputs += [res.stdout, res.stderr]
    s3_proxy.inject(status=403, times=None)  # credentials refused from now on
    res = run_cli(["--verify", *extra], mount_env, check=False)
    assert res.returncode != 0 and "refused access" in res.stderr, res.stderr
    outputs += [res.stdout, res.stderr]
    s3_proxy.clear_faults()
    m.unmount()
    everything = _all_text(tmp_path) + "\n".join(outputs).encode() + cmdline
    assert b"refused access" in everything  # the access-denied path was exercised
    for value in (secret, token):
        assert value.encode() not in everything, f"{value[:6]}... leaked"
    assert secret.encode() not in cmdline and token.encode() not in cmdline


def _head(store) -> BaseException | None:
    async def main():
        try:
            await store.check()
        except StorageError as exc:
            return exc
        finally:
            await store.aclose()
        return None
    return trio.run(main)


def test_tls_certificates_are_verified(tls_server, monkeypatch, mount_env):
    url, cert = tls_server
    exc = _head(S3Store("bucket", endpoint_url=url, retries=replace(REQUEST, attempts=1)))
    assert exc is not None and "certificate verify failed" in str(exc).lower(), exc
    # Control: trusting that certificate explicitly gets past TLS (to the server's 404),
    # so the refusal above was the certificate check and nothing else.
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    exc = _head(S3Store("bucket", endpoint_url=url, retries=replace(REQUEST, attempts=1)))
    assert exc is not None and "does not exist" in str(exc), exc
    monkeypatch.delenv("AWS_CA_BUNDLE")
    # The command line says so in one line.
    res = run_cli(["--verify", "--storage", "s3://bucket", "--endpoint-url", url], mount_env,
                  check=False, timeout=180)
    assert res.returncode != 0
    assert res.stderr.startswith("imgrepo-mount: error:") and "Traceback" not in res.stderr
    assert "certificate" in res.stderr.lower() and len(res.stderr.strip().splitlines()) == 1


def test_plain_http_only_to_this_machine(monkeypatch):
    for ok in ("http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000",
               "https://s3.example.com", "https://10.1.2.3:9000"):
        trio.run(open_store("s3://bucket/p", endpoint_url=ok).aclose)
    for bad in ("http://s3.example.com", "http://10.1.2.3:9000", "http://192.168.1.5",
                "ftp://127.0.0.1"):
        with pytest.raises(ConfigError) as err:
            open_store("s3://bucket/p", endpoint_url=bad)
        assert "https://" in str(err.value)
    monkeypatch.setenv("IMGREPO_ALLOW_HTTP", "1")
    trio.run(open_store("s3://bucket/p", endpoint_url="http://10.1.2.3:9000").aclose)


def test_no_code_turns_certificate_checks_off():
    offenders = []
    for path in (REPO_ROOT / "fsrepo").rglob("*.py"):
        text = path.read_text()
        for needle in ("verify=False", "CERT_NONE", "check_hostname = False",
                       "check_hostname=False", "_create_unverified_context"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {needle}")
    assert offenders == []


def _aws_config(tmp_path: Path, monkeypatch, text: str) -> None:
    path = tmp_path / "aws-config"
    path.write_text(text)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    monkeypatch.setenv("AWS_PROFILE", "photos")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("profile", [
    "[profile photos]\nendpoint_url = http://s3.example.com\n",
    "[profile photos]\nservices = store\n\n[services store]\ns3 =\n"
    "  endpoint_url = http://10.1.2.3:9000\n",
])
def test_plain_http_from_the_aws_config_file_is_refused(profile, tmp_path: Path, monkeypatch):
    _aws_config(tmp_path, monkeypatch, profile)
    with pytest.raises(ConfigError) as err:
        open_store("s3://bucket/p")
    assert "refusing plain http" in str(err.value) and "AWS configuration" in str(err.value)
    monkeypatch.setenv("IMGREPO_ALLOW_HTTP", "1")  # the same escape hatch as for a flag
    trio.run(open_store("s3://bucket/p").aclose)


def test_an_endpoint_from_the_aws_config_file_gets_the_custom_endpoint_settings(
        tmp_path: Path, monkeypatch):
    _aws_config(tmp_path, monkeypatch,
                "[profile photos]\nregion = eu-west-1\nendpoint_url = http://127.0.0.1:9\n")
    store = open_store("s3://bucket/p")
    try:
        config = store._client.meta.config
        assert store.endpoint == "http://127.0.0.1:9"
        # as for --endpoint-url: path-style, only the checksums imgrepo adds itself
        assert config.s3["addressing_style"] == "path"
        assert config.request_checksum_calculation == "when_required"
        assert config.response_checksum_validation == "when_required"
    finally:
        trio.run(store.aclose)


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_a_planted_runtime_folder_is_refused(public_dir: Path, monkeypatch):
    """The socket folder is used only if it is a real directory of ours, mode 0700."""
    victim = public_dir / "victims-folder"
    victim.mkdir(mode=0o700)
    planted = {
        "link": lambda p: p.symlink_to(victim),  # a symlink to a folder we own
        "file": lambda p: p.write_text("x"),
        "theirs": lambda p: (p.mkdir(mode=0o700), os.chown(p, NOBODY, NOBODY)),
        "open": lambda p: (p.mkdir(), p.chmod(0o777)),
    }
    reasons = {"link": "not a real directory", "file": "not a real directory",
               "theirs": f"belongs to another user (uid {NOBODY})", "open": "not 0700"}
    for name, plant in planted.items():
        base = public_dir / name
        base.mkdir(mode=0o700)
        plant(base / "imgrepo")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
        with pytest.raises(ConfigError) as err:
            runtime_dir()
        assert reasons[name] in str(err.value) and "\n" not in str(err.value), name
        # every command that needs the folder says so in one line, and does not trust it
        with pytest.raises(ImgrepoError):
            list(control.request(public_dir, {"cmd": "status"}))
        assert not control.is_running(public_dir)
    assert list(victim.iterdir()) == []
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(public_dir / "fresh"))
    made = runtime_dir()
    assert stat.S_IMODE(made.lstat().st_mode) == 0o700 and made.lstat().st_uid == os.getuid()


FAKE_MOUNT = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(4)
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.recv(65536)
    conn.sendall(b'{"done": true, "pid": 1, "mountpoint": "fake"}\\n')
    conn.close()
"""


def test_a_control_socket_served_by_another_uid_is_not_trusted(public_dir: Path, tmp_path: Path,
                                                               monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    drop = public_dir / "theirs"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    bound = drop / "fake.sock"
    fake = subprocess.Popen(["/usr/bin/python3", "-c", FAKE_MOUNT, str(bound)],
                            preexec_fn=_as_nobody, stdout=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        # The other user's socket where ours would be (the way a planted folder puts it).
        os.rename(bound, control.socket_path(mountpoint))
        with pytest.raises(ImgrepoError) as err:
            list(control.request(mountpoint, {"cmd": "status"}))
        assert f"another user (uid {NOBODY})" in str(err.value)
        assert not control.is_running(mountpoint)
    finally:
        fake.kill()
        fake.wait()


@pytest.mark.expected_logs(r"control socket: refused a request over",
                           reason="the oversized request is refused")
def test_control_requests_are_bounded_and_checked(mounter, mount_env, tmp_path: Path,
                                                  monkeypatch):
    m = mounter(f"file://{tmp_path}/repo")
    monkeypatch.setenv("XDG_RUNTIME_DIR", mount_env["XDG_RUNTIME_DIR"])
    path = control.socket_path(m.path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        try:
            sock.sendall(b"x" * (control.MAX_REQUEST + 200_000))  # no newline, ever
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-send: refused
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with our bytes unread
            answer = b""
        assert answer == b""  # closed without an answer (not left waiting for a newline)
    assert m.status()["pid"] == m.proc.pid  # the mount serves the next request as usual
    assert "refused a request over" in m.logtext()


def test_an_existing_config_folder_is_tightened_to_0700(tmp_path: Path):
    folder = tmp_path / "config" / "imgrepo"
    folder.mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)  # made by hand, or with a loose umask, before the first login
    store = TokenStore(folder)
    with store.locked():
        pass
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_log_file_and_every_rotated_one_are_created_0600(tmp_path: Path):
    old_umask = os.umask(0o022)
    handler = PrivateRotatingFileHandler(tmp_path / "imgrepo.log", maxBytes=200, backupCount=2)
    try:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "x" * 150, None, None)
        for _ in range(4):  # rotates: a new imgrepo.log after each of them
            handler.emit(record)
    finally:
        handler.close()
        os.umask(old_umask)
    files = sorted(tmp_path.glob("imgrepo.log*"))
    assert [p.name for p in files] == ["imgrepo.log", "imgrepo.log.1", "imgrepo.log.2"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_commands_run_without_core_dumps(mount_env, mounter, tmp_path: Path):
    probe = ("import resource; from fsrepo import cli, nodump\n"
             "try: cli.main(['--help'])\n"
             "except SystemExit: pass\n"
             "print(resource.getrlimit(resource.RLIMIT_CORE), nodump.dumpable())")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=mount_env, timeout=60, check=True)
    assert res.stdout.strip().splitlines()[-1] == "(0, 0) False", res.stdout
    m = mounter(f"file://{tmp_path}/repo")  # the mount: the process that holds them longest
    limits = Path(f"/proc/{m.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
