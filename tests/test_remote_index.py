"""The dedup trust index holds what this process did, not what it read: blobs manifests
named go at the idle release, and a confirmation once it is too old to decide anything."""

from __future__ import annotations

from fsrepo.remote_index import TRUST_REMOTE, RemoteIndex


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sha(n: int) -> str:
    return f"{n:064x}"


def test_confirmations_older_than_the_trust_period_are_let_go():
    clock = Clock()
    index = RemoteIndex(clock)
    for n in range(1000):
        index.seen_in_bucket(sha(n))
    clock.now += TRUST_REMOTE / 2
    index.seen_in_bucket(sha(5))  # seen again: its newer confirmation counts
    assert len(index.confirmed) == 1000
    clock.now += TRUST_REMOTE / 2
    index.seen_in_bucket(sha(2000))
    assert set(index.confirmed) == {sha(5), sha(2000)}
    # what is let go was untrusted already: a re-use is checked (one HEAD), not uploaded
    assert index.reuse_or_recheck(sha(5)) and index.reuse_or_recheck(sha(2000))
    assert not index.reuse_or_recheck(sha(7)) and sha(7) in index.unconfirmed
    assert index.needs_upload(sha(7)) and not index.needs_upload(sha(5))
    assert index.known(sha(7))  # uploaded by this machine: still known to be there


def test_blobs_named_by_manifests_are_forgotten_at_the_idle_release():
    clock = Clock()
    index = RemoteIndex(clock)
    index.note_known({sha(1), sha(2)})
    index.seen_in_bucket(sha(3))
    assert index.known(sha(1)) and not index.needs_upload(sha(1))
    index.forget_noted()
    assert not index.known(sha(1)) and index.needs_upload(sha(1))  # it costs a HEAD
    assert index.known(sha(3)) and index.reuse_or_recheck(sha(3))  # what it did stays
    index.note_known({sha(1)})
    assert index.known(sha(1))


def test_a_start_loads_only_the_uploaded_blobs_pending_changes_need(tmp_path):
    """A machine that sent a million photos does not load a million ids at every start:
    of what it uploaded in earlier runs, only what its pending changes name is known."""
    import hashlib

    import trio

    from .coreutil import running_engine, write_file

    url = "file://" + str(tmp_path / "repo")
    a, b = b"uploaded before the restart", b"not uploaded yet"
    old = hashlib.sha256(b"sent long ago").hexdigest()
    sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            await write_file(eng, "a.jpg", a)
            await write_file(eng, "b.jpg", b)
            await eng.db.run(eng.db.state.mark_uploaded, [sha_a, old])
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            index = eng.remote_index
            assert index.known(sha_a) and not index.needs_upload(sha_a)
            assert index.needs_upload(sha_b)
            assert not index.known(old)  # re-used content is checked with a HEAD anyway
            assert set(eng.uploader.schedule.pending_blobs()) == {sha_b}
    trio.run(main)
