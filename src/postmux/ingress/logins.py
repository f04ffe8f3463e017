"""SMTP AUTH password checks for every session of one listener: budgets first, scrypt last, a bounded few.

scrypt is slow and big on purpose (postmux passwd: n=2^15, r=8: 32 MiB and tens of milliseconds of CPU a
check), so each check is a resource a client can make postmux spend. Before this guard, 90 connections
from one address each ran theirs at once in asyncio's shared thread pool, and a real login queued behind
them for 3-4 s. Now, for each login:

1. a client address or user over its failure budget (LoginThrottle, anvil.py) is refused at once, before
   any scrypt work;
2. the checks of one client address run at most PER_ADDRESS_CHECKS at a time; its other logins wait
   their turn, and are judged against the budget again when it comes, so parallel connections from one
   address cannot all get in before the first failures are counted;
3. the listener runs at most `[smtp] max_concurrent_auth_checks` checks at once, in threads, never on the
   event loop; a client's waiting logins never hold a slot, so one address can never take them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable

import structlog

from postmux.config import SmtpSettings
from postmux.ingress.anvil import LoginThrottle, Throttled, address_key
from postmux.passwords import hash_password, verify_password

log = structlog.get_logger("postmux.smtp")

PER_ADDRESS_CHECKS = 2  # a client that logs in on many connections at once waits ~50 ms a pair, not more


class LoginOutcome(enum.Enum):
    OK = "ok"
    INVALID = "invalid"
    ADDRESS_THROTTLED = "address_throttled"
    USER_THROTTLED = "user_throttled"


_REFUSED = {Throttled.ADDRESS: LoginOutcome.ADDRESS_THROTTLED, Throttled.USER: LoginOutcome.USER_THROTTLED}


class _Turns:
    """At most `size` holders per key at once; the others wait in order. Keys live only while in use."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        semaphore, users = self._held.get(key, (asyncio.Semaphore(self.size), 0))
        self._held[key] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._held[key]
            if users == 1:
                del self._held[key]
            else:
                self._held[key] = (semaphore, users - 1)

    def __len__(self) -> int:
        return len(self._held)


class LoginGuard:
    """Checks a user name and password against [[smtp.users]], within the budgets."""

    def __init__(self, settings: SmtpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.users = {u.name: u.password_hash for u in settings.users}
        self.throttle = LoginThrottle.create(
            settings.max_auth_failures_per_address,
            settings.max_auth_failures_per_user,
            settings.auth_failure_window,
            clock,
        )
        self.address_turns = _Turns(PER_ADDRESS_CHECKS)
        self.checks = asyncio.Semaphore(settings.max_concurrent_auth_checks)
        self.running = 0  # scrypt checks in threads right now (for tests and metrics)
        self._in_flight: set[asyncio.Future[bool]] = set()

    async def check(
        self, client_ip: str, name: str, password: bytes, *, authorized: bool = True
    ) -> LoginOutcome:
        """`authorized` False: the login fails whatever the password (AUTH PLAIN's authzid, RFC 4616 2).
        It is checked all the same, so it costs, takes and counts as a wrong password does."""
        if (early := self._refused(self.throttle.refusal(client_ip, name), client_ip, name)) is not None:
            return early
        async with self.address_turns.turn(address_key(client_ip)):
            # Judged again, now that the logins this one waited behind are counted.
            if (refused := self._refused(self.throttle.begin(client_ip, name), client_ip, name)) is not None:
                return refused
            ok = False
            try:
                ok = await self._verify(name, password) and authorized
            finally:
                # A client that hangs up during its check still spent an attempt.
                self.throttle.record(client_ip, name, ok=ok)
        return LoginOutcome.OK if ok else LoginOutcome.INVALID

    def _refused(self, throttled: Throttled | None, client_ip: str, name: str) -> LoginOutcome | None:
        if throttled is None:
            return None
        log.warning(
            "authentication throttled",
            client=client_ip,
            user=name,
            scope=throttled.value,
            retry_in_s=round(self.throttle.retry_in(client_ip, name)),
        )
        return _REFUSED[throttled]

    async def _verify(self, name: str, password: bytes) -> bool:
        # An unknown user costs as much as a known one, so the time taken does not tell which names exist.
        encoded = self.users.get(name) or _decoy_hash()
        await self.checks.acquire()
        # The slot is given back when the thread is done, not when the session stops waiting for it: a
        # client that hangs up mid-check must not free a slot while its scrypt still runs.
        check = asyncio.ensure_future(self._in_thread(password, encoded))
        self._in_flight.add(check)
        check.add_done_callback(self._in_flight.discard)
        ok = await asyncio.shield(check)
        return ok and name in self.users

    async def _in_thread(self, password: bytes, encoded: str) -> bool:
        self.running += 1
        try:
            return await asyncio.to_thread(verify_password, password, encoded)
        finally:
            self.running -= 1
            self.checks.release()


_DECOY: list[str] = []


def _decoy_hash() -> str:
    if not _DECOY:
        _DECOY.append(hash_password("decoy"))
    return _DECOY[0]
