"""Knowing the server, in process: the conditional-write probe, the writer
lease, repository creation without conditional writes, and --salvage's file selection.

A store that ignores conditions is a `LocalStore` behind `IgnoringStore`; over HTTP it is
moto behind `S3Proxy(strip_conditions=True)`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from fsrepo.config import Settings
from fsrepo.errors import ImgrepoError
from fsrepo.lease import LEASE_KEY, Lease, LeaseHeld, WriterLease, read_lease, refuse_while_leased
from fsrepo.repository import open_repository
from fsrepo.serverprobe import PROBE_PREFIX, probe_conditional_writes, server_honours_conditions
from fsrepo.store import open_store
from fsrepo.store.base import Store
from fsrepo.store.local import LocalStore
from testservers.s3proxy import S3Proxy


class IgnoringStore(LocalStore):
    """A folder store that, like s3rver, accepts If-Match/If-None-Match and ignores them."""

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        return await super().put(key, data)


async def _keys(store: Store, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


@pytest.mark.expected_logs(r"ignores If-(None-)?Match on PUT", reason="the store ignores conditions on purpose")
@pytest.mark.parametrize("ignoring", [False, True])
def test_probe_tells_conditional_from_ignoring_store(tmp_path: Path, ignoring: bool) -> None:
    store = (IgnoringStore if ignoring else LocalStore)(tmp_path / "repo")

    async def main() -> None:
        result = await probe_conditional_writes(store)
        assert result.conditional is (not ignoring)
        assert result.ignored == ("If-None-Match" if ignoring else None)
        assert result.requests == 4
        assert await _keys(store, PROBE_PREFIX) == []  # cleaned up

    trio.run(main)


@pytest.mark.expected_logs(r"ignores If-(None-)?Match on PUT", reason="the proxy strips conditions on purpose")
@pytest.mark.parametrize("strip", [False, True])
def test_probe_over_http_counts_requests_and_is_remembered(s3_bucket, tmp_path: Path,
                                                            strip: bool) -> None:
    with S3Proxy(s3_bucket.endpoint_url, strip_conditions=strip) as proxy:
        settings = Settings(storage=s3_bucket.url, endpoint_url=proxy.url,
                            cache_root=tmp_path / "cache")
        store = open_store(s3_bucket.url, endpoint_url=proxy.url)

        async def main() -> None:
            first = await server_honours_conditions(store, settings)
            assert first.conditional is (not strip)
            assert first.requests == 4
            again = await server_honours_conditions(store, settings)
            assert (again.conditional, again.requests) == (first.conditional, 0)
            assert await _keys(store, PROBE_PREFIX) == []
            await store.aclose()

        trio.run(main)
        assert proxy.count() == 5  # 3 PUTs + 1 DELETE, then one listing by the test
        assert proxy.count("PUT", path="/probe/") == 3
    remembered = json.loads((tmp_path / "cache" / "servers.json").read_text())
    assert [row["conditional"] for row in remembered.values()] == [not strip]


@pytest.mark.expected_logs(r"the writer lease of .* was taken by", reason="the lease is taken away on purpose")
def test_lease_race_has_one_winner_and_a_taken_lease_is_noticed(tmp_path: Path) -> None:
    store = IgnoringStore(tmp_path / "repo")

    async def main() -> None:
        leases = [WriterLease(store, f"host{i}", settle=0.3) for i in range(2)]
        outcomes: list[object] = [None, None]

        async def take(i: int) -> None:
            try:
                await leases[i].acquire("no conditional writes")
                outcomes[i] = "won"
            except LeaseHeld as exc:
                outcomes[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(take, i)
        assert sorted(map(str, outcomes)).count("won") == 1, outcomes
        winner = leases[outcomes.index("won")]
        loser_error = next(o for o in outcomes if isinstance(o, LeaseHeld))
        assert winner.host in str(loser_error) and "no conditional writes" in str(loser_error)
        assert (await read_lease(store)).mount_id == winner.mount_id
        # The winner's lease is overwritten behind its back (it was suspended, say).
        thief = Lease("elsewhere", 1, "thief", 0.0, 2e9)
        await store.put(LEASE_KEY, thief.encode())
        await winner.renew("no conditional writes")
        assert winner.lost == thief and not winner.held
        await winner.release()
        assert (await read_lease(store)) == thief  # never deletes another's lease

    trio.run(main)


def test_lease_is_released_and_a_dead_local_holder_does_not_block(tmp_path: Path) -> None:
    store = IgnoringStore(tmp_path / "repo")

    async def main() -> None:
        first = WriterLease(store, "laptop", settle=0.05)
        await first.acquire("why")
        with pytest.raises(LeaseHeld, match="laptop"):
            await WriterLease(store, "desktop", settle=0.05).acquire("why")
        await first.release()
        assert await read_lease(store) is None
        second = WriterLease(store, "desktop", settle=0.05)
        await second.acquire("why")
        await second.release()
        # A lease left by a process of this host that is gone (kill -9) is stale at once.
        here = socket.gethostname()
        await store.put(LEASE_KEY, Lease(here, 2**22 + 12345, "dead", 0.0, 2e9).encode())
        await WriterLease(store, here, settle=0.05).acquire("why")

    trio.run(main)


def test_gc_refuses_while_another_machines_lease_is_live(tmp_path: Path) -> None:
    store = IgnoringStore(tmp_path / "repo")

    async def main() -> None:
        await refuse_while_leased(store, "here")  # no lease: fine
        await store.put(LEASE_KEY, Lease("here", 1, "m", 0.0, 2e9).encode())
        await refuse_while_leased(store, "here")  # this machine's own mount: as before
        await store.put(LEASE_KEY, Lease("desktop", 1, "m", 0.0, 2e9).encode())
        with pytest.raises(ImgrepoError, match="gc refused.*desktop"):
            await refuse_while_leased(store, "here")
        await store.put(LEASE_KEY, Lease("desktop", 1, "m", 0.0, 1.0).encode())
        await refuse_while_leased(store, "here")  # expired

    trio.run(main)


def test_two_creations_at_once_without_conditions_make_one_repository(tmp_path: Path) -> None:
    store = IgnoringStore(tmp_path / "repo")

    async def main() -> None:
        ids: list[str] = []

        async def create() -> None:
            ids.append((await open_repository(store, create=True, settle=0.3)).repo_id)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(create)
        assert len(set(ids)) == 1, ids

    trio.run(main)
