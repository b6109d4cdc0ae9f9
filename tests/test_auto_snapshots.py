"""Automatic snapshots: the policy's parsing and retention with a simulated clock, one
snapshot per period across machines, expiry of what the policy no longer keeps."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest
import trio

from fsrepo.auto_snapshots import AutoSnapshots
from fsrepo.config import load_settings
from fsrepo.errors import ConfigError
from fsrepo.snapshot_policy import (
    DEFAULT_POLICY,
    auto_name,
    auto_time,
    kept,
    parse_policy,
    period_start,
)

from .coreutil import EngineDriver, running_engine
from .targets import StorageTarget


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0)))


def test_policy_parsing_and_names() -> None:
    policy = parse_policy(DEFAULT_POLICY)
    assert policy is not None and str(policy) == DEFAULT_POLICY and policy.finest == "hourly"
    assert parse_policy("off") is None
    assert str(parse_policy("monthly=3, daily=7")) == "daily=7,monthly=3"
    assert str(parse_policy("hourly=2+daily=3")) == "hourly=2,daily=3"  # the -o spelling
    for bad in ("hourly", "hourly=0", "minutely=5", "hourly=2,hourly=3", "daily=x"):
        with pytest.raises(ConfigError, match="bad automatic snapshot policy"):
            parse_policy(bad)
    assert auto_name(policy, at(2026, 12, 5, 14, 37)) == "auto-2026-12-05T1400Z"
    assert auto_name(parse_policy("daily=3"), at(2026, 12, 5, 14, 37)) == \
        "auto-2026-12-05T0000Z"  # type: ignore[arg-type]
    assert auto_time("auto-2026-12-05T1400Z") == at(2026, 12, 5, 14)
    assert auto_time("before-cleanup") is None and auto_time("auto-2026-13-40T9900Z") is None
    assert period_start("weekly", at(2026, 12, 5, 14)) == at(2026, 11, 30)  # a Monday
    assert period_start("monthly", at(2026, 12, 5, 14)) == at(2026, 12, 1)


def test_a_bad_policy_is_one_line_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad automatic snapshot policy"):
        load_settings({"auto_snapshots": "hourly=lots"}, config_file=tmp_path / "none.toml")


def test_retention_keeps_the_newest_of_each_period() -> None:
    policy = parse_policy("hourly=3,daily=2,monthly=2")
    assert policy is not None
    # every hour for three days, then one in an earlier month
    names = [auto_name(policy, at(2026, 12, d, h)) for d in (3, 4, 5) for h in range(24)]
    names.append("auto-2026-10-20T0500Z")
    names.append("before-cleanup")  # manual: never expires, never counted
    keep = kept(policy, names)
    assert keep == {
        "auto-2026-12-05T2300Z", "auto-2026-12-05T2200Z", "auto-2026-12-05T2100Z",  # hourly
        "auto-2026-12-04T2300Z",  # daily: the newest of Dec 4 (Dec 5's is kept already)
        "auto-2026-10-20T0500Z",  # monthly: the newest of October (December's: kept)
    }


def test_expiry_follows_the_policy_with_a_simulated_clock(storage: StorageTarget,
                                                          tmp_path: Path) -> None:
    policy = parse_policy("hourly=2,daily=2")
    assert policy is not None
    now = [at(2026, 12, 4, 22, 10)]

    async def main() -> None:
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "a") as eng:
            await EngineDriver(eng).create("f", b"1")
            await eng.uploader.wait_idle()
            auto = AutoSnapshots(eng.snapshots, eng.take_snapshot, policy, lambda: True,
                                 clock=lambda: now[0])
            taken = []
            fs = EngineDriver(eng)
            for i, minutes in enumerate((0, 20, 60, 60, 60, 60)):  # 22:10 22:30 23:30 ...
                now[0] += minutes * 60
                await fs.create(f"g{i}", b"a change each time")
                await eng.uploader.wait_idle()
                name = await auto.tick()
                if name:
                    taken.append(name)
            assert taken == ["auto-2026-12-04T2200Z", "auto-2026-12-04T2300Z",
                             "auto-2026-12-05T0000Z", "auto-2026-12-05T0100Z",
                             "auto-2026-12-05T0200Z"]
            left = [s.name for s in await eng.snapshots.names()]
            # hourly=2: 02:00 and 01:00; daily=2: Dec 5's newest (02:00), Dec 4's (23:00)
            assert sorted(left) == ["auto-2026-12-04T2300Z", "auto-2026-12-05T0100Z",
                                    "auto-2026-12-05T0200Z"]
            assert sorted(auto.expired) == ["auto-2026-12-04T2200Z", "auto-2026-12-05T0000Z"]

    trio.run(main)


def test_two_machines_at_the_same_period_produce_one(storage: StorageTarget,
                                                     tmp_path: Path) -> None:
    policy = parse_policy("hourly=24")
    assert policy is not None
    now = at(2026, 12, 5, 14, 1)

    async def main() -> None:
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "a",
                                  host="one") as one, \
                running_engine(storage.url, storage.endpoint_url, tmp_path / "b",
                               host="two") as two:
            await EngineDriver(one).create("f", b"1")
            await one.uploader.wait_idle()
            autos = [AutoSnapshots(e.snapshots, e.take_snapshot, policy, lambda: True,
                                   clock=lambda: now) for e in (one, two)]
            results: list[str | None] = []

            async def tick(auto: AutoSnapshots) -> None:
                results.append(await auto.tick())

            async with trio.open_nursery() as nursery:  # at the same moment
                for auto in autos:
                    nursery.start_soon(tick, auto)
            assert sorted(results, key=str) == [None, "auto-2026-12-05T1400Z"]
            assert [await a.tick() for a in autos] == [None, None]  # later in that hour
            names = [s.name for s in await one.snapshots.names()]
            assert names == ["auto-2026-12-05T1400Z"]
            snap = await two.snapshots.load(names[0])
            assert snap.period == "hourly"

    trio.run(main)


def test_a_period_without_changes_gets_no_snapshot(tmp_path: Path) -> None:
    policy = parse_policy("hourly=24")
    assert policy is not None
    now = [at(2026, 12, 5, 14, 1)]

    async def main() -> None:
        async with running_engine(f"file://{tmp_path}/repo", None, tmp_path / "a") as eng:
            await EngineDriver(eng).create("f", b"1")
            await eng.uploader.wait_idle()
            auto = AutoSnapshots(eng.snapshots, eng.take_snapshot, policy, lambda: True,
                                 clock=lambda: now[0])
            assert await auto.tick() == "auto-2026-12-05T1400Z"
            now[0] += 3600
            assert await auto.tick() is None  # 15:00: nothing changed
            await EngineDriver(eng).create("g", b"2")
            await eng.uploader.wait_idle()
            now[0] += 3600
            assert await auto.tick() == "auto-2026-12-05T1600Z"
            names = [s.name for s in await eng.snapshots.names()]
            assert names == ["auto-2026-12-05T1400Z", "auto-2026-12-05T1600Z"]

    trio.run(main)
