"""Three `postmux serve` nodes on one PostgreSQL spool and one Redis, one killed with -9 mid-load (issue 17).

Each node is a process of its own with its own node_id, SMTP port and [smtp] hostname: the Received:
header of each copy at the upstream says which node accepted it and under which spool message id, and the
EHLO of its session which node delivered it. They share one database (schema) and one Redis key prefix.
Load goes to all three; once some of it is acknowledged and the doomed node is inside a DATA transaction
at an upstream, it is killed with -9. Then:

- every message that got a 250 from any node is delivered (at the upstreams, by X-Test-Id); none that
  got a refusal is;
- the dead node's leases (read from the recipient table just after the kill) are all taken over by the
  others within LEASE_TTL_S + SCAN_SLACK_S of the kill: a lease was renewed at most LEASE_TTL_S / 3
  before, so it runs out at most LEASE_TTL_S after the kill, and the survivors scan every second;
- a duplicate is one copy from the dead node (delivered, its outcome not committed) and one from a
  survivor, and there are at most as many as the dead node could have had delivered and not settled:
  its connections (the members' max_connections, shared through Redis) x max_messages_per_connection.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from tests.e2e.test_crash import Traffic, build_message, kill_left, start_serve, tail, write_config
from tests.redis_support import REDIS_URL, redis_client, redis_prefix
from tests.support import Behaviour, Received, Upstream, free_port, wait_until

__all__ = ["redis_prefix"]  # the fixture, used by name

NODES = 3
DOOMED = 1  # the index of the node killed
PER_NODE = 200  # messages offered to each node: the load is bounded
CLIENTS_PER_NODE = 4
KILL_AFTER_ACKED = 150  # acknowledged by the three together before the kill
LEASE_TTL_S = 4.0
# The survivors' dispatchers scan the spool every second (DispatchLimits.scan_interval_s); the rest is the
# time a take-over statement and a loaded machine (2 cores, other suites beside) may take.
SCAN_SLACK_S = 2.0
UPSTREAM_DELAY_S = 0.1  # per message: the node has deliveries in flight when it is killed
MEMBERS = 2
MAX_CONNECTIONS = 4  # per member, shared by the nodes through Redis
MESSAGES_PER_CONNECTION = 5
DUPLICATE_BOUND = MEMBERS * MAX_CONNECTIONS * MESSAGES_PER_CONNECTION
# The dead node's connection slots stay held in Redis until they run out (shaping.LEASE_TTL_S, 30 s): the
# survivors may have fewer meanwhile.
DELIVERY_TIMEOUT_S = 45.0

# The header the accepting node puts on top: `by node1.test (postmux) with ESMTP id <spool message id>;`.
BY_NODE = re.compile(rb"\tby (\S+) \(postmux\) with \S+ id (\S+);")


def hostname(i: int) -> str:
    return f"node{i}.test"


def accepted_by(data: bytes) -> tuple[str, str]:
    """The node that accepted a copy, and its spool message id. (The node that delivered it is the one
    that said EHLO: [delivery] ehlo_hostname defaults to [smtp] hostname.)"""
    m = BY_NODE.search(data)
    assert m, data[:300]
    return m.group(1).decode(), m.group(2).decode()


def slow_tracking(in_flight: Counter[str]) -> Behaviour:
    """Take each message UPSTREAM_DELAY_S after its data, counting the DATA transactions open by node.

    By the node that accepted it: before the kill that is the node delivering it too, as a node leases
    what it accepts (and its leases are renewed while it lives)."""

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        node, _ = accepted_by(bytes(envelope.original_content or b""))
        in_flight[node] += 1
        try:
            await asyncio.sleep(UPSTREAM_DELAY_S)
        finally:
            in_flight[node] -= 1
        return None

    return behaviour


@dataclass
class Load:
    """PER_NODE messages for each node, CLIENTS_PER_NODE sessions at a time; a node's stop at its kill."""

    ports: list[int]
    sent: dict[str, bytes] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> acked | refused | in_doubt
    stopped: set[int] = field(default_factory=set)

    def acked(self) -> set[str]:
        return {tid for tid, outcome in self.outcomes.items() if outcome == "acked"}

    def of(self, outcome: str) -> set[str]:
        return {tid for tid, o in self.outcomes.items() if o == outcome}

    async def run(self) -> None:
        await asyncio.gather(*(self._node(i) for i in range(len(self.ports))))

    async def _node(self, i: int) -> None:
        ids: Iterator[int] = iter(range(PER_NODE))
        await asyncio.gather(*(self._client(i, ids) for _ in range(CLIENTS_PER_NODE)))

    async def _client(self, i: int, ids: Iterator[int]) -> None:
        traffic = Traffic(self.ports[i])
        for n in ids:
            if i in self.stopped:
                return
            test_id = f"n{i}-{n:04d}"
            data = build_message(test_id, n)
            self.sent[test_id] = data
            self.outcomes[test_id] = await traffic.send_one(test_id, data)


