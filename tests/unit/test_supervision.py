"""The Supervisor's two policies, with loops that fail on purpose (pure logic: no clock but its own)."""

from __future__ import annotations

import asyncio

import pytest

import postmux.supervision as supervision
from postmux.supervision import Supervisor


class Failing:
    """A loop that raises `times` times, then waits for ever (as a healthy loop does)."""

    def __init__(self, times: int) -> None:
        self.runs, self.times = 0, times

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.times:
            raise RuntimeError(f"defect {self.runs}")
        await asyncio.Event().wait()


async def test_an_essential_loop_that_keeps_crashing_stops_the_node() -> None:
    fatal: list[str] = []
    supervisor = Supervisor(fatal.append, pause_s=0.0, max_crashes=3, window_s=60.0)
    loop = Failing(times=10)
    await asyncio.wait_for(supervisor.start("dispatch", loop), 5)  # it returns after calling on_fatal
    assert loop.runs == 3 and supervisor.crashes == {"dispatch": 3}
    assert fatal == ["the dispatch loop crashed 3 times within 60 s"]


async def test_a_loop_the_mail_does_not_need_is_restarted_less_often_and_never_stops_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervision, "SLOW_PAUSE_S", 0.05)
    fatal: list[str] = []
    supervisor = Supervisor(fatal.append, pause_s=0.0, max_crashes=3, window_s=60.0)
    loop = Failing(times=6)
    task = supervisor.start("webhook-ops", loop, essential=False)
    try:
        for _ in range(200):
            if loop.runs == 7:
                break
            await asyncio.sleep(0.01)
        assert loop.runs == 7  # six crashes, each started again, and the seventh run holds
        assert supervisor.crashes == {"webhook-ops": 6} and fatal == [] and not task.done()
    finally:
        task.cancel()
