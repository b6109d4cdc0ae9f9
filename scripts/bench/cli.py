"""The command line: options, checks of the machine, the environment the mounts run in,
and the run itself (server, data, rounds of every tool, report)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .data import Sizes, make_data, make_ls_fixtures
from .host import AWS_ENV, REPO, BenchError, say, tool_version
from .metrics import PHASES, SERVERLESS, TOOLS
from .report import report
from .server import Server
from .workloads import Bench


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench.sh",
        description="imgrepo side by side with rclone mount, s3fs and a local folder, against "
                    "one local S3 server (see README.md, 'Benchmark').")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated, from {','.join(TOOLS)} (default: all)")
    p.add_argument("--workloads", default=",".join(PHASES),
                   help=f"comma-separated, from {','.join(PHASES)} (default: all; 'reads' "
                        "reads what w1 and w2 wrote, each if chosen)")
    p.add_argument("--sqlite-commits", type=int,
                   help="single-row commits of W8 (default 1000)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and one round: a smoke run in well under a minute")
    p.add_argument("--rounds", type=int, help="rounds per tool (default 3; medians are kept)")
    p.add_argument("--files", type=int, help="small files for W1/W3/W4/W6 (default 1000)")
    p.add_argument("--file-kib", type=int, help="mean size of a small file (default 200)")
    p.add_argument("--big-mib", type=int, help="size of the W2 file (default 1024)")
    p.add_argument("--ls-entries", type=int, help="entries of the W5 directory (default 10000)")
    p.add_argument("--json", dest="json_out", type=Path,
                   help="write the results here (default bench-results/bench-<time>.json)")
    p.add_argument("--workdir", type=Path,
                   help="where to put data, caches and mounts (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample imgrepo's mount with py-spy during each phase, writing "
                        "collapsed stacks to DIR (slows imgrepo: not for the figures)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the server to one core and the rest to another")
    p.add_argument("--server", choices=["s3lite", "moto"], default="s3lite",
                   help="the S3 server: scripts/s3lite.py (default; ~10x less CPU per "
                        "request) or moto's server mode")
    p.add_argument("--rtt-ms", type=float, default=0.0, metavar="MS",
                   help="round-trip time the relay adds between every tool and the S3 "
                        "server, half each way (default 0: loopback)")
    p.add_argument("--rclone-arg", dest="rclone_args", action="append", default=[],
                   help="extra argument for rclone mount (repeatable)")
    p.add_argument("--s3fs-arg", dest="s3fs_args", action="append", default=[],
                   help="extra argument for s3fs (repeatable)")
    return p.parse_args(argv)


def check_environment(tools: list[str], imgrepo_cmd: Path) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (mounting, dropping the page cache)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing")
    need = {"rclone-writes": "rclone", "rclone-full": "rclone", "s3fs": "s3fs"}
    for tool in tools:
        binary = need.get(tool)
        if binary and not shutil.which(binary):
            raise BenchError(f"{binary} is not installed (scripts/bench.sh installs it)")
    if "imgrepo" in tools and not imgrepo_cmd.exists():
        raise BenchError(f"{imgrepo_cmd} is missing (scripts/bench.sh sets up .venv)")
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"{exc.name} is not installed in this Python "
                         "(run scripts/bench.sh, which uses the project's .venv)") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rtt_ms < 0:
        say("error: --rtt-ms must be 0 or more")
        return 2
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        say(f"error: unknown tool(s) {','.join(unknown) or '(none)'}; choose from "
            f"{','.join(TOOLS)}")
        return 2
    tools = [t for t in TOOLS if t in tools]
    phases = {w.strip() for w in args.workloads.split(",") if w.strip()}
    if not phases or phases - set(PHASES):
        say(f"error: unknown workload(s) {','.join(sorted(phases - set(PHASES))) or '(none)'};"
            f" choose from {','.join(PHASES)}")
        return 2
    if "reads" in phases and not {"w1", "w2"} & phases:
        say("error: the 'reads' workload reads what w1 and w2 wrote: select one of them too")
        return 2
    q = args.quick
    sizes = Sizes(files=args.files or (40 if q else 1000),
                  file_kib=args.file_kib or (64 if q else 200),
                  big_mib=args.big_mib or (32 if q else 1024),
                  ls_entries=args.ls_entries or (300 if q else 10000),
                  rounds=args.rounds or (1 if q else 3))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgrepo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    # The mounts' control sockets live in XDG_RUNTIME_DIR: keep it short (AF_UNIX paths are
    # limited to 107 bytes, and a deep --workdir would exceed that).
    run_dir = Path(tempfile.mkdtemp(prefix="ibench-"))
    os.environ.update({**AWS_ENV, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                       "XDG_CACHE_HOME": str(home / ".cache"),
                       "XDG_DATA_HOME": str(home / ".local/share"),
                       "XDG_RUNTIME_DIR": str(run_dir)})
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(REPO))
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2
    server_core = cores[0] if pin else -1
    if pin:
        os.sched_setaffinity(0, set(cores[1:]))  # mounts and workloads inherit this
    bench = Bench(sizes, tools, work, keep=args.keep, profile_dir=args.profile,
                  rclone_args=args.rclone_args, s3fs_args=args.s3fs_args, phases=phases,
                  sqlite_commits=args.sqlite_commits or (100 if q else 1000))
    started = time.perf_counter()
    interrupted = False
    try:
        check_environment(tools, bench.imgrepo_cmd)
        import moto
        config: dict[str, Any] = {
            "tools": tools,
            "sizes": vars(sizes),
            "quick": q,
            "server": ("scripts/s3lite.py (in memory)" if args.server == "s3lite" else
                       f"moto {moto.__version__} server mode (objects kept in memory, "
                       "range reads without copies, versionId=null accepted)"),
            "rtt_ms": args.rtt_ms,
            "workloads": sorted(phases),
            "pinning": (f"server and relay on core {server_core}, mounts and workloads on "
                        f"cores {','.join(map(str, cores[1:]))}") if pin else "none",
            "machine": f"{platform.machine()}, {len(cores)} cores, {platform.release()}",
            "imgrepo": _imgrepo_version(),
            "rclone": tool_version(["rclone", "version"]) if any(
                t.startswith("rclone") for t in tools) else None,
            "s3fs": tool_version(["s3fs", "--version"]) if "s3fs" in tools else None,
            "rclone_args": args.rclone_args,
            "s3fs_args": args.s3fs_args,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        say(f"tools {','.join(tools)}; {sizes.files} files of ~{sizes.file_kib} KiB, "
            f"{sizes.big_mib} MiB file, {sizes.ls_entries} entries, {sizes.rounds} round(s); "
            f"work folder {work}")
        if not all(t in SERVERLESS for t in tools):
            # What one client's round keeps in the server at most: the big file and two
            # copies of the small ones; touched once so every client finds it ready.
            warm = sizes.big_mib + 2 * sizes.files * sizes.file_kib // 1024 + 64
            bench.server = Server(work, server_core, args.server, warm_mib=warm,
                                  rtt_ms=args.rtt_ms)
            bench.server.start()
        bench.data = make_data(work, sizes)
        if "ls" in phases:
            bench.ls_made = make_ls_fixtures(bench.server, work, tools, sizes.ls_entries)
        for rnd in range(1, sizes.rounds + 1):
            for name in tools:
                say(f"round {rnd}/{sizes.rounds}: {name} "
                    f"(at {time.perf_counter() - started:.0f} s)")
                try:
                    bench.run_round(name, rnd)
                except BenchError as exc:
                    say(f"  {name}: {exc}")
                    bench.errors.setdefault(name, []).append(f"round {rnd}: {exc}")
                except (subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
                    say(f"  {name}: {type(exc).__name__}: {exc}")
                    bench.errors.setdefault(name, []).append(
                        f"round {rnd}: {type(exc).__name__}: {exc}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
        result = report(bench, config, time.perf_counter() - started)
        out = args.json_out or REPO / "bench-results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        say(f"results written to {out}")
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted")
    finally:
        bench.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if bench.errors else 0


def _imgrepo_version() -> str:
    try:
        from fsrepo import __version__
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        return f"{__version__} ({commit})" if commit else __version__
    except ImportError:
        return "unknown"
