"""A failure at each step of the upload and commit pipeline, injected in process.

The steps: HEAD (is the blob there?), put_file (the blob upload), the manifest GET (after a
lost conditional write) and the manifest PUT. At each, `FaultyStore` (tests/faulty_store.py)
makes exactly one call fail: the storage does not answer (before or after the request took
effect), a conditional write is lost, or the process crashes there. Then:

- nothing is lost: the journal drains (after the uploader's retries, or in the next run
  from the same local state), and a fresh engine with an empty cache reads every file back,
  byte for byte, with no extra names;
- no blob is sent twice: across both runs, each blob key gets at most one put_file that
  reached the storage, even when the crash came right after it landed.

Requests that reached the storage are counted by a CountingStore under the fault layer.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest
import trio

from fsrepo.repository import blob_key
from fsrepo.store import Store
from fsrepo.store.counting import PUT_FILE, PUT_FILE_CREATED, PUT_FILE_EXISTED, CountingStore

from .coreutil import EngineDriver, running_engine, start_uploader, tree
from .faulty_store import (
    AFTER,
    BEFORE,
    CRASH,
    PRECONDITION,
    UNAVAILABLE,
    Fault,
    FaultyStore,
)
from .targets import StorageTarget

_A, _B, _C = os.urandom(70_000), os.urandom(3_000), b"small text\n"
FILES: dict[bytes, bytes] = {
    b"d/a.jpg": _A, b"d/b.jpg": _B, b"d/copy-of-a.jpg": _A, b"d/sub/c.txt": _C,
    b"top.txt": _B + b"!",
}
DIRS = (b"d", b"d/sub")
BLOBS = {blob_key(hashlib.sha256(v).hexdigest()) for v in FILES.values()}

RETRY_WARNING = r"failed \(will retry\)"


def expected_tree() -> dict[bytes, bytes | None]:
    return {**FILES, **{d: None for d in DIRS}}


class Run:
    """One engine run on a cache dir, its store wrapped as counting under faulty."""

    def __init__(self, storage: StorageTarget, cache: Path) -> None:
        self.storage, self.cache = storage, cache
        self.counting: CountingStore | None = None
        self.faulty: FaultyStore | None = None
        self.scope = trio.CancelScope()

    def _wrap(self, inner: Store) -> Store:
        self.counting = CountingStore(inner, by_key=True)
        self.faulty = FaultyStore(self.counting, on_crash=self.scope.cancel)
        return self.faulty

    def engine(self, **kw: object):  # noqa: ANN201 - an async context manager
        return running_engine(self.storage.url, self.storage.endpoint_url, self.cache,
                              wrap_store=self._wrap, **kw)

    def blob_sends(self, kinds: tuple[str, ...] = (PUT_FILE, PUT_FILE_CREATED,
                                                   PUT_FILE_EXISTED)) -> Counter[str]:
        """put_file calls that reached the storage, per key (by default also those that
        raised, the crash's cancellation included: they may have sent the blob)."""
        assert self.counting is not None
        out: Counter[str] = Counter()
        for (kind, key), n in self.counting.snapshot().by_key.items():
            if kind in kinds:
                out[key] += n
        return out


async def write_everything(fs: EngineDriver) -> None:
    for d in DIRS:
        await fs.mkdir(d)
    for path, data in FILES.items():
        await fs.create(path, data)


async def read_back_with_an_empty_cache(storage: StorageTarget, cache: Path) -> None:
    async with running_engine(storage.url, storage.endpoint_url, cache) as fresh:
        assert await tree(fresh) == expected_tree()


# (the step's faults, as data so that the test ids say what fails)
STEPS: dict[str, list[tuple[str, str, str]]] = {
    # kind, effect, when; the manifest GET happens after a lost conditional write
    "head": [("head", UNAVAILABLE, BEFORE)],
    "put_file": [("put_file", UNAVAILABLE, BEFORE)],
    "put_file-landed": [("put_file", UNAVAILABLE, AFTER)],
    "manifest-get": [("put", PRECONDITION, BEFORE), ("get", UNAVAILABLE, BEFORE)],
    "manifest-put": [("put", UNAVAILABLE, BEFORE)],
    "manifest-put-landed": [("put", UNAVAILABLE, AFTER)],
    "manifest-put-lost-race": [("put", PRECONDITION, BEFORE)],
}
CRASHES: dict[str, tuple[str, str]] = {
    "head": ("head", BEFORE),
    "put_file": ("put_file", BEFORE),
    "put_file-landed": ("put_file", AFTER),
    "manifest-get": ("get", BEFORE),
    "manifest-put": ("put", BEFORE),
    "manifest-put-landed": ("put", AFTER),
}


def _fault(kind: str, effect: str, when: str, nth: int = 1) -> Fault:
    prefix = "blobs/" if kind in ("head", "put_file") else "dirs/"
    return Fault(kind, nth=nth, effect=effect, when=when, prefix=prefix)


def _cases(steps: list[str]) -> list[tuple[str, int]]:
    """Each step failing at its first call, and (where a run makes several) its second."""
    return [(step, nth) for step in steps for nth in (1, 2)
            if nth == 1 or not step.startswith("manifest-get")]


@pytest.mark.expected_logs(RETRY_WARNING, reason="each injected failure is logged once by "
                           "the uploader, which then retries")
@pytest.mark.parametrize(("step", "nth"), _cases(list(STEPS)))
def test_a_failed_request_at_each_step_is_retried_and_nothing_is_lost(
        storage: StorageTarget, tmp_path: Path, step: str, nth: int) -> None:
    run = Run(storage, tmp_path / "cache")

    async def main() -> None:
        async with run.engine(upload=False) as eng:
            fs = EngineDriver(eng)
            await write_everything(fs)
            assert run.faulty is not None
            faults = [_fault(*spec, nth=nth if i == len(STEPS[step]) - 1 else 1)
                      for i, spec in enumerate(STEPS[step])]
            run.faulty.arm(*faults)
            start_uploader(eng)
            with trio.fail_after(60):
                await fs.drain()
            assert all(f.fired == 1 for f in faults), [(f.kind, f.seen) for f in faults]
            assert fs.journal_length() == 0
        sends = run.blob_sends()
        assert set(sends) == BLOBS and max(sends.values()) == 1, sends
        await read_back_with_an_empty_cache(storage, tmp_path / "fresh")
    trio.run(main)


@pytest.mark.expected_logs(RETRY_WARNING, reason="the lost conditional write before a "
                           "manifest GET is logged by the uploader, which retries")
@pytest.mark.parametrize(("step", "nth"), _cases(list(CRASHES)))
def test_a_crash_at_each_step_loses_nothing_and_sends_no_blob_twice(
        storage: StorageTarget, tmp_path: Path, step: str, nth: int) -> None:
    kind, when = CRASHES[step]
    first = Run(storage, tmp_path / "cache")

    async def main() -> None:
        with first.scope:
            async with first.engine(upload=False) as eng:
                fs = EngineDriver(eng)
                await write_everything(fs)
                assert first.faulty is not None
                if kind == "get":  # the manifest GET follows a lost conditional write
                    first.faulty.arm(_fault("put", PRECONDITION, BEFORE))
                first.faulty.arm(_fault(kind, CRASH, when, nth=nth))
                start_uploader(eng)
                with trio.fail_after(60):
                    await fs.drain()
                raise AssertionError(f"drained without reaching the crash: {step}")
        assert first.faulty is not None and first.faulty.crashed
        second = Run(storage, tmp_path / "cache")
        async with second.engine() as eng:
            fs = EngineDriver(eng)
            with trio.fail_after(60):
                await fs.drain()
            assert fs.journal_length() == 0
        # A blob whose upload had landed before the crash (its put_file returned) is not
        # sent again; one cut off by the crash may be.
        landed = first.blob_sends((PUT_FILE_CREATED, PUT_FILE_EXISTED))
        again = second.blob_sends()
        assert not set(landed) & set(again), (landed, again)
        assert set(landed + again) <= BLOBS
        await read_back_with_an_empty_cache(storage, tmp_path / "fresh")
    trio.run(main)
