"""Delivery to an upstream relay over reused SMTP connections (aiosmtplib)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiosmtplib
import structlog

from postmux.balancing.health import FailureKind
from postmux.config import DeliverySettings, MemberSettings
from postmux.delivery.transport import AttemptOutcome, judge
from postmux.reply import Reply
from postmux.spool.base import WorkItem

log = structlog.get_logger("postmux.delivery")

# A lost connection says nothing about the message: these are transient, local replies (RFC 3463 4.4.x).
_LOCAL_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError)


def local_reply(error: BaseException, where: str) -> Reply:
    if isinstance(error, aiosmtplib.SMTPConnectTimeoutError | aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Reply(451, "4.4.2", f"timeout {where}")
    if isinstance(error, aiosmtplib.SMTPConnectError | ConnectionRefusedError):
        return Reply(451, "4.4.1", f"connection refused {where}")
    return Reply(451, "4.4.2", f"connection lost {where}: {error}".rstrip(": "))


@dataclass(slots=True)
class _Connection:
    client: aiosmtplib.SMTP
    messages: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class _ConnectionLost(Exception):
    def __init__(self, error: BaseException, stage: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.stage = stage


class RelayTransport:
    """Delivers to one upstream relay, keeping up to max_connections reusable connections."""

    def __init__(self, member: MemberSettings, delivery: DeliverySettings, ehlo_hostname: str) -> None:
        self.member = member
        self.delivery = delivery
        self.ehlo_hostname = ehlo_hostname
        self.max_messages = member.max_messages_per_connection or delivery.max_messages_per_connection
        self._idle: list[_Connection] = []
        self._busy = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._retired = False

    @property
    def connections(self) -> int:
        return self._busy + len(self._idle)

    async def deliver(self, work: WorkItem) -> AttemptOutcome:
        self._busy += 1
        try:
            if self._idle:
                # A reused connection the server has dropped meanwhile fails at MAIL before anything was
                # said about this message: not the member's fault, so try once more on a fresh one.
                outcome = await self._attempt(self._idle.pop(), work, fresh_retry_allowed=True)
                if outcome is not None:
                    return outcome
            try:
                conn = await self._connect()
            except (aiosmtplib.SMTPException, *_LOCAL_ERRORS) as e:
                reply = self._connect_reply(e)
                kind = (
                    FailureKind.REPLY_4XX
                    if isinstance(e, aiosmtplib.SMTPResponseException)
                    else FailureKind.LOCAL
                )
                return self._all(work, reply, kind)
            outcome = await self._attempt(conn, work, fresh_retry_allowed=False)
            assert outcome is not None
            return outcome
        finally:
            self._busy -= 1

    async def _attempt(
        self, conn: _Connection, work: WorkItem, *, fresh_retry_allowed: bool
    ) -> AttemptOutcome | None:
        try:
            return await self._deliver_on(conn, work)
        except _ConnectionLost as lost:
            conn.client.close()
            if fresh_retry_allowed and lost.stage == "at MAIL FROM":
                return None
            where = f"{lost.stage} with {self.member.address}"
            return self._all(work, local_reply(lost.error, where), FailureKind.LOCAL)

    def _connect_reply(self, error: BaseException) -> Reply:
        if isinstance(error, aiosmtplib.SMTPResponseException) and error.code >= 400:
            # A 421 or 554 greeting: the server is up but will not take mail now.
            return Reply.parse(error.code if error.code < 500 else 451, error.message)
        return local_reply(error, f"connecting to {self.member.address}")

    async def _connect(self) -> _Connection:
        client = aiosmtplib.SMTP(
            hostname=self.member.host,
            port=self.member.port,
            local_hostname=self.ehlo_hostname,
            timeout=self.delivery.command_timeout,
            start_tls=False,
        )
        await client.connect(timeout=self.delivery.connect_timeout)
        try:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # RFC 5321 3.2: a server that does not know EHLO still knows HELO
        except BaseException:
            client.close()
            raise
        return _Connection(client)

    async def _deliver_on(self, conn: _Connection, work: WorkItem) -> AttemptOutcome:
        replies = await self._transaction(conn, work)
        conn.messages += 1
        if conn.client.is_connected and conn.messages < self.max_messages and not self._retired:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._quit(conn)
        return AttemptOutcome(replies, judge(replies), self.member.address)

    async def _transaction(self, conn: _Connection, work: WorkItem) -> dict[int, Reply]:
        client = conn.client
        try:
            encoding = "utf-8" if work.smtputf8 else "ascii"
            await client.mail(work.sender, options=self._mail_options(client, work), encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as e:
            await self._reset(client)
            reply = Reply.parse(e.code, e.message)
            return {r.rid: reply for r in work.recipients}
        except _LOCAL_ERRORS as e:
            raise _ConnectionLost(e, "at MAIL FROM") from e
        replies: dict[int, Reply] = {}
        accepted = []
        for r in work.recipients:
            try:
                await client.rcpt(r.address, encoding="utf-8" if work.smtputf8 else "ascii")
                accepted.append(r.rid)
            except aiosmtplib.SMTPRecipientRefused as e:
                replies[r.rid] = Reply.parse(e.code, e.message)
            except _LOCAL_ERRORS as e:
                raise _ConnectionLost(e, "at RCPT TO") from e
        if not accepted:
            await self._reset(client)
            return replies
        try:
            response = await client.data(work.data, timeout=self.delivery.data_timeout)
            reply = Reply.parse(response.code, response.message)
        except aiosmtplib.SMTPDataError as e:
            reply = Reply.parse(e.code, e.message)
            await self._reset(client)
        except _LOCAL_ERRORS as e:
            raise _ConnectionLost(e, "during DATA") from e
        for rid in accepted:
            replies[rid] = reply
        return replies

    @staticmethod
    def _mail_options(client: aiosmtplib.SMTP, work: WorkItem) -> list[str]:
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(work.data)}")
        # RFC 6152: say so when the body is not 7-bit, where the server offers 8BITMIME.
        if client.supports_extension("8bitmime") and not work.data.isascii():
            options.append("BODY=8BITMIME")
        if work.smtputf8 and client.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        return options

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS):
            client.close()

    def _all(self, work: WorkItem, reply: Reply, failure: FailureKind) -> AttemptOutcome:
        return AttemptOutcome({r.rid: reply for r in work.recipients}, failure, self.member.address)

    def _quit(self, conn: _Connection) -> None:
        task = asyncio.create_task(self._quit_now(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit_now(self, conn: _Connection) -> None:
        if not conn.client.is_connected:
            conn.client.close()
            return
        try:
            await conn.client.quit(timeout=5)
        except (aiosmtplib.SMTPException, *_LOCAL_ERRORS):
            conn.client.close()

    def reap_idle(self, now: float) -> None:
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= self.delivery.idle_timeout or not conn.client.is_connected:
                self._quit(conn)
            else:
                keep.append(conn)
        self._idle = keep

    def retire(self) -> None:
        self._retired = True

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._quit(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
