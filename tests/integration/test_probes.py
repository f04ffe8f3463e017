"""Active health checks against real servers on loopback: aiosmtpd upstreams and scripted raw servers."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.balancing.probes import HealthChecker
from postmux.config import MemberSettings, PoolSettings
from tests.support import StartUpstream, Upstream, free_port, wait_until

INTERVAL_S = 0.1
TIMEOUT_S = 0.3
RISE = 2
FALL = 3

StartChecker = Callable[[Pool], Awaitable[HealthChecker]]
# scripted(greeting, VERB="reply", ...) -> "host:port"; greeting None: a server that never says a word.
StartScripted = Callable[..., Awaitable[str]]


@dataclass
class Changes:
    """What the pool told its owner, in order: (member, up, reason)."""

    seen: list[tuple[str, bool, str]] = field(default_factory=list)

    def __call__(self, member: Member, up: bool, reason: str) -> None:
        self.seen.append((member.name, up, reason))


def make_pool(*addresses: str, changes: Changes | None = None, **check: Any) -> Pool:
    settings = PoolSettings.model_validate(
        {
            "name": "default",
            "members": [{"name": f"m{i}", "address": a} for i, a in enumerate(addresses)],
            "check": {
                "enabled": True,
                "interval": INTERVAL_S,
                "timeout": TIMEOUT_S,
                "rise": RISE,
                "fall": FALL,
                **check,
            },
        }
    )
    return Pool(settings, on_change=changes)


@pytest.fixture
async def checkers() -> AsyncIterator[StartChecker]:
    """Started checkers, stopped even when the test fails."""
    started: list[HealthChecker] = []

    async def start(pool: Pool) -> HealthChecker:
        checker = HealthChecker(pool, "probe.test")
        await checker.start()
        started.append(checker)
        return checker

    yield start
    for checker in started:
        await checker.stop()


# -- scripted raw servers: replies no aiosmtpd server would give ---------------------------------------


class _Scripted(asyncio.Protocol):
    """Sends `greeting` (if any), then answers each command line by its verb; unknown verbs get nothing."""

    def __init__(self, greeting: str | None, replies: dict[str, str]) -> None:
        self.greeting = greeting
        self.replies = replies
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.greeting is not None:
            transport.write(self.greeting.encode() + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line.split(b" ", 1)[0].decode().upper()
            reply = self.replies.get(verb)
            if reply is not None and self.transport is not None:
                self.transport.write(reply.encode() + b"\r\n")


@pytest.fixture
async def scripted() -> AsyncIterator[StartScripted]:
    """Start a scripted server on loopback; returns its host:port. Closed with every connection at the end."""
    servers: list[asyncio.Server] = []
    protocols: list[_Scripted] = []

    async def start(greeting: str | None, **replies: str) -> str:
        def factory() -> _Scripted:
            protocols.append(_Scripted(greeting, replies))
            return protocols[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for p in protocols:
        if p.transport is not None:
            p.transport.close()
    for server in servers:
        await server.wait_closed()


# -- the loop, against aiosmtpd upstreams ------------------------------------------------------------


async def test_a_healthy_member_stays_up_and_is_probed_repeatedly(
    upstream: StartUpstream, checkers: StartChecker
) -> None:
    up = await upstream("a")
    changes = Changes()
    pool = make_pool(up.address, changes=changes)
    await checkers(pool)

    await wait_until(lambda: up.connections >= 4, timeout=3)
    member = pool.members[0]
    assert member.check_up
    assert member.check_streak >= 3
    assert changes.seen == []


async def test_start_does_nothing_when_checks_are_disabled(
    upstream: StartUpstream, checkers: StartChecker
) -> None:
    up = await upstream("a")
    pool = make_pool(up.address, enabled=False)
    await checkers(pool)
    await asyncio.sleep(3 * INTERVAL_S)
    assert up.connections == 0


async def test_a_stopped_server_goes_down_after_fall_checks_and_comes_back_after_rise(
    upstream: StartUpstream, checkers: StartChecker
) -> None:
    up = await upstream("a")
    port = up.port
    changes = Changes()
    pool = make_pool(up.address, changes=changes)
    member = pool.members[0]
    await checkers(pool)
    await wait_until(lambda: member.check_streak >= 1, timeout=3)

    await up.stop()
    stopped_at = time.monotonic()
    await wait_until(lambda: not member.check_up, timeout=5)
    took_s = time.monotonic() - stopped_at
    # fall failures, each one (jittered) interval apart, the first at most one interval after the stop.
    assert took_s <= FALL * INTERVAL_S * 1.1 + TIMEOUT_S + 0.3, took_s
    assert changes.seen == [("m0", False, f"{FALL} checks failed: connection refused")]

    await up.start(port)
    await wait_until(lambda: member.check_up, timeout=5)
    assert changes.seen[1:] == [("m0", True, f"{RISE} checks passed")]
    assert member.check_streak == RISE


async def test_sync_probes_appended_members_and_stops_probing_removed_ones(
    upstream: StartUpstream, checkers: StartChecker
) -> None:
    a, b = await upstream("a"), await upstream("b")
    pool = make_pool(a.address)
    checker = await checkers(pool)
    await wait_until(lambda: a.connections >= 1, timeout=3)

    pool.members.append(Member(MemberSettings(name="b", address=b.address), pool.name))
    checker.sync()
    await wait_until(lambda: b.connections >= 2, timeout=3)

    pool.members[0].removed = True
    checker.sync()
    await asyncio.sleep(INTERVAL_S / 2)  # a probe cancelled mid-flight may have connected just now
    seen = a.connections
    before_b = b.connections
    await asyncio.sleep(4 * INTERVAL_S)
    assert a.connections == seen
    assert b.connections > before_b


async def test_a_removed_member_stops_its_own_loop_without_sync(
    upstream: StartUpstream, checkers: StartChecker
) -> None:
    up = await upstream("a")
    pool = make_pool(up.address)
    await checkers(pool)
    await wait_until(lambda: up.connections >= 1, timeout=3)

    pool.members[0].removed = True
    await asyncio.sleep(2 * INTERVAL_S)  # the loop notices at its next turn
    seen = up.connections
    await asyncio.sleep(4 * INTERVAL_S)
    assert up.connections == seen


async def test_stop_ends_every_loop_promptly(upstream: StartUpstream, scripted: StartScripted) -> None:
    up = await upstream("a")
    silent = await scripted(None)
    pool = make_pool(up.address, silent, timeout=5)
    checker = HealthChecker(pool, "probe.test")
    await checker.start()
    await wait_until(lambda: up.connections >= 1, timeout=3)

    started = time.monotonic()
    await asyncio.wait_for(checker.stop(), timeout=2)
    assert time.monotonic() - started < 1.0  # the probe stuck on the silent server was cancelled


# -- one probe ---------------------------------------------------------------------------------------


async def probe(address: str, **check: Any) -> tuple[bool, str]:
    pool = make_pool(address, **check)
    return await HealthChecker(pool, "probe.test").check_once(pool.members[0])


async def test_a_healthy_upstream_passes(upstream: StartUpstream) -> None:
    up: Upstream = await upstream("a")
    assert await probe(up.address) == (True, "ok")


async def test_nothing_listening_fails_as_connection_refused() -> None:
    assert await probe(f"127.0.0.1:{free_port()}") == (False, "connection refused")


async def test_a_server_that_never_greets_fails_by_timeout(scripted: StartScripted) -> None:
    address = await scripted(None)
    started = time.monotonic()
    passed, detail = await probe(address)
    took_s = time.monotonic() - started
    assert (passed, detail) == (False, f"timeout after {TIMEOUT_S}s at connect")
    assert TIMEOUT_S * 0.9 <= took_s < TIMEOUT_S + 0.2


async def test_a_421_greeting_fails(scripted: StartScripted) -> None:
    address = await scripted("421 4.3.2 busy, try later")
    assert await probe(address) == (False, "421 at greeting")


async def test_a_server_silent_after_ehlo_fails_by_timeout_at_ehlo(scripted: StartScripted) -> None:
    address = await scripted("220 hi")
    assert await probe(address) == (False, f"timeout after {TIMEOUT_S}s at EHLO")


async def test_ehlo_refused_falls_back_to_helo(scripted: StartScripted) -> None:
    address = await scripted("220 hi", EHLO="502 5.5.1 no", HELO="250 hi", NOOP="250 ok", QUIT="221 bye")
    assert await probe(address) == (True, "ok")


async def test_a_refused_noop_fails(scripted: StartScripted) -> None:
    address = await scripted("220 hi", EHLO="250 hi", NOOP="451 4.3.0 not now")
    assert await probe(address) == (False, "451 at NOOP")


async def test_a_421_to_ehlo_fails_without_trying_helo(scripted: StartScripted) -> None:
    address = await scripted("220 hi", EHLO="421 4.3.2 closing", HELO="250 hi", NOOP="250 ok")
    assert await probe(address) == (False, "421 at EHLO")


async def test_the_answer_to_quit_does_not_matter(scripted: StartScripted) -> None:
    # QUIT gets no answer at all: the probe still passes, and still within its timeout.
    address = await scripted("220 hi", EHLO="250 hi", NOOP="250 ok")
    started = time.monotonic()
    assert await probe(address) == (True, "ok")
    assert time.monotonic() - started < TIMEOUT_S + 0.2


# -- TLS -------------------------------------------------------------------------------------------


def _server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def tls_probe(address: str, **member: Any) -> tuple[bool, str]:
    settings = PoolSettings.model_validate(
        {
            "name": "default",
            "members": [{"name": "m0", "address": address, **member}],
            "check": {"enabled": True, "timeout": 2.0},  # a TLS handshake on a busy test machine
        }
    )
    pool = Pool(settings)
    return await HealthChecker(pool, "probe.test").check_once(pool.members[0])


async def test_a_member_that_requires_tls_fails_its_check_when_starttls_is_not_offered(
    upstream: StartUpstream,
) -> None:
    up: Upstream = await upstream("a")
    assert await tls_probe(up.address) == (True, "ok")  # opportunistic: plaintext is fine
    assert await tls_probe(up.address, tls="required") == (False, "STARTTLS not offered at STARTTLS")


async def test_a_verify_member_passes_with_a_good_certificate_and_fails_with_a_bad_one(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    good: Upstream = await upstream("good", tls=_server_tls(ca, "relay.test"))
    bad: Upstream = await upstream("bad", tls=_server_tls(trustme.CA(), "relay.test"))
    member = {"tls": "verify", "tls_ca_file": str(ca_file), "tls_server_name": "relay.test"}
    assert await tls_probe(good.address, **member) == (True, "ok")
    assert await tls_probe(bad.address, **member) == (
        False,
        "certificate not verified at STARTTLS: unable to get local issuer certificate",
    )
