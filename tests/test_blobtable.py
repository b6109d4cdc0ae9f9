"""The compact tables verify and gc hold a million blobs and files in (issue 14)."""

from __future__ import annotations

import hashlib
import random

from fsrepo.maintenance.blobtable import BlobTable
from fsrepo.maintenance.filerefs import FileRefs


def shas(n: int) -> list[str]:
    return [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]


def test_a_blob_table_finds_every_blob_whatever_the_listing_order():
    names = shas(5000)
    for order in (sorted(names), random.Random(1).sample(names, len(names))):
        table = BlobTable()
        for sha in order:
            table.add(sha, int(sha[:6], 16), float(int(sha[6:10], 16)))
        table.seal()
        assert list(table) == sorted(names)
        for sha in names:
            index = table.find(sha)
            assert table.sha(index) == sha
            assert table.size(index) == int(sha[:6], 16)
            assert table.mtime(index) == float(int(sha[6:10], 16))
        assert table.total_bytes() == sum(int(s[:6], 16) for s in names)
    absent = hashlib.sha256(b"absent").hexdigest()
    assert table.find(absent) == -1 and absent not in table
    assert table.find("not hex") == -1 and table.find("ab") == -1


def test_file_refs_keep_each_files_blob_size_and_directory():
    refs = FileRefs()
    a, b = shas(2)
    refs.add("d1", a, 10)
    refs.add("d2", b, 20)
    refs.add("d2", a, 10)
    assert list(refs) == [("d1", a, 10), ("d2", b, 20), ("d2", a, 10)]
    assert refs.users(a, 5) == ["d1", "d2"]
    assert refs.users(a, 1) == ["d1"]
    assert refs.users(hashlib.sha256(b"x").hexdigest(), 5) == []
