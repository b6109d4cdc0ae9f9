"""A separate process driving the filesystem core (no FUSE), for multi-process tests.

    python tests/core_worker.py --storage URL [--endpoint-url URL] --cache DIR [--host NAME]
        write --dir DIR --names a,b,c | --prefix P --count N  [--label L] [--size N]
              [--upload during|after|never] [--go]
        drain

`write` adds files through FileManager (create/write/flush/release, as FUSE does); each
file's content is `content(label, name, size)`. It prints `ready` once the engine is open
(then, with --go, waits for a line on stdin before writing), `acked N` once N files are
closed (after each file with --each), and with --upload during/after (after another
line on stdin, with --go) waits until everything is in the bucket and prints
`idle {json}`. With --upload never it prints `acked N` and then waits to be killed.
`drain` only brings back the local state and uploads what the journal holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coreutil import makedirs, running_engine, start_uploader, write_file  # noqa: E402


def content(label: str, name: str, size: int = 0) -> bytes:
    """Deterministic file content; `size` 0 means a short text."""
    head = f"{label}:{name}\n".encode()
    if not size:
        return head
    seed = hashlib.sha256(head).digest()
    return (head + seed * (size // 32 + 1))[:size]


def say(text: str) -> None:
    print(text, flush=True)


async def main(args: argparse.Namespace) -> None:
    upload = args.cmd == "drain" or args.upload == "during"
    async with running_engine(args.storage, args.endpoint_url, Path(args.cache),
                              upload=upload, host=args.host) as eng:
        if args.cmd == "drain":
            say(f"ready {len(eng.journal)}")
            await eng.uploader.wait_idle()
            say("idle " + json.dumps({"conflicts": eng.uploader.status.conflicts}))
            return
        say("ready")
        if args.go:
            await trio.to_thread.run_sync(sys.stdin.readline)
        names = args.names.split(",") if args.names else \
            [f"{args.prefix}{i:04d}" for i in range(args.count)]
        parent = await makedirs(eng, args.dir)
        for i, name in enumerate(names, 1):
            await write_file(eng, name, content(args.label, name, args.size), parent=parent)
            if args.each:
                say(f"acked {i}")
        say(f"acked {len(names)}")
        if args.upload == "never":
            await trio.sleep_forever()
        if args.upload == "after":
            if args.go:
                await trio.to_thread.run_sync(sys.stdin.readline)
            start_uploader(eng)
        await eng.uploader.wait_idle()
        say("idle " + json.dumps({"conflicts": eng.uploader.status.conflicts}))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", required=True)
    p.add_argument("--endpoint-url")
    p.add_argument("--cache", required=True)
    p.add_argument("--host")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--dir", default="")
    w.add_argument("--names")
    w.add_argument("--prefix", default="f")
    w.add_argument("--count", type=int, default=1)
    w.add_argument("--label", default="w")
    w.add_argument("--size", type=int, default=0)
    w.add_argument("--upload", choices=["during", "after", "never"], default="during")
    w.add_argument("--go", action="store_true")
    w.add_argument("--each", action="store_true")
    sub.add_parser("drain")
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
