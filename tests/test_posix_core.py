"""POSIX details decided in the core (no FUSE): over-long names, oversized sizes, the
cache's count of a sparse blob. tests/test_mount_posix.py checks them through a mount."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import trio

from fsrepo.errors import FsError
from fsrepo.inodes import ROOT_INO

from .coreutil import EngineDriver, running_engine


def _url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'repository'}"


def test_a_lookup_of_a_name_over_255_bytes_is_enametoolong(tmp_path):
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "c") as eng:
            for name in (b"x" * 256, "é".encode() * 128):
                with pytest.raises(FsError) as exc:
                    await eng.ns.lookup(ROOT_INO, name)
                assert exc.value.errno == errno.ENAMETOOLONG
            with pytest.raises(FsError) as exc:
                await eng.ns.lookup(ROOT_INO, b"y" * 255)
            assert exc.value.errno == errno.ENOENT
    trio.run(main)


def test_an_oversized_truncate_is_efbig_logged_at_info_and_leaves_the_file(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "c") as eng:
            fs = EngineDriver(eng)
            await fs.create("f", b"keep")
            node, _ = await fs.node("f")
            for size in (1 << 60, (1 << 50) + 1):
                with pytest.raises(FsError) as exc:
                    await fs.truncate("f", size)
                assert exc.value.errno == errno.EFBIG
            assert not eng.files.is_editing(node.ino)  # no staging copy left behind
            assert await fs.read("f") == b"keep"
    trio.run(main)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(r.levelno == logging.INFO for r in refused)


def test_a_sparse_blob_counts_the_blocks_it_uses(tmp_path):
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "c") as eng:
            fs = EngineDriver(eng)
            before = eng.cache.used
            await fs.create("sparse")
            await fs.truncate("sparse", 64 << 20)
            await fs.write_at("sparse", 0, b"x" * 4096)
            await fs.create("dense", b"y" * 10_000)
            await eng.files.name_closed()  # (in the cache once named)
            used = eng.cache.used - before
            assert 4096 + 10_000 <= used <= 4096 + 10_000 + (1 << 20)
    trio.run(main)
