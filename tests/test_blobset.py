"""The compact set of blob ids (fsrepo.blobset) answers exactly as a plain set of hex
strings would, at a fraction of the memory."""

from __future__ import annotations

import hashlib
import random
import sys

from fsrepo.blobset import BlobSet


def sha(i: int) -> str:
    return hashlib.sha256(b"%d" % i).hexdigest()


def test_it_agrees_with_a_plain_set():
    rng = random.Random(14)
    ours, plain = BlobSet(), set()
    pool = [sha(i) for i in range(30_000)]
    for _ in range(25_000):  # many ids added twice
        s = rng.choice(pool)
        ours.add(s)
        plain.add(s)
    # ids sharing a 2-byte prefix with stored ones, and one that only matches misaligned
    near = [s[:4] + "0" * 60 for s in pool[:50]]
    ours.update(near)
    plain.update(near)
    assert len(ours) == len(plain)
    for s in pool + near + [sha(-1), "f" * 64]:
        assert (s in ours) == (s in plain), s
    stored = next(iter(plain))
    shifted = stored[2:] + "00"  # a digest's tail + the next one's head
    assert (shifted in ours) == (shifted in plain)
    assert "not hex" not in ours and "ab" not in ours and 5 not in ours


def test_a_bad_id_is_refused_with_a_clear_error():
    ours = BlobSet()
    for bad in ("ab", "zz" * 32):
        try:
            ours.add(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_it_holds_an_id_in_far_fewer_bytes_than_a_set_of_hex_strings():
    ids = [sha(i) for i in range(300_000)]
    ours = BlobSet(ids)
    plain = set(ids)
    loose = sys.getsizeof(plain) + sum(sys.getsizeof(s) for s in plain)
    assert len(ours) == len(plain)
    assert ours.footprint() < loose / 2, (ours.footprint() / len(ids), loose / len(ids))


def test_a_batch_with_a_bad_id_adds_nothing():
    ours = BlobSet()
    try:
        ours.update([sha(1), "ab" * 31 + " ab", sha(2)])
    except ValueError:
        pass
    else:
        raise AssertionError("accepted")
    assert len(ours) == 0 and sha(1) not in ours
