#!/usr/bin/env python3
"""kill -9 soak: a long mixed workload on a real mount, killed at random moments.

Each round mounts the repository (same local cache as the round before, so the journal of
the killed run is replayed), runs a random mix of file operations (create, overwrite,
append, copy, delete, rename, mkdir, rmdir, directory moves) while a timer SIGKILLs the
mount at a random moment, then remounts and checks that the tree equals the reference of
everything that had completed. The one operation in flight at the kill may have happened
or not (and a file being written may exist empty: its creation is journaled before its
content is closed); anything else is a failure. At the end the mount is unmounted the
user's way and the tree is checked again from an empty cache, which proves every closed
file reached the bucket.

    python scripts/soak_crash.py                      # file:// repository, 10 rounds
    python scripts/soak_crash.py --rounds 50 --s3     # through moto's S3 server
    python scripts/soak_crash.py --seed 7 --keep      # reproducible; keep the work dir
    python scripts/soak_crash.py --s3 --jitter 1      # manifest writes slowed at random

`--jitter` puts a proxy in front of moto that holds each manifest write for a random
0..SECONDS: commits then overlap the operations that follow them (a folder emptied and
removed while its own commit is on its way), the orderings a loaded machine or a slow
link produces now and then, here in every round.

Exit status 0 when every round matched. The test suite runs a short version of it
(tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
Tree = dict[str, bytes | None]  # relative path -> file content, or None for a directory


class SoakFailure(AssertionError):
    pass


def is_mounted(path: Path) -> bool:
    """Whether anything (even a dead FUSE daemon's mount) is mounted at `path`."""
    target = os.path.abspath(path).encode()
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace(b"\\040", b" ") == target:
                return True
    return False


# -- the mount --------------------------------------------------------------------------
@dataclass
class Mount:
    path: Path
    storage: str
    cache_dir: Path
    env: dict[str, str]
    endpoint_url: str | None = None
    proc: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    def _args(self) -> list[str]:
        args = [str(self.path), "--storage", self.storage, "--cache-dir", str(self.cache_dir)]
        if self.endpoint_url:
            args += ["--endpoint-url", self.endpoint_url]
        return args

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fsrepo.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)

    def start(self, timeout: float = 60) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        log = self.cache_dir.parent / f"{self.path.name}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fsrepo.cli", *self._args(), "--foreground"],
                env=self.env, stdout=out, stderr=out, cwd=REPO_ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SoakFailure(f"the mount exited with {self.proc.returncode}:\n"
                                  f"{log.read_text(errors='replace')}")
            if os.path.ismount(self.path) and self.cli("--status", str(self.path),
                                                       "--json").returncode == 0:
                return
            time.sleep(0.05)
        raise SoakFailure(f"the mount did not come up:\n{log.read_text(errors='replace')}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.clear()

    def clear(self) -> None:
        # Not os.path.ismount: on a dead FUSE mount its lstat fails (ENOTCONN) and it
        # answers False.
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)

    def unmount(self) -> None:
        res = self.cli("--unmount", str(self.path), timeout=300)
        if res.returncode != 0:
            raise SoakFailure(f"--unmount failed: {res.stdout}{res.stderr}")
        assert self.proc is not None
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        """Teardown, whatever state things are in."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        self.clear()

    def logtext(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


# -- the workload -------------------------------------------------------------------------
def read_tree(root: Path) -> Tree:
    tree: Tree = {}
    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirs, files in os.walk(root, onerror=fail):
        rel = os.path.relpath(dirpath, root)
        for d in dirs:
            tree[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            tree[os.path.normpath(os.path.join(rel, f))] = (Path(dirpath) / f).read_bytes()
    return tree


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


@dataclass
class Op:
    """One operation: what it does to the reference, and the states it may leave behind if
    the mount dies in the middle of it."""

    text: str
    after: Tree
    maybe: list[Tree] = field(default_factory=list)  # intermediate states, besides before/after


class Workload:
    def __init__(self, rng: random.Random, reference: Tree,
                 flush: Callable[[], None] = lambda: None) -> None:
        self.rng = rng
        self.flush = flush  # starts an upload of everything pending, without waiting
        self.ref = reference
        self.serial = 0
        self.history: list[str] = []  # completed operations, for failure reports
        # the next steps of a multi-step operation (a scratch folder), planned when due
        self.queued: list[Callable[[], tuple[Op, Callable[[Path], object]]]] = []

    def _name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def _dirs(self) -> list[str]:
        return ["."] + [p for p, v in self.ref.items() if v is None]

    def _files(self) -> list[str]:
        return [p for p, v in self.ref.items() if v is not None]

    def _data(self) -> bytes:
        r = self.rng.random()
        size = (0 if r < 0.05 else self.rng.randint(1, 4000) if r < 0.6
                else self.rng.randint(4000, 300_000) if r < 0.95
                else self.rng.randint(1_000_000, 3_000_000))
        return self.rng.randbytes(size)

    def plan(self) -> tuple[Op, callable]:  # type: ignore[valid-type]
        """Pick an operation; returns its description and a function doing it in `root`."""
        if self.queued:
            return self.queued.pop(0)()
        rng, ref = self.rng, self.ref
        files, dirs = self._files(), self._dirs()
        choices = ["create"] * 5 + ["mkdir", "scratch"]
        if files:
            choices += ["overwrite"] * 2 + ["append", "copy", "delete"] * 1 + ["rename"] * 2
        if len(dirs) > 1:
            choices += ["rmdir", "movedir"]
        kind = rng.choice(choices)
        after = dict(ref)

        if kind in ("create", "copy"):
            path = _join(rng.choice(dirs), self._name("f"))
            return self._create(path, kind, ref[rng.choice(files)] if kind == "copy" else None)
        if kind == "scratch":
            return self._scratch(rng.choice(dirs))
        if kind == "overwrite":
            path = rng.choice(files)
            data = self._data()
            after[path] = data
            return Op(f"overwrite {path} ({len(data)} bytes)", after,
                      [dict(ref, **{path: b""})]), lambda root: (root / path).write_bytes(data)
        if kind == "append":
            path = rng.choice(files)
            extra = self.rng.randbytes(rng.randint(1, 50_000))
            after[path] = (ref[path] or b"") + extra

            def append(root: Path) -> None:
                with open(root / path, "ab") as fh:
                    fh.write(extra)
            return Op(f"append {path} (+{len(extra)})", after), append
        if kind == "delete":
            return self._delete(rng.choice(files))
        if kind == "rename":
            src = rng.choice(files)
            if rng.random() < 0.3 and len(files) > 1:
                dst = rng.choice([f for f in files if f != src])  # replaces a file
            else:
                dst = _join(rng.choice(dirs), self._name("r"))
            after[dst] = after.pop(src)
            return Op(f"rename {src} -> {dst}", after), \
                lambda root: os.rename(root / src, root / dst)
        if kind == "mkdir":
            return self._mkdir(_join(rng.choice(dirs), self._name("d")))
        if kind == "rmdir":
            empty = [d for d in dirs[1:] if not any(p != d and _under(p, d) for p in ref)]
            if not empty:
                return self.plan()
            return self._rmdir(rng.choice(empty))
        # movedir: a directory (with everything in it) to another parent
        src = rng.choice(dirs[1:])
        targets = [d for d in dirs if not _under(d, src)]
        dst = _join(rng.choice(targets), self._name("m"))
        after = {}
        for p, v in ref.items():
            after[dst + p[len(src):] if _under(p, src) else p] = v
        return Op(f"move directory {src} -> {dst}", after), \
            lambda root: os.rename(root / src, root / dst)

    def _create(self, path: str, kind: str = "create",
                data: bytes | None = None) -> tuple[Op, callable]:  # type: ignore[valid-type]
        data = self._data() if data is None else data
        empty = dict(self.ref, **{path: b""})
        return Op(f"{kind} {path} ({len(data)} bytes)", dict(self.ref, **{path: data}),
                  [empty]), lambda root: (root / path).write_bytes(data)

    def _delete(self, path: str) -> tuple[Op, callable]:  # type: ignore[valid-type]
        after = dict(self.ref)
        del after[path]
        return Op(f"delete {path}", after), lambda root: os.unlink(root / path)

    def _mkdir(self, path: str) -> tuple[Op, callable]:  # type: ignore[valid-type]
        return Op(f"mkdir {path}", dict(self.ref, **{path: None})), \
            lambda root: os.mkdir(root / path)

    def _rmdir(self, path: str) -> tuple[Op, callable]:  # type: ignore[valid-type]
        after = dict(self.ref)
        del after[path]
        return Op(f"rmdir {path}", after), lambda root: os.rmdir(root / path)

    def _pause(self, seconds: float) -> tuple[Op, callable]:  # type: ignore[valid-type]
        return Op(f"pause {seconds:.2f}s", dict(self.ref)), lambda root: time.sleep(seconds)

    def _start_flush(self) -> tuple[Op, callable]:  # type: ignore[valid-type]
        def flush(root: Path) -> None:
            self.flush()
        return Op("upload everything pending (not waiting)", dict(self.ref)), flush

    def _scratch(self, parent: str) -> tuple[Op, callable]:  # type: ignore[valid-type]
        """A scratch folder: made, filled, uploaded (`--status --wait` started, not waited
        for: its commits go out at once), then at once emptied and removed, one step per
        operation. Removing a folder while this machine's own commit into it is in
        flight once brought it back."""
        folder = _join(parent, self._name("s"))
        files = [_join(folder, self._name("t")) for _ in range(self.rng.randint(1, 3))]
        pause = self.rng.uniform(0.0, 0.3)
        self.queued += [lambda p=p: self._create(p, data=self.rng.randbytes(100))
                        for p in files]
        self.queued.append(self._start_flush)
        self.queued.append(lambda: self._pause(pause))
        self.queued += [lambda p=p: self._delete(p) for p in files]
        self.queued.append(lambda: self._rmdir(folder))
        return self._mkdir(folder)


def _join(d: str, n: str) -> str:
    return os.path.normpath(os.path.join(d, n))


def run_round(mount: Mount, workload: Workload, rng: random.Random, min_s: float,
              max_s: float, log: callable) -> tuple[Op | None, int]:  # type: ignore[valid-type]
    """Run operations until the mount is killed; returns the op in flight (None if the kill
    fell between two) and how many completed."""
    delay = rng.uniform(min_s, max_s)
    fired = threading.Event()
    assert mount.proc is not None
    pid = mount.proc.pid

    def kill() -> None:
        # Only the kill: the dead mount stays in place (every access fails with ENOTCONN)
        # until the workload noticed, so nothing can land in the folder underneath.
        fired.set()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    killer = threading.Timer(delay, kill)
    killer.start()
    done = 0
    try:
        while True:
            op, action = workload.plan()
            try:
                action(mount.path)
            except OSError as exc:
                if not fired.wait(5):
                    raise SoakFailure(f"{op.text} failed on a live mount: {exc}") from exc
                log(f"  killed after {delay:.2f}s, {done} ops done, during: {op.text} "
                    f"({exc.strerror})")
                return op, done
            # It returned: close() had returned, so it is promised, kill or no kill.
            workload.ref = op.after
            workload.history.append(op.text)
            done += 1
            if fired.is_set():
                log(f"  killed after {delay:.2f}s, {done} ops done, between operations")
                return None, done
    finally:
        killer.cancel()
        killer.join()
        mount.kill()
        workload.queued.clear()  # a scratch folder cut short: what is left of it stays


def describe(expected: Tree, actual: Tree) -> str:
    lines = [f"    ({len(expected)} paths expected, {len(actual)} found)"]
    for p in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(p, "absent"), actual.get(p, "absent")
        if e != a:
            def show(v: bytes | str | None) -> str:
                return v if isinstance(v, str) else "dir" if v is None else f"{len(v)} bytes"
            lines.append(f"    {p}: expected {show(e)}, found {show(a)}")
    return "\n".join(lines[:60])


def related(history: list[str], expected: Tree, actual: Tree) -> str:
    """The completed operations that mention a path that differs."""
    bad = {p for p in expected.keys() | actual.keys() if expected.get(p, 1) != actual.get(p, 1)}
    names = {part for p in bad for part in p.split("/")}
    hits = [f"    #{i}: {t}" for i, t in enumerate(history)
            if any(n in t.replace("/", " ").split() for n in names)]
    return "  operations on those names:\n" + "\n".join(hits[-40:])


def soak(storage: str, workdir: Path, *, rounds: int = 10, seed: int | None = None,
         endpoint_url: str | None = None, env: dict[str, str] | None = None,
         min_s: float = 0.3, max_s: float = 2.5, log: callable = print) -> dict:  # type: ignore[valid-type]
    """Run the soak; raises SoakFailure on the first mismatch. Returns a summary."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    log(f"soak: seed {seed}, {rounds} rounds, storage {storage}")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    home = workdir / "home"
    (home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    env.setdefault("XDG_RUNTIME_DIR", str(home / "run"))
    mount = Mount(workdir / "mnt", storage, workdir / "cache", env, endpoint_url)
    flushes: list[subprocess.Popen] = []

    def flush() -> None:
        flushes.append(subprocess.Popen(
            [sys.executable, "-m", "fsrepo.cli", "--status", str(mount.path), "--json",
             "--wait"], env=mount.env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))

    workload = Workload(rng, {}, flush)
    total_ops = ambiguous = 0
    try:
        mount.start()
        workload.ref = read_tree(mount.path)
        for n in range(1, rounds + 1):
            log(f"round {n}:")
            op, done = run_round(mount, workload, rng, min_s, max_s, log)
            total_ops += done
            for waiter in flushes:  # they end with the mount they waited for
                waiter.wait(timeout=60)
            flushes.clear()
            mount.start()  # replays the journal of the killed run
            # Let the replay settle first: a file whose close() never returned may show
            # for a moment (until the uploader finds its content gone and drops it).
            res = mount.cli("--status", str(mount.path), "--json", "--wait", timeout=600)
            if res.returncode != 0:
                raise SoakFailure(f"round {n}: waiting for the replay failed: {res.stderr}")
            try:
                actual = read_tree(mount.path)
            except OSError as exc:
                raise SoakFailure(f"round {n} (seed {seed}): reading the tree after remount "
                                  f"failed: {exc}") from exc
            candidates = [workload.ref] if op is None else [workload.ref, op.after, *op.maybe]
            if actual not in candidates:
                raise SoakFailure(f"round {n} (seed {seed}): the tree after remount is not "
                                  f"what was closed before the kill (in flight: "
                                  f"{op.text if op else 'nothing'}):\n"
                                  f"{describe(workload.ref, actual)}\n"
                                  f"{related(workload.history, workload.ref, actual)}")
            if op is not None and actual != workload.ref:
                ambiguous += 1
            workload.ref = actual
        res = mount.cli("--status", str(mount.path), "--json", "--wait", timeout=600)
        if res.returncode != 0:
            raise SoakFailure(f"waiting for uploads failed: {res.stderr}")
        mount.unmount()
        fresh = Mount(workdir / "mnt-fresh", storage, workdir / "cache-fresh", env,
                      endpoint_url)
        try:
            fresh.start()
            actual = read_tree(fresh.path)
            if actual != workload.ref:
                raise SoakFailure(f"(seed {seed}) from an empty cache, the bucket does not "
                                  f"hold what was closed:\n{describe(workload.ref, actual)}")
            fresh.unmount()
        finally:
            fresh.stop()
        text = mount.logtext()
        if "Traceback" in text:
            raise SoakFailure(f"(seed {seed}) the mount logged a traceback:\n"
                              + text[text.index("Traceback"):][:3000])
    finally:
        for waiter in flushes:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        mount.stop()
    files = sum(1 for v in workload.ref.values() if v is not None)
    summary = {"seed": seed, "rounds": rounds, "ops": total_ops, "files": files,
               "dirs": len(workload.ref) - files, "in_flight_landed": ambiguous}
    log(f"soak passed: {json.dumps(summary)}")
    return summary


def slow_manifest_writes(proxy: object, rng: random.Random, seconds: float,
                         count: int) -> None:
    """Each of the next `count` manifest writes through `proxy` waits a random
    0..`seconds` first (one single-use fault each: the proxy takes them in order)."""
    for _ in range(count):
        proxy.inject(method="PUT", path=r"/dirs/", delay=rng.uniform(0, seconds))  # type: ignore[attr-defined]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int)
    p.add_argument("--s3", action="store_true", help="use moto's S3 server (started here)")
    p.add_argument("--min", type=float, default=0.3, help="shortest time before a kill (s)")
    p.add_argument("--max", type=float, default=2.5, help="longest time before a kill (s)")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="with --s3: hold each manifest write for a random 0..SECONDS")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.jitter and not args.s3:
        p.error("--jitter needs --s3 (it is a proxy in front of the S3 server)")
    workdir = Path(tempfile.mkdtemp(prefix="imgrepo-soak-"))
    moto = proxy = None
    try:
        env = dict(os.environ)
        env.update({"HOME": str(workdir / "home"), "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"})
        endpoint = None
        storage = f"file://{workdir}/repository"
        if args.s3:
            sys.path.insert(0, str(REPO_ROOT))
            from testservers.moto import MotoServer

            moto = MotoServer(log_path=workdir / "moto.log")
            moto.start()
            moto.create_bucket("soak")
            storage, endpoint = "s3://soak/repo", moto.url
            if args.jitter:
                from testservers.s3proxy import S3Proxy

                proxy = S3Proxy(moto.url)
                proxy.start()
                slow_manifest_writes(proxy, random.Random(args.seed), args.jitter,
                                     count=600 * args.rounds)
                endpoint = proxy.url
        soak(storage, workdir, rounds=args.rounds, seed=args.seed, endpoint_url=endpoint,
             env=env, min_s=args.min, max_s=args.max)
        return 0
    except SoakFailure as exc:
        print(f"SOAK FAILED: {exc}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if proxy is not None:
            proxy.stop()
        if moto is not None:
            moto.stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