async def leased_by(dsn: str, owner: str) -> tuple[set[str], tuple[float, float]]:
    """The spool message ids `owner` holds leases on, and the earliest and latest of their expiries."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id, lease_until FROM recipient WHERE state = 'leased' AND owner = $1", owner
        )
    finally:
        await conn.close()
    expiries = [r["lease_until"] for r in rows] or [math.nan]
    return {r["message_id"] for r in rows}, (min(expiries), max(expiries))


@pytest.mark.slow
async def test_three_nodes_on_postgresql_and_redis_one_killed_mid_load_nothing_acknowledged_is_lost(
    tmp_path: Path, postgres_dsn: str, redis_prefix: str
) -> None:
    in_flight: Counter[str] = Counter()
    upstreams = [await Upstream(f"up{m}", slow_tracking(in_flight)).start() for m in range(MEMBERS)]
    members = [(u.name, u.address, MAX_CONNECTIONS) for u in upstreams]
    ports: list[int] = []
    logs: list[Path] = []
    cfgs: list[Path] = []
    procs: list[asyncio.subprocess.Process] = []
    doomed = hostname(DOOMED)
    loading: asyncio.Task[None] | None = None
    t0 = time.monotonic()
    try:
        for i in range(NODES):
            home = tmp_path / f"node{i}"
            home.mkdir()
            smtp_port = free_port()
            spool = (
                f'backend = "postgresql"\ndsn = "{postgres_dsn}"\nnode_id = "{hostname(i)}"\n'
                f'lease_ttl = "{LEASE_TTL_S}s"\n'
            )
            cfg = write_config(
                home,
                smtp_port,
                free_port(),
                members,
                spool=spool,
                hostname=hostname(i),
                delivery=f"max_messages_per_connection = {MESSAGES_PER_CONNECTION}\n",
            )
            with cfg.open("a") as f:
                f.write(f'\n[throttles]\nbackend = "redis"\nurl = "{REDIS_URL}"\nprefix = "{redis_prefix}"\n')
            cfgs.append(cfg)
            logs.append(home / "serve.log")
            ports.append(smtp_port)
        # At once, as a farm comes up: one of them creates the tables (under the migration's lock). Three
        # interpreters starting together on a loaded 2-core machine took 19 s: more than start_serve's 20.
        starting = [
            start_serve(cfg, log, port, timeout_s=45.0)
            for cfg, log, port in zip(cfgs, logs, ports, strict=True)
        ]
        results = await asyncio.gather(*starting, return_exceptions=True)
        procs += [p for p in results if isinstance(p, asyncio.subprocess.Process)]
        for failed in (r for r in results if isinstance(r, BaseException)):
            raise failed

        started_s = time.monotonic() - t0
        load = Load(ports)
        loading = asyncio.create_task(load.run())
        await wait_until(lambda: len(load.acked()) >= KILL_AFTER_ACKED, timeout=30)
        # Kill only while the doomed node is inside a DATA transaction: deliveries are in flight.
        await wait_until(lambda: in_flight[doomed] > 0, timeout=10, interval=0.001)
        in_flight_at_kill = in_flight[doomed]
        os.kill(procs[DOOMED].pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        load.stopped.add(DOOMED)
        await asyncio.wait_for(procs[DOOMED].wait(), timeout=10)
        assert procs[DOOMED].returncode == -signal.SIGKILL
        copies_before_kill = sum(len(u.received) for u in upstreams)

        dead_leases, (first_expiry, last_expiry) = await leased_by(postgres_dsn, doomed)
        assert dead_leases, "the node held no leases when it was killed: the test proves nothing"
        # Taken over: none of the dead node's leases is left (the survivors took them over).
        taken_over_s = await taken_over(postgres_dsn, doomed, killed_at, LEASE_TTL_S + SCAN_SLACK_S + 5)

        await asyncio.wait_for(loading, timeout=60)
        loading = None

        def copies() -> list[tuple[str, Received]]:
            return [(r.helo, r) for u in upstreams for r in u.received]  # the node that delivered it

        acked = load.acked()
        try:
            await wait_until(
                lambda: acked <= {r.test_id for _, r in copies()}, timeout=DELIVERY_TIMEOUT_S, interval=0.1
            )
        except AssertionError:
            missing = sorted(acked - {r.test_id for _, r in copies()})
            raise AssertionError(
                f"{len(missing)} acknowledged messages never delivered: {missing[:20]}\n"
                + "\n".join(f"--- node{i} ---\n{tail(log)}" for i, log in enumerate(logs))
            ) from None
        await asyncio.sleep(1.0)  # strays (a late duplicate) show up before judging

        all_delivered_s = time.monotonic() - killed_at
        received = copies()
        count = Counter(r.test_id for _, r in received)
        delivered = set(count)
        assert not delivered - set(load.sent), "the upstreams got messages nobody sent (DSNs?)"
        assert not delivered & load.of("refused"), sorted(delivered & load.of("refused"))[:20]
        for _, r in received:
            assert r.data.endswith(load.sent[r.test_id]), f"{r.test_id}: body changed in transit"

        # The first survivor copy of a message the dead node had leased: the take-over seen at the upstream.
        taken = [r.at for node, r in received if node != doomed and accepted_by(r.data)[1] in dead_leases]
        assert taken, "no message the dead node had leased was delivered by another node"
        first_taken_s = min(taken) - killed_wall

        duplicates = {tid: n for tid, n in count.items() if n > 1}
        for tid in duplicates:
            nodes = sorted(node for node, r in received if r.test_id == tid)
            # One copy from the dead node (delivered, not yet settled) and one from the survivor that took
            # its lease over: survivors never duplicate each other's work.
            assert len(nodes) == 2 and nodes.count(doomed) == 1, (tid, nodes)
        assert len(duplicates) <= DUPLICATE_BOUND, (len(duplicates), DUPLICATE_BOUND)

        slots_left = redis_slots_held(redis_prefix)
        print(
            f"\nthree nodes: acked={len(acked)} refused={len(load.of('refused'))}"
            f" in_doubt={len(load.of('in_doubt'))} delivered={len(delivered)} copies={len(received)}"
            f" (before kill {copies_before_kill}) dead_in_flight_at_kill={in_flight_at_kill}"
            f" dead_leases={len(dead_leases)} taken_over_s={taken_over_s:.2f}"
            f" first_taken_delivery_s={first_taken_s:.2f} (lease_ttl {LEASE_TTL_S}; its leases"
            f" ran out {first_expiry - killed_wall:.2f}-{last_expiry - killed_wall:.2f} s after the kill)"
            f" redis_slots_left={slots_left} of {MEMBERS * MAX_CONNECTIONS}"
            f" duplicates={len(duplicates)} (bound {DUPLICATE_BOUND})"
            f" by_node={dict(Counter(node for node, _ in received))}"
            f" (nodes up in {started_s:.1f} s, killed at {killed_at - t0:.1f} s, all delivered"
            f" {all_delivered_s:.1f} s later)"
        )
        assert last_expiry - killed_wall <= LEASE_TTL_S, "a lease outlived its time to live"
        assert taken_over_s <= LEASE_TTL_S + SCAN_SLACK_S, taken_over_s
        # Leases are exclusive: no survivor sent a message the dead node held before its lease ran out.
        # (How much later the first goes depends on the survivors' own backlog, queued ahead of it.)
        assert first_taken_s >= first_expiry - killed_wall - 0.1, (first_taken_s, first_expiry - killed_wall)

        for i, proc in enumerate(procs):
            if i != DOOMED:
                proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(procs):
            if i != DOOMED:
                await asyncio.wait_for(proc.wait(), timeout=30)
                assert proc.returncode == 0, tail(logs[i])
    finally:
        if loading is not None:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        await kill_left(procs)
        for u in upstreams:
            await u.stop()


def redis_slots_held(prefix: str) -> int:
    """Connection slots held in Redis (the shaper's leases, scheduling/redis_throttles.py). Once every
    survivor is idle they are the dead node's: they free themselves shaping.LEASE_TTL_S (30 s) after its
    last renewal."""
    client = redis_client()
    try:
        now = float(client.time()[0])
        return sum(int(client.zcount(key, now, "+inf")) for key in client.scan_iter(f"{prefix}lease:*"))
    finally:
        client.close()


async def taken_over(dsn: str, owner: str, since: float, timeout_s: float) -> float:
    """Seconds from `since` until `owner` holds no lease in the spool (read every 50 ms)."""
    deadline = since + timeout_s
    while True:
        leases, _ = await leased_by(dsn, owner)
        now = time.monotonic()
        if not leases:
            return now - since
        assert now < deadline, (
            f"{len(leases)} leases of {owner} still held {now - since:.1f} s after its kill"
        )
        await asyncio.sleep(0.05)
