"""The node's one build path: transports from an injected factory, reload through each component's own
method, and a start or stop that fails halfway leaving nothing half open."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from postmux.app import App, StartupError
from postmux.config import Settings, load_config
from postmux.delivery.memory import MemoryFarm
from tests.integration.test_control import write_config
from tests.support import StartUpstream, delay, make_settings, send, send_many, wait_until

# Nothing listens here: a member that tried to connect would fail, so only the fake can deliver.
NOWHERE = "127.0.0.1:9"


async def test_an_app_with_a_fake_transport_factory_delivers_in_memory(tmp_path: Path) -> None:
    farm = MemoryFarm()
    members = [{"name": "a", "address": NOWHERE}, {"name": "b", "address": NOWHERE}]
    settings = make_settings(tmp_path, [{"name": "default", "policy": "round_robin", "members": members}])
    async with App(settings, transport_factory=farm) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(6)], concurrency=3)
        await wait_until(lambda: len(farm.delivered) == 6)
        await wait_until(lambda: app.pools["default"].member("a").delivered == 3)
        assert sorted(d.member for d in farm.delivered) == ["a"] * 3 + ["b"] * 3
        assert all(b"X-Test-Id: m" in d.data and d.recipients == ("user@dest.test",) for d in farm.delivered)
        await wait_until(lambda: app.pools["default"].member("b").delivered == 3)
    assert app.pools["default"].member("a").deferred == 0


async def test_a_reload_routes_new_mail_by_the_new_routes(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    bulk = f'\n[[pool]]\nname = "bulk"\nmembers = [{{ name = "b", address = "{b.address}" }}]\n'
    cfg.write_text(cfg.read_text() + bulk)
    async with App(load_config(cfg), config_path=cfg) as app:
        await send(app.smtp_port, "before", sender="news@example.com")
        await wait_until(lambda: len(a.received) == 1)
        route = '\n[[route]]\nmatch = { sender_domain = "example.com" }\npool = "bulk"\n'
        cfg.write_text(cfg.read_text() + route)
        assert app.control.reload().ok
        await send(app.smtp_port, "after", sender="news@example.com")
        await wait_until(lambda: len(b.received) == 1)
    assert [r.test_id for r in a.received] == ["before"] and [r.test_id for r in b.received] == ["after"]


# -- start and stop that fail halfway ------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[str]:
    """host:port of a listening socket that someone else holds for the whole test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def one_member(tmp_path: Path, **sections: dict[str, str]) -> Settings:
    return make_settings(
        tmp_path, [{"name": "default", "members": [{"name": "a", "address": NOWHERE}]}], **sections
    )


async def test_a_start_that_fails_on_a_taken_http_port_closes_the_spool_so_a_second_start_works(
    tmp_path: Path, taken_port: str
) -> None:
    app = App(one_member(tmp_path, http={"listen": taken_port}))
    with pytest.raises(StartupError, match=r"\[http\] listen .*address already in use"):
        await app.start()
    assert not app.running
    # The spool's lock (flock: it conflicts within one process too) was released by the failed start.
    async with App(one_member(tmp_path), transport_factory=MemoryFarm()) as again:
        await send(again.smtp_port, "after")


async def test_a_start_that_fails_on_a_taken_smtp_port_closes_the_http_listener_it_had_opened(
    tmp_path: Path, taken_port: str
) -> None:
    app = App(one_member(tmp_path, smtp={"listen": taken_port}))
    with pytest.raises(StartupError, match=r"\[smtp\] listen .*address already in use"):
        await app.start()
    assert app.http_port != 0  # it had started: the failure came after it
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{app.http_port}/healthz")
    async with App(one_member(tmp_path), transport_factory=MemoryFarm()) as again:
        await send(again.smtp_port, "after")


async def test_a_stop_step_that_fails_does_not_keep_the_spool_from_closing(tmp_path: Path) -> None:
    # /dev/full: every write fails with ENOSPC, as an event log on a full disk would.
    farm = MemoryFarm()
    app = App(one_member(tmp_path, events={"log": "/dev/full"}), transport_factory=farm)
    await app.start()
    await send(app.smtp_port, "before")
    await wait_until(lambda: len(farm.delivered) == 1)
    with pytest.raises(OSError) as failed:
        await app.stop()
    assert failed.value.errno == errno.ENOSPC
    # The steps after the event log's ran: the spool was closed and its lock released.
    async with App(one_member(tmp_path), transport_factory=farm) as again:
        await send(again.smtp_port, "after")
        await wait_until(lambda: len(farm.delivered) == 2)


async def test_the_drain_timeout_setting_bounds_how_long_stop_waits_for_attempts_in_flight(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    slow = await upstream("slow", delay(5.0))
    pool = [{"name": "default", "members": [{"name": "slow", "address": slow.address}]}]
    app = App(make_settings(tmp_path, pool, shutdown={"drain_timeout": "300ms"}))
    await app.start()
    await send(app.smtp_port, "in-flight")
    await wait_until(lambda: app.pools["default"].member("slow").in_flight == 1)
    started = time.monotonic()
    await app.stop()
    assert time.monotonic() - started < 3.0  # not the 5 s the member takes, nor the default 10 s


async def test_a_reload_names_a_changed_drain_timeout_as_needing_a_restart(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        cfg.write_text(cfg.read_text() + '\n[shutdown]\ndrain_timeout = "30s"\n')
        result = app.control.reload()
        assert result.ok and result.needs_restart == ["shutdown.drain_timeout"]
        assert app.drain_timeout_s == 10.0


async def test_the_dispatchers_loops_end_when_stopped_in_the_turn_they_are_woken(tmp_path: Path) -> None:
    # Python 3.11's asyncio.wait_for returns instead of raising when the cancel comes in the turn its
    # event is set: the loops ran on, and stop waited for them forever (a hang seen in make test).
    async with App(one_member(tmp_path), transport_factory=MemoryFarm()) as app:
        await asyncio.sleep(0.05)  # the loops are waiting for their events
        app.dispatcher.wake()
        app.dispatcher.scan_soon()
        async with asyncio.timeout(5):
            await app.dispatcher.stop(0.1)
