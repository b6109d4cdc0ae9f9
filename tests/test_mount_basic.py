"""Smoke tests of the real mount on both backends: the everyday file operations."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest


def test_write_read_back_after_remount_with_empty_cache(storage, mounter, tmp_path: Path):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path
    (root / "a.txt").write_bytes(b"hello")
    (root / "photos" / "2024").mkdir(parents=True)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (root / "photos" / "2024" / "big.bin").write_bytes(payload)
    os.symlink("photos/2024/big.bin", root / "link")
    assert sorted(os.listdir(root)) == ["a.txt", "link", "photos"]
    m.unmount()

    m2 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "fresh")
    assert (m2.path / "a.txt").read_bytes() == b"hello"
    assert (m2.path / "photos" / "2024" / "big.bin").read_bytes() == payload
    assert os.readlink(m2.path / "link") == "photos/2024/big.bin"
    assert (m2.path / "link").read_bytes() == payload
    assert not m.unexpected_log_lines() and not m2.unexpected_log_lines(), m.logtext()


def test_unsupported_operations_answer_clear_errno(tmp_path: Path, mounter):
    m = mounter(f"file://{tmp_path}/repo")
    (m.path / "f").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.link(m.path / "f", m.path / "g")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        os.mkfifo(m.path / "fifo")
    assert exc.value.errno == errno.EPERM
