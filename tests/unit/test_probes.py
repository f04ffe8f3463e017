"""HealthChecker's loop bookkeeping, with a fake probe in place of the network."""

from __future__ import annotations

import asyncio
import contextlib
import time

from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.balancing.probes import HealthChecker, _cancel_and_wait
from postmux.config import PoolSettings
from tests.support import wait_until


def make_pool(interval_s: float = 0.02) -> Pool:
    settings = PoolSettings.model_validate(
        {
            "name": "default",
            "members": [{"name": "a", "address": "127.0.0.1:1"}],
            "check": {"enabled": True, "interval": interval_s, "timeout": 1, "rise": 1, "fall": 1},
        }
    )
    return Pool(settings)


class StubbornChecker(HealthChecker):
    """Probes that lose the first cancel they get, as aiosmtplib's probes can on Python 3.11."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool, "probe.test", clock=lambda: 1000.0)
        self.probes = 0
        self.probing = False
        self.swallowed = 0

    async def check_once(self, member: Member) -> tuple[bool, str]:
        self.probes += 1
        self.probing = True
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
        finally:
            self.probing = False
        return False, "fake failure"


async def test_cancel_and_wait_cancels_again_when_a_cancel_is_lost() -> None:
    async def loses_one_cancel() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await asyncio.sleep(10)

    task = asyncio.create_task(loses_one_cancel())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await _cancel_and_wait({task}, 2.0) == set()
    assert task.cancelled()
    assert time.monotonic() - started < 1.0


async def test_cancel_and_wait_gives_up_after_its_time() -> None:
    deaf = True

    async def deaf_to_cancels() -> None:
        while deaf:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(deaf_to_cancels())
    await asyncio.sleep(0)
    assert await _cancel_and_wait({task}, 0.15) == {task}
    deaf = False  # let the test's loop close cleanly
    task.cancel()
    await asyncio.wait({task})


async def test_a_loop_that_lost_its_cancel_stops_and_records_nothing_more() -> None:
    pool = make_pool()
    member = pool.members[0]
    checker = StubbornChecker(pool)
    await checker.start()
    await wait_until(lambda: checker.probes >= 2 and checker.probing, timeout=3)
    assert not member.check_up  # fall = 1: the fake failures reached the pool

    await checker.stop()
    assert checker.swallowed == 1  # the stop's first cancel was lost inside the probe
    streak, probes = member.check_streak, checker.probes
    await asyncio.sleep(0.1)
    assert (member.check_streak, checker.probes) == (streak, probes)


async def test_sync_after_stop_starts_nothing() -> None:
    pool = make_pool()
    checker = StubbornChecker(pool)
    await checker.start()
    await checker.stop()
    checker.sync()
    await asyncio.sleep(0.1)
    probes = checker.probes
    await asyncio.sleep(0.1)
    assert checker.probes == probes
