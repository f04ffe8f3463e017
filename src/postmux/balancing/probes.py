"""Active health checks: HAProxy's `check inter rise fall timeout`, spoken in SMTP.

Each member of a pool is probed every `interval`: connect, greeting, EHLO (HELO when EHLO is refused),
STARTTLS and EHLO again when the member's `tls` is required or verify, NOOP, QUIT. The result goes to
`Pool.record_check`, which owns rise/fall and the MemberUp/MemberDown events; this module only does the
I/O and the timing.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
import structlog

from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.config import CheckSettings, MemberSettings
from postmux.tls import client_context

log = structlog.get_logger("postmux.probes")

# Each sleep is spread by +-10% so members probed together drift apart instead of firing in step.
_JITTER = 0.1
# An interval of 0 passes config validation; a refused connection fails at once, so without a floor
# a loop would spin the CPU probing a dead member.
_MIN_SLEEP_S = 0.01
# stop() waits this long for the cancelled loops; a probe cancelled mid-conversation ends at once.
_STOP_WAIT_S = 5.0
_RECANCEL_S = 0.1


@dataclass(slots=True)
class _Progress:
    """Which step a probe is at, so a failure can say where it happened."""

    stage: str = "connect"


class HealthChecker:
    """Active SMTP checks for one pool's members: connect, EHLO, NOOP, QUIT, every interval."""

    def __init__(self, pool: Pool, ehlo_hostname: str, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.ehlo_hostname = ehlo_hostname
        self.clock = clock
        self._rng = random.Random()
        # Keyed by id(): Member is an unhashable dataclass, and after a reload a new member may reuse an
        # old one's name. The Member is kept in the value so its id cannot be recycled while we hold it.
        self._loops: dict[int, tuple[Member, asyncio.Task[None]]] = {}
        self._started = False
        # One TLS context per member settings: loading the system CAs for every probe would cost CPU.
        self._contexts: dict[str, tuple[MemberSettings, ssl.SSLContext | None]] = {}

    @property
    def _check(self) -> CheckSettings:
        # Read on every use rather than cached: a reload may hand the pool new settings.
        return self.pool.settings.check

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """One probing task per member; nothing at all when checks are disabled for this pool."""
        if not self._check.enabled or self._started:
            return
        self._started = True
        self.sync()

    async def stop(self) -> None:
        """Cancel every loop and wait (bounded) for them to end; their connections close as they do."""
        self._started = False
        tasks = {task for _, task in self._loops.values()}
        self._loops.clear()
        pending = await _cancel_and_wait(tasks, _STOP_WAIT_S)
        if pending:
            log.warning("health checks did not stop in time", pool=self.pool.name, tasks=len(pending))

    def sync(self) -> None:
        """Follow pool.members after a reload: probe new members, stop probing removed or dropped ones."""
        if not self._started:
            return
        present = {id(m) for m in self.pool.members if not m.removed}
        for key in [k for k in self._loops if k not in present]:
            _, task = self._loops.pop(key)
            task.cancel()
        for member in self.pool.members:
            if not member.removed and id(member) not in self._loops:
                self._spawn(member)

    def _spawn(self, member: Member) -> None:
        task = asyncio.create_task(self._run(member), name=f"check {self.pool.name}/{member.name}")
        self._loops[id(member)] = (member, task)
        task.add_done_callback(lambda t: self._forget(member, t))

    def _forget(self, member: Member, task: asyncio.Task[None]) -> None:
        # A loop that ended by itself (member removed) leaves the table; a newer loop for the same
        # member object, started by a later sync(), must stay.
        entry = self._loops.get(id(member))
        if entry is not None and entry[1] is task:
            del self._loops[id(member)]

    # -- the loop ------------------------------------------------------------------------------------

    async def _run(self, member: Member) -> None:
        # The first probe lands anywhere in the first interval, so a pool of many members (or many
        # pools started together) does not open all its probe connections in the same instant.
        await asyncio.sleep(self._rng.uniform(0.0, self._check.interval))
        while self._wanted(member):
            await self._round(member)
            await asyncio.sleep(self._next_sleep())

    def _wanted(self, member: Member) -> bool:
        """Whether this loop should go on: its member is in the config and no stop() or sync() ended it.

        Cancelling is not enough on its own (see _cancel_and_wait), so each loop also checks this.
        """
        entry = self._loops.get(id(member))
        return not member.removed and entry is not None and entry[1] is asyncio.current_task()

    async def _round(self, member: Member) -> None:
        try:
            passed, detail = await self.check_once(member)
            if not self._wanted(member):
                return  # removed or stopped while we probed: nobody needs this result any more
            self.pool.record_check(member, passed, self.clock(), detail)
        except Exception:
            # A loop that dies would freeze this member's check state for good: log and go on.
            log.exception("health check round crashed", pool=self.pool.name, member=member.name)

    def _next_sleep(self) -> float:
        interval = self._check.interval
        return max(_MIN_SLEEP_S, interval * self._rng.uniform(1.0 - _JITTER, 1.0 + _JITTER))

    # -- one probe -----------------------------------------------------------------------------------

    async def check_once(self, member: Member) -> tuple[bool, str]:
        """One probe, bounded as a whole by check.timeout: (passed, what failed and where, or "ok")."""
        timeout_s = self._check.timeout
        client = aiosmtplib.SMTP(
            hostname=member.settings.host,
            port=member.settings.port,
            # Always given: without it aiosmtplib calls socket.getfqdn(), a blocking resolver lookup.
            local_hostname=self.ehlo_hostname,
            timeout=timeout_s,
            start_tls=False,
        )
        progress = _Progress()
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._converse(client, member, progress, deadline)
            await _quit(client, deadline)
            return True, "ok"
        except (aiosmtplib.SMTPException, OSError) as error:
            return False, _describe(error, progress.stage, timeout_s)
        finally:
            client.close()

    async def _converse(
        self, client: aiosmtplib.SMTP, member: Member, progress: _Progress, deadline: float
    ) -> None:
        """Greeting 220, EHLO (or HELO) 250, NOOP 250; aiosmtplib raises on any other reply.

        Each step also gets only what is left of the budget as its own timeout: on Python 3.11 the
        cancel from asyncio.timeout can be lost inside aiosmtplib (see _cancel_and_wait), and then
        these inner timeouts are what keeps the probe near its deadline.
        """
        # "connect" spans the TCP handshake and the greeting: aiosmtplib does both in one call, and a
        # cancelled connect() has already forgotten whether the handshake had finished.
        await client.connect(timeout=_left_s(deadline))
        progress.stage = "EHLO"
        try:
            await client.ehlo(timeout=_left_s(deadline))
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:  # 421 at EHLO: aiosmtplib has already hung up
                raise
            # RFC 5321 3.2: a server that does not know EHLO must still take HELO.
            progress.stage = "HELO"
            await client.helo(timeout=_left_s(deadline))
        await self._start_tls(client, member, progress, deadline)
        progress.stage = "NOOP"
        await client.noop(timeout=_left_s(deadline))

    async def _start_tls(
        self, client: aiosmtplib.SMTP, member: Member, progress: _Progress, deadline: float
    ) -> None:
        """A member that must speak TLS passes only if it does: a check that skipped it would bring back
        a member every one of whose attempts then fails with 4.7.4 or 4.7.5."""
        settings = member.settings
        if settings.tls_mode not in ("required", "verify"):
            return
        progress.stage = "STARTTLS"
        if not client.supports_extension("starttls"):
            raise aiosmtplib.SMTPException("STARTTLS not offered")
        await client.starttls(
            server_hostname=settings.tls_server_name or settings.host,
            tls_context=self._context(member),
            timeout=_left_s(deadline),
        )
        progress.stage = "EHLO after STARTTLS"
        await client.ehlo(timeout=_left_s(deadline))

    def _context(self, member: Member) -> ssl.SSLContext | None:
        cached = self._contexts.get(member.name)
        if cached is None or cached[0] is not member.settings:
            cached = self._contexts[member.name] = (member.settings, client_context(member.settings))
        return cached[1]


async def _cancel_and_wait(tasks: set[asyncio.Task[None]], wait_s: float) -> set[asyncio.Task[None]]:
    """Cancel the tasks and wait up to wait_s for them; returns those still running.

    The cancel is repeated: on Python 3.11, asyncio.wait_for (which aiosmtplib awaits the connect and
    every reply through) drops a cancellation that arrives as the awaited result does (CPython
    gh-86296, fixed in 3.12). A probe that lost its cancel would otherwise run on to its timeout.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    pending = tasks
    while pending and (left_s := deadline - loop.time()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, left_s))
    return pending


def _left_s(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


async def _quit(client: aiosmtplib.SMTP, deadline: float) -> None:
    """Say goodbye within what is left of the probe's time; the answer does not change the verdict."""
    try:
        async with asyncio.timeout_at(deadline):
            await client.quit(timeout=_left_s(deadline))
    except (aiosmtplib.SMTPException, OSError):
        pass  # TimeoutError is an OSError; a server that fumbles QUIT has still proved it is alive


def _describe(error: BaseException, stage: str, timeout_s: float) -> str:
    """A short reason for operators: "connection refused", "421 at greeting", "timeout after 2.0s at EHLO"."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not verified at {stage}: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed at {stage}: {error.reason or error}"
    if isinstance(error, TimeoutError):  # asyncio.timeout's, and aiosmtplib's own timeouts
        return f"timeout after {round(timeout_s, 3)}s at {stage}"
    if isinstance(error, aiosmtplib.SMTPResponseException):
        # A reply at connect can only be the greeting (RFC 5321 3.1 wants 220 there).
        return f"{error.code} at {'greeting' if stage == 'connect' else stage}"
    if isinstance(error, aiosmtplib.SMTPConnectError):
        cause = error.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, aiosmtplib.SMTPServerDisconnected):
            return "connection closed before the greeting"
        return f"cannot connect: {cause or error}"
    if isinstance(error, aiosmtplib.SMTPServerDisconnected):
        return f"connection lost at {stage}"
    return f"{error} at {stage}"
