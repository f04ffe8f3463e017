"""The conftest's guard: a test that asks a resolver about a real name fails, naming the name."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import dns.asyncresolver
import dns.resolver
import pytest
from aiosmtpd.smtp import SMTP

from tests.resolver_guard import GUARD, NonLoopbackLookup


@pytest.fixture
def refused() -> Iterator[list[str]]:
    """What the guard recorded during the test, taken so that the test itself is not failed for it."""
    seen: list[str] = []
    yield seen
    seen.extend(GUARD.take())


def test_the_guard_is_on_for_every_test() -> None:
    assert GUARD.installed and socket.getaddrinfo is not GUARD._saved[0][2]


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: socket.getaddrinfo("example.com", 25), "example.com"),
        (lambda: socket.gethostbyname("example.com"), "example.com"),
        (lambda: socket.gethostbyname_ex("mail.example.com"), "mail.example.com"),
        (lambda: socket.gethostbyaddr("192.0.2.1"), "192.0.2.1"),
        (lambda: socket.getfqdn("example.com"), "example.com"),
        (lambda: socket.getfqdn(), socket.gethostname()),
    ],
    ids=["getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getfqdn(name)", "getfqdn()"],
)
def test_resolving_a_name_that_is_not_loopback_fails_naming_it(
    call: object, named: str, refused: list[str]
) -> None:
    with pytest.raises(NonLoopbackLookup, match=named.replace(".", r"\.")):
        call()  # type: ignore[operator]
    assert len(GUARD.attempts) == 1 and repr(named) in GUARD.attempts[0]


async def test_the_event_loops_getaddrinfo_is_guarded_too(refused: list[str]) -> None:
    with pytest.raises(NonLoopbackLookup, match=r"example\.com"):
        await asyncio.get_running_loop().getaddrinfo("example.com", 25)
    assert GUARD.attempts == ["socket.getaddrinfo('example.com')"]


async def test_dnspython_may_ask_only_a_tests_own_server_on_loopback(refused: list[str]) -> None:
    for nameserver in ("192.0.2.53", "127.0.0.53"):  # a real resolver, the machine's stub resolver
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver]
        resolver.lifetime = 2.0
        with pytest.raises(dns.resolver.NoNameservers):  # dnspython reports each nameserver's error
            await resolver.resolve("example.com", "MX")
    assert GUARD.attempts == [
        "dns.asyncquery.udp('192.0.2.53:53')",
        "dns.asyncquery.udp('127.0.0.53:53')",
    ]


async def test_an_smtp_server_built_without_a_hostname_would_ask_the_resolver(refused: list[str]) -> None:
    with pytest.raises(NonLoopbackLookup, match=socket.gethostname()):
        SMTP(object())  # aiosmtpd takes socket.getfqdn() for its greeting: always pass hostname=


def test_loopback_and_numeric_lookups_are_left_alone() -> None:
    assert socket.getaddrinfo("localhost", 25)
    assert socket.getaddrinfo("127.0.0.1", 25, type=socket.SOCK_STREAM)[0][4] == ("127.0.0.1", 25)
    assert socket.getaddrinfo("::1", 25)
    assert socket.getaddrinfo("192.0.2.1", 25)  # numeric: no lookup, the address is the answer
    assert socket.getaddrinfo(None, 25)
    assert GUARD.attempts == []
