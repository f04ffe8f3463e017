"""Nodes on one PostgreSQL spool (issue 17): mail accepted by a node is delivered through a real upstream;
a node restarted under its node_id takes back the work it held; work a node that died held is taken over
by the others once its leases run out, each message once; a message queued by one node wakes another's
dispatcher at once (LISTEN/NOTIFY), well before its next scan.

Each test has a schema of its own in the session's database (tests/postgres.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from postmux.app import App
from postmux.envelope import Envelope, new_message_id
from postmux.scheduling.dispatcher import DispatchLimits
from postmux.spool.base import SpoolBackend, SpoolError
from postmux.spool.postgres import PostgresSpool
from postmux.testing import delay
from tests.support import StartUpstream, Upstream, make_settings, message, send_many, wait_until

T = TypeVar("T")


def node_settings(
    home: Path, up: Upstream, dsn: str, node_id: str, lease_ttl: str = "60s", **sections: Any
) -> Any:
    home.mkdir(exist_ok=True)
    return make_settings(
        home,
        [{"name": "default", "members": [{"name": "a", "address": up.address}]}],
        spool={"backend": "postgresql", "dsn": dsn, "node_id": node_id, "lease_ttl": lease_ttl},
        **sections,
    )


@contextlib.asynccontextmanager
async def running(*apps: App) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app)
        yield


async def left_in_spool(spool: SpoolBackend, timeout_s: float = 10.0) -> int:
    """Recipients still in the spool once it empties, or when `timeout_s` ran out (the last outcomes
    are settled a moment after the upstream's 250)."""
    deadline = time.monotonic() + timeout_s
    while (left := sum((await spool.counts()).values())) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


def delivered_ids(up: Upstream) -> list[str]:
    return sorted(r.header("X-Test-Id") for r in up.received)


async def held_by_a_node_that_died(dsn: str, owner: str, ids: list[str], ttl_s: float | None) -> None:
    """Messages a node accepted and leased for delivery, then died with: stored leased, never settled
    (a spool that closes keeps its leases; only the App gives them back when it stops, spool.give_back)."""
    spool = PostgresSpool(dsn, owner=owner, lease_ttl_s=ttl_s)
    await spool.open()
    for test_id in ids:
        env = Envelope("app@example.com", ("user@dest.test",), message(test_id))
        await spool.store(new_message_id(), env, {"user@dest.test": "default"}, time.time())
    await spool.close()


async def test_an_app_on_the_postgresql_spool_delivers_what_it_accepted_and_keeps_nothing(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    up = await upstream()
    dsn = postgres_dsn
    app = App(node_settings(tmp_path / "n1", up, dsn, "n1"))
    ids = [f"m{i}" for i in range(30)]
    async with running(app):
        await send_many(app.smtp_port, ids)
        await wait_until(lambda: len(up.received) >= len(ids), timeout=20)
        left = await left_in_spool(app.spool)
    assert delivered_ids(up) == sorted(ids)
    assert left == 0  # delivered and removed: nothing left in the database


async def test_a_text_ingress_spilled_to_a_file_is_kept_whole_in_the_database_and_the_file_goes(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    up = await upstream()
    # 64 octets in memory: the rest of each text goes to a file in the node's spill directory.
    app = App(node_settings(tmp_path / "n1", up, postgres_dsn, "n1", smtp={"spill_bytes": 64}))
    ids = [f"s{i}" for i in range(3)]
    async with running(app):
        await send_many(app.smtp_port, ids)
        await wait_until(lambda: len(up.received) >= len(ids), timeout=10)
        spilled = list(app.spool.spill_dir.iterdir())
    assert delivered_ids(up) == sorted(ids)
    assert [r.data.count(b"X-Test-Id") for r in up.received] == [1, 1, 1]
    assert all(r.data.endswith(b"hello\r\n") for r in up.received)  # the tail came back, whole
    assert spilled == []  # read into the row at store; no text stays on this node's disk


async def test_a_node_restarted_under_its_node_id_delivers_the_work_it_held_at_once(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    up = await upstream()
    dsn = postgres_dsn
    ids = [f"r{i}" for i in range(5)]
    # Leases of an hour: only the restart's own recovery can deliver them within the test.
    await held_by_a_node_that_died(dsn, "n1", ids, ttl_s=3600)
    app = App(node_settings(tmp_path / "n1", up, dsn, "n1"))
    async with running(app):
        assert app.recovered == len(ids)
        await wait_until(lambda: len(up.received) >= len(ids), timeout=10)
    assert delivered_ids(up) == sorted(ids)


async def test_two_nodes_take_over_a_dead_nodes_work_once_its_leases_run_out_each_message_once(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    up = await upstream()
    dsn = postgres_dsn
    ids = [f"d{i}" for i in range(40)]
    died = time.time()
    await held_by_a_node_that_died(dsn, "dead", ids, ttl_s=2.0)
    a = App(node_settings(tmp_path / "a", up, dsn, "a", lease_ttl="2s"))
    b = App(node_settings(tmp_path / "b", up, dsn, "b", lease_ttl="2s"))
    async with running(a, b):
        assert (a.recovered, b.recovered) == (0, 0)  # not theirs: they wait for the leases to run out
        await wait_until(lambda: len(up.received) >= len(ids), timeout=15)
        taken_over_after_s = min(r.at for r in up.received) - died
        left = await left_in_spool(a.spool)
    assert delivered_ids(up) == sorted(ids)  # every message, none twice
    assert 2.0 <= taken_over_after_s < 2.0 + 3.0  # within the lease time and a scan or two
    assert left == 0


async def test_a_node_stopped_gives_the_work_it_held_to_the_others_at_once_not_after_lease_ttl(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """A node stopped (to upgrade or remove it) with attempts in flight: cut off at its drain timeout, its
    work goes back to the queue as its spool closes, and a node still running (woken by NOTIFY) delivers
    it within seconds, where a killed node's would wait out lease_ttl (60 s here)."""
    stuck = await upstream(behaviour=delay(30.0))
    up = await upstream()
    dsn = postgres_dsn
    ids = [f"s{i}" for i in range(3)]
    leaving = App(
        node_settings(tmp_path / "leaving", stuck, dsn, "leaving", shutdown={"drain_timeout": "0.5s"})
    )
    staying = App(node_settings(tmp_path / "staying", up, dsn, "staying"))
    async with running(staying):
        async with running(leaving):
            await send_many(leaving.smtp_port, ids)
            await wait_until(lambda: stuck.active >= 1, timeout=10)  # in an attempt, not only in memory
        stopped = time.time()
        await wait_until(lambda: len(up.received) >= len(ids), timeout=10)
        left = await left_in_spool(staying.spool)
    assert delivered_ids(up) == sorted(ids)
    assert max(r.at for r in up.received) - stopped < 5.0
    assert left == 0


async def test_work_queued_by_one_node_wakes_another_at_once_by_notify(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    up = await upstream()
    dsn = postgres_dsn
    slow_scans = DispatchLimits(scan_interval_s=30.0)  # without a wake-up, nothing is looked at for 30 s
    app = App(node_settings(tmp_path / "n1", up, dsn, "n1"), limits=slow_scans)
    async with running(app):
        other = PostgresSpool(dsn, owner="other")
        await other.open()
        try:
            env = Envelope("app@example.com", ("user@dest.test",), message("woken"))
            queued_at = time.time()
            await other.store(new_message_id(), env, {"user@dest.test": "default"}, queued_at, lease=False)
            await wait_until(lambda: len(up.received) >= 1, timeout=5)
        finally:
            await other.close()
    assert delivered_ids(up) == ["woken"]
    assert up.received[0].at - queued_at < 2.0


async def test_two_nodes_leasing_at_once_never_get_one_recipient_both(postgres_dsn: str) -> None:
    """SELECT ... FOR UPDATE SKIP LOCKED: each scan passes over the rows the other is taking."""
    nodes = [PostgresSpool(postgres_dsn, owner=name, lease_ttl_s=60) for name in ("a", "b")]
    for node in nodes:
        await node.open()
    try:
        now = time.time()
        for i in range(200):
            env = Envelope("app@example.com", (f"u{i}@dest.test",), message(f"k{i}"))
            await nodes[i % 2].store(new_message_id(), env, {f"u{i}@dest.test": "default"}, now, lease=False)
        taken: dict[str, list[int]] = {"a": [], "b": []}
        for _ in range(20):
            rounds = await asyncio.gather(*(node.lease_due(now, 7) for node in nodes))
            for node, work in zip(nodes, rounds, strict=True):
                taken[node.owner] += [r.rid for w in work for r in w.recipients]
    finally:
        for node in nodes:
            await node.close()
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == 200 == len(set(taken["a"]) | set(taken["b"]))
    assert taken["a"] and taken["b"]  # both took part


async def cut_every_connection(dsn: str) -> int:
    """What a server restart does to a node's connections: every other session of the database ends."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def eventually(call: Callable[[], Awaitable[T]], tries: int = 3) -> T:
    """The first call after a cut may fail (SpoolError: the spool learns of the cut from it); a later
    one must not."""
    for _ in range(tries - 1):
        try:
            return await call()
        except SpoolError:
            await asyncio.sleep(0.1)
    return await call()


async def test_a_node_connects_again_after_the_server_cut_its_connections_and_still_hears_notify(
    postgres_dsn: str,
) -> None:
    node, other = PostgresSpool(postgres_dsn, owner="a"), PostgresSpool(postgres_dsn, owner="b")
    woken: list[float] = []
    node.on_work(lambda: woken.append(time.time()))
    await node.open()
    await other.open()
    try:
        assert await cut_every_connection(postgres_dsn) >= 4  # each: a writer, a listener, a read
        now = time.time()
        env = Envelope("app@example.com", ("user@dest.test",), message("after-cut"))
        await eventually(lambda: node.store(new_message_id(), env, {"user@dest.test": "default"}, now))
        assert (await eventually(node.counts))["leased"] == 1
        await wait_until(lambda: bool(woken), timeout=5)  # listening again: it looks once
        woken.clear()
        env2 = Envelope("app@example.com", ("user@dest.test",), message("notified"))
        await eventually(
            lambda: other.store(new_message_id(), env2, {"user@dest.test": "default"}, now, lease=False)
        )
        await wait_until(lambda: bool(woken), timeout=5)  # and hears the others' NOTIFY again
    finally:
        await other.close()
        await node.close()
