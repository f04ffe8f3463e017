"""No background loop of a node ends unseen (review outage.md item 4).

The review's node: Redis throttles, a rule toward dest.test; Redis fills up (OOM under noeviction). The
dispatcher's loop and the heartbeat died on the error reply, nothing was logged, mail was answered 250
and never sent, and the gauge said "redis" until a restart. Here the node falls back, keeps delivering,
says so, and rejoins. Then the supervision itself: a loop that crashes on a defect is logged, counted and
restarted; one that keeps crashing stops the node (`postmux serve` exits 70) rather than leave it
accepting mail it cannot deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog

from postmux.app import App
from postmux.cli import EXIT_SOFTWARE, _NodeFailed, _serve
from postmux.scheduling.dispatcher import Dispatcher
from postmux.scheduling.redis_throttles import RedisThrottles
from postmux.supervision import Supervisor
from tests.redis_support import PrivateRedis, private_redis
from tests.support import Upstream, make_settings, read_events, send_many, wait_until

__all__ = ["private_redis"]  # the fixture, used by name


def delivered(up: Upstream) -> set[str]:
    ids = set()
    for r in up.received:
        for line in r.data.split(b"\r\n"):
            if line.startswith(b"X-Test-Id: "):
                ids.add(line.split(b": ", 1)[1].decode())
    return ids


def settings(tmp_path: Path, up: Upstream, **sections: Any) -> Any:
    return make_settings(
        tmp_path,
        [{"name": "default", "members": [{"name": "a", "address": up.address}]}],
        shaping={
            "aimd": "off",
            "rule": [{"destination": "dest.test", "max_connections": 2, "rate": "600/min"}],
        },
        **sections,
    )


async def test_a_full_redis_makes_the_node_fall_back_and_deliver_then_rejoin(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    up = await Upstream("up").start()
    throttles = {"backend": "redis", "url": private_redis.url, "prefix": "outage:", "timeout": "1s"}
    admin = redis.Redis(port=private_redis.port, socket_timeout=5.0)
    try:
        async with App(settings(tmp_path, up, throttles=throttles)) as app:
            shared = app.throttles
            assert isinstance(shared, RedisThrottles)
            await send_many(app.smtp_port, [f"r-{i}" for i in range(3)])
            await wait_until(lambda: delivered(up) >= {"r-0", "r-1", "r-2"})

            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            await send_many(app.smtp_port, [f"oom-{i}" for i in range(3)])
            await wait_until(lambda: delivered(up) >= {"oom-0", "oom-1", "oom-2"})
            assert shared.state == "fallback"
            assert 'postmux_throttles_backend{state="fallback"} 1.0' in app.metrics.render().decode()
            loops = [t for t in app._tasks if t.get_name() in ("throttles-heartbeat", "members-shared")]
            assert len(loops) == 2 and not any(t.done() for t in loops)

            admin.config_set("maxmemory", "0")
            await wait_until(lambda: shared.state == "redis", timeout=10)
            await wait_until(lambda: admin.zcard("outage:nodes") == 1)  # the heartbeat beats again
            await send_many(app.smtp_port, ["after"])
            await wait_until(lambda: "after" in delivered(up))
            metrics = app.metrics.render().decode()
            assert 'postmux_throttles_backend{state="redis"} 1.0' in metrics
            assert "postmux_loop_crashes_total{" not in metrics  # no loop crashed: Redis's error was handled
            assert not app.failed.is_set()
    finally:
        admin.close()
        await up.stop()
    changes = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "ThrottlesBackendChanged"]
    assert [e["tags"]["state"] for e in changes] == ["fallback", "redis"]
    assert "OutOfMemoryError" in changes[0]["tags"]["reason"]


class Defect:
    """A fault put into the dispatcher's pass: it raises `times` times (None: always), then passes."""

    def __init__(self, dispatcher: Dispatcher, times: int | None) -> None:
        self.pass_ = dispatcher._dispatch_ready
        self.left = times

    def __call__(self) -> float:
        if self.left is None or self.left > 0:
            if self.left is not None:
                self.left -= 1
            raise RuntimeError("a defect in the dispatch pass")
        return self.pass_()


async def test_a_loop_that_crashes_is_logged_counted_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await Upstream("up").start()
    try:
        async with App(settings(tmp_path, up)) as app:
            with structlog.testing.capture_logs() as logs:
                monkeypatch.setattr(app.dispatcher, "_dispatch_ready", Defect(app.dispatcher, 2))
                app.dispatcher.wake()
                await send_many(app.smtp_port, ["m-0", "m-1"])
                await wait_until(lambda: delivered(up) >= {"m-0", "m-1"}, timeout=10)
            assert 'postmux_loop_crashes_total{loop="dispatch"} 2.0' in app.metrics.render().decode()
            assert not app.failed.is_set()
    finally:
        await up.stop()
    crashed = [e for e in logs if e["event"] == "background loop crashed"]
    assert [(e["loop"], e["log_level"], e["exc_info"]) for e in crashed] == [("dispatch", "error", True)] * 2


async def test_a_loop_that_keeps_crashing_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`postmux serve` drains and returns with the reason (the command then exits 70), rather than keep
    a node that answers 250 and delivers nothing."""
    up = await Upstream("up").start()
    config = tmp_path / "postmux.toml"
    config.write_text("")  # only for a reload, which this test does not make
    # The dispatch pass always fails, and a crash is retried at once: the five crashes take no time.
    monkeypatch.setattr(Dispatcher, "_dispatch_ready", lambda self: 1 / 0)
    monkeypatch.setattr(Supervisor, "__init__", _quick(Supervisor.__init__))
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(_NodeFailed, match="dispatch loop"):
            async with asyncio.timeout(20):
                await _serve(settings(tmp_path, up), config)
    finally:
        await up.stop()
        loop = asyncio.get_running_loop()  # _serve's signal handlers, not left to the next test
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    assert EXIT_SOFTWARE == 70
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert [e["event"] for e in critical] == ["background loop keeps crashing; stopping the node"]
    assert critical[0]["loop"] == "dispatch"
    assert any(e["event"] == "stopped" for e in logs)  # drained and closed as at a SIGTERM


def _quick(init: Any) -> Any:
    def quick(self: Supervisor, on_fatal: Any, **kwargs: Any) -> None:
        init(self, on_fatal, **{**kwargs, "pause_s": 0.0})

    return quick
