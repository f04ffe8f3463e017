"""Tests resolve nothing but loopback: a guard over every way a test could ask a resolver about a name.

A test that asks the machine's resolver depends on the machine (its hostname, /etc/hosts, the network): it
is slow where DNS is slow, fails where DNS is down, and leaks names. So, while the guard is installed:

- socket.getaddrinfo, gethostbyname, gethostbyname_ex: only None, "", localhost and numeric addresses
  (these never leave the process: the C library answers them from the string itself or /etc/hosts);
- socket.gethostbyaddr, socket.getfqdn: only localhost and loopback addresses (a reverse lookup of any
  other address, or of this machine's own name - what getfqdn() with no argument asks - goes to DNS);
- dnspython's queries (dns.query and dns.asyncquery: udp, tcp, tls, https, quic): only to a nameserver
  on a loopback address and a port other than 53, i.e. a test's own server (tests/dns_server.py); port
  53 on loopback is the machine's stub resolver, which forwards to the world.

asyncio's loop.getaddrinfo runs socket.getaddrinfo (looked up at call time) in a thread, and dnspython
reaches the socket module the same way (dns.inet for scoped addresses), so both are covered. uvloop's
loop.getaddrinfo calls libuv directly and is not: tests run on asyncio's loop.

Every refused lookup raises NonLoopbackLookup (a socket.gaierror, so code under test takes its usual
failure path) and is recorded: the conftest fails the test afterwards even if the code swallowed the error.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

_LOCAL_NAMES = frozenset(
    {"localhost", "localhost.", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)
_DNS_QUERIES = ("udp", "tcp", "tls", "https", "quic", "udp_with_fallback")


class NonLoopbackLookup(socket.gaierror):
    """A test asked a resolver about a name that is not loopback."""


def _text(host: Any) -> str | None:
    if host is None:
        return None
    if isinstance(host, bytes | bytearray):
        return bytes(host).decode("ascii", "replace")
    return str(host)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope (%eth0) is not a lookup
    except ValueError:
        return None


def forward_allowed(host: Any) -> bool:
    """A forward lookup that never leaves the process: none, localhost, or an address written as digits."""
    text = _text(host)
    return text is None or text.strip() == "" or text.lower() in _LOCAL_NAMES or _address(text) is not None


def reverse_allowed(host: Any) -> bool:
    """A reverse lookup (or getfqdn) answered from /etc/hosts: localhost or a loopback address only."""
    text = (_text(host) or "").strip()
    if text.lower() in _LOCAL_NAMES:
        return True
    address = _address(text)
    return address is not None and address.is_loopback


def nameserver_allowed(where: Any, port: Any) -> bool:
    address = _address(_text(where) or "")
    return address is not None and address.is_loopback and port != 53


class ResolverGuard:
    """Installs the wrappers; `attempts` lists what was refused, as 'function(host)'."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._lock = threading.Lock()
        self._saved: list[tuple[object, str, object]] = []

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def refuse(self, what: str, host: Any) -> NonLoopbackLookup:
        entry = f"{what}({_text(host)!r})"
        with self._lock:
            self.attempts.append(entry)
        return NonLoopbackLookup(
            socket.EAI_NONAME,
            f"{entry}: tests resolve only localhost and loopback addresses "
            "(use numeric addresses, [dns] overrides or tests/dns_server.py)",
        )

    def take(self) -> list[str]:
        with self._lock:
            attempts, self.attempts = self.attempts, []
        return attempts

    def install(self) -> None:
        if self.installed:
            return
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            self._wrap(socket, name, self._forward(getattr(socket, name), name))
        self._wrap(socket, "gethostbyaddr", self._reverse(socket.gethostbyaddr, "gethostbyaddr"))
        self._wrap(socket, "getfqdn", self._fqdn(socket.getfqdn))
        import dns.asyncquery
        import dns.query

        for module in (dns.query, dns.asyncquery):
            for name in _DNS_QUERIES:
                if hasattr(module, name):
                    self._wrap(module, name, self._query(getattr(module, name), f"{module.__name__}.{name}"))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    @contextlib.contextmanager
    def installed_for(self) -> Iterator[ResolverGuard]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def _wrap(self, owner: object, name: str, wrapper: Callable[..., Any]) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def _forward(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
            if not forward_allowed(host):
                raise self.refuse(f"socket.{name}", host)
            return original(host, *args, **kwargs)

        return guarded

    def _reverse(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def guarded(host: Any) -> Any:
            if not reverse_allowed(host):
                raise self.refuse(f"socket.{name}", host)
            return original(host)

        return guarded

    def _fqdn(self, original: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(original)
        def guarded(name: str = "") -> str:
            # No name (or a wildcard address) means this machine's own name, looked up in DNS.
            asked = name.strip()
            if asked in ("", "0.0.0.0", "::"):
                asked = socket.gethostname()
            if not reverse_allowed(asked):
                raise self.refuse("socket.getfqdn", asked)
            return original(name)

        return guarded

    def _query(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def where_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            where = kwargs.get("where", args[1] if len(args) > 1 else None)
            port = kwargs.get("port", args[3] if len(args) > 3 else 53)
            return where, port

        if _is_coroutine_function(original):

            @functools.wraps(original)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                where, port = where_of(args, kwargs)
                if not nameserver_allowed(where, port):
                    raise self.refuse(name, f"{where}:{port}")
                return await original(*args, **kwargs)

            return guarded_async

        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            where, port = where_of(args, kwargs)
            if not nameserver_allowed(where, port):
                raise self.refuse(name, f"{where}:{port}")
            return original(*args, **kwargs)

        return guarded


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


GUARD = ResolverGuard()
