"""Webhooks: each endpoint's outbox (in the spool) posted in order, signed (Standard Webhooks), at least once.

One sender per `[[webhook]]` endpoint, in postmux's loop, owned by `Webhooks` (started and stopped by the
App). A sender reads the head of its endpoint's outbox (the rows in the order they were committed, so the
events of one message arrive in the order they happened), posts them as one request (a JSON object, or an
array with batch_size > 1), and only a 2xx moves it on; anything else (a timeout, a connection error, any
other status) is retried, the same batch, after a wait that doubles from min_backoff to max_backoff with
jitter. The head holds back the rest: in order beats fast. An acknowledged batch's rows are removed
without waiting for the disk; a crash before that removal posts them again (receivers deduplicate by the
records' `event_id`, or by `webhook-id`).

Signing follows Standard Webhooks (https://www.standardwebhooks.com, the `standardwebhooks` package):
`webhook-id`, `webhook-timestamp` (the time of this try) and `webhook-signature` (`v1,` base64 of
HMAC-SHA256 over `id.timestamp.body` with the secret's key).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog
from prometheus_client.core import GaugeMetricFamily
from standardwebhooks.webhooks import Webhook

from postmux import __version__
from postmux.config import WebhookSettings
from postmux.events.outbox import Fanout
from postmux.events.types import Event
from postmux.spool.base import OutboxBacklog, OutboxEntry, OutboxRow, SpoolError, WebhookOutbox
from postmux.supervision import Loop

log = structlog.get_logger("postmux.webhooks")

IDLE_POLL_S = 1.0  # an idle sender looks at its outbox this often even unwoken (rows of an earlier run)
READ_AHEAD = 256  # rows read at once: one read serves many requests of one record
ACK_GATHER_S = 0.05  # acknowledgements gathered this long into one removal (one write, not one a request)
# Events whose rows were handed to the spool with their change, remembered until the bus brings them (so
# the subscriber does not append them again); bounded, for rows whose change failed and never came.
WITH_CHANGE_MAX = 100_000
BACKLOG_REFRESH_S = 2.0  # how fresh postmux_webhook_backlog is
STOP_ACKS_S = 2.0  # at stop, how long acknowledgements on their way to the disk may take
# Events the bus brought (member, shaping, blocklist, an operator's bounce) wait this long after the spool
# refused them (PostgreSQL restarting, a locked or full SQLite file) before they are offered again; at most
# LOOSE_MAX of them wait, the oldest dropped first (counted in `loose_dropped`), as the event log keeps lines.
LOOSE_RETRY_S = 1.0
LOOSE_MAX = 100_000

# A request's result, as the metric's label: the status class, or what kept an answer from coming.
Result = str
CountRequest = Callable[[str, Result], None]


class EndpointConfigured(ValueError):
    """A drop asked of an endpoint this node sends to: its records are its sender's."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(f"{endpoint} is configured here: remove its [[webhook]] and restart first")


def backoff_s(failures: int, min_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """The wait before the next try after `failures` failures in a row: min_s doubled each time up to
    max_s, then "equal jitter" (half fixed, half random: AWS Architecture Blog, "Exponential Backoff And
    Jitter"), so endpoints that failed together do not come back together and the wait still grows."""
    ceiling = min(max_s, min_s * 2.0 ** min(failures - 1, 60))
    return ceiling / 2 + ceiling / 2 * rand()


def webhook_id(batch: Sequence[OutboxEntry]) -> str:
    """The request's id, the same on every retry of the batch: the record's event_id, or for a batch the
    first record's and how many follow it."""
    if len(batch) == 1:
        return batch[0].event_id
    return f"{batch[0].event_id}_{len(batch)}"


def body_of(batch: Sequence[OutboxEntry], as_array: bool) -> str:
    """The records as they were stored (never re-encoded): one object, or an array of them."""
    if not as_array:
        return batch[0].record
    return "[" + ",".join(entry.record for entry in batch) + "]"


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>` (the standardwebhooks package)."""
    return Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body)


def shown_url(url: str) -> str:
    """The URL without a password it may carry (http://user:secret@host/...): for the admin API and CLI."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


@dataclass
class EndpointState:
    """What `postmux webhooks` shows of a sender, since this process started."""

    last_success: float | None = None
    last_error: str = ""
    last_error_at: float | None = None
    failures: int = 0  # in a row, on the batch at the head
    next_try_at: float | None = None
    acknowledged: int = 0  # records


class EndpointSender:
    """Posts one endpoint's outbox in order, one request at a time, until each is acknowledged."""

    def __init__(
        self,
        settings: WebhookSettings,
        store: WebhookOutbox,
        client: httpx.AsyncClient,
        count: CountRequest,
        clock: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.count = count
        self.clock = clock
        self.rand = rand
        self.state = EndpointState()
        self.cursor = 0  # the last seq posted and acknowledged (its removal may still be on its way)
        self._ahead: list[OutboxEntry] = []  # rows read after the cursor, not posted yet
        self._wake = asyncio.Event()
        self._acks: list[int] = []
        self._acking: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        # From the last acknowledged row: after a crash (the Supervisor starts this again) the batch that
        # was being posted is read and posted again, not skipped (rows read ahead are read again).
        self._ahead = []
        while True:
            batch = await self._next_batch()
            await self._post_until_acknowledged(batch)
            self.cursor = batch[-1].seq
            self._ack([entry.seq for entry in batch])

    async def _next_batch(self) -> list[OutboxEntry]:
        """The head of the outbox: a full batch, or a smaller one once its oldest row waited batch_wait."""
        size, wait_s = self.settings.batch_size, self.settings.batch_wait
        while True:
            if len(self._ahead) < size:
                self._wake.clear()  # before reading: a commit after the read wakes the wait below
                await self._read_ahead(max(size, READ_AHEAD) - len(self._ahead))
            ahead = self._ahead
            full = len(ahead) >= size or wait_s <= 0
            if ahead and (full or ahead[0].created + wait_s <= self.clock()):
                batch, self._ahead = ahead[:size], ahead[size:]
                return batch
            left = ahead[0].created + wait_s - self.clock() if ahead else IDLE_POLL_S
            await _wait(self._wake, min(left, IDLE_POLL_S))

    async def _read_ahead(self, limit: int) -> None:
        after = self._ahead[-1].seq if self._ahead else self.cursor
        try:
            self._ahead += await self.store.outbox_head(self.name, after, limit)
        except SpoolError as e:
            log.error("webhook outbox unreadable", endpoint=self.name, error=str(e))

    async def _post_until_acknowledged(self, batch: list[OutboxEntry]) -> None:
        body = body_of(batch, self.settings.batch_size > 1)
        message_id = webhook_id(batch)
        state = self.state
        while True:
            result, error = await self._post(message_id, body)
            self.count(self.name, result)
            now = self.clock()
            if error is None:
                state.last_success, state.failures, state.next_try_at = now, 0, None
                state.acknowledged += len(batch)
                return
            state.failures += 1
            state.last_error, state.last_error_at = error, now
            delay = backoff_s(state.failures, self.settings.min_backoff, self.settings.max_backoff, self.rand)
            state.next_try_at = now + delay
            if state.failures == 1 or state.failures % 10 == 0:
                log.warning(
                    "webhook request failed; retrying",
                    endpoint=self.name,
                    error=error,
                    failures=state.failures,
                    retry_in_s=round(delay, 3),
                )
            await asyncio.sleep(delay)

    async def _post(self, message_id: str, body: str) -> tuple[Result, str | None]:
        """One try: ("2xx", None) acknowledges; else the result's label and what went wrong."""
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": f"postmux/{__version__}",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
        }
        secret = self.settings.signing_secret
        if secret is not None:
            headers["webhook-signature"] = sign(secret, message_id, timestamp, body)
        timeout_s = self.settings.timeout
        try:
            # httpx's timeout is per phase (connect, each read); this one bounds the whole request.
            async with asyncio.timeout(timeout_s):
                response = await self.client.post(
                    self.settings.url, content=body.encode("utf-8"), headers=headers, timeout=timeout_s
                )
        except (TimeoutError, httpx.TimeoutException):
            return "timeout", f"no answer within {timeout_s:g}s"
        except httpx.HTTPError as e:
            return "error", f"{type(e).__name__}: {e}"[:300]
        status = response.status_code
        if 200 <= status < 300:
            return "2xx", None
        return f"{status // 100}xx", f"HTTP {status}: {response.text[:200]}"

    def _ack(self, seqs: list[int]) -> None:
        """Remove acknowledged rows, coalesced, without holding up the next request."""
        self._acks.extend(seqs)
        if self._acking is None or self._acking.done():
            self._acking = asyncio.create_task(self._flush_acks(), name=f"webhook-ack-{self.name}")

    async def _flush_acks(self) -> None:
        await asyncio.sleep(ACK_GATHER_S)
        while self._acks:
            seqs, self._acks = self._acks, []
            try:
                await self.store.outbox_ack(self.name, seqs)
            except SpoolError as e:
                # Still in the outbox: posted again after a restart (at least once, never lost).
                log.warning("webhook acknowledgement not recorded", endpoint=self.name, error=str(e))

    async def finish_acks(self, timeout_s: float) -> None:
        if self._acking is not None and not self._acking.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._acking), timeout_s)


class Webhooks:
    """The configured endpoints: the fan-out of events into their outboxes (an EventOutbox for the accept
    path and the dispatcher; a bus subscriber for member and shaping events), their senders, their state.

    With no endpoint configured it writes nothing, starts nothing and costs nothing.
    """

    def __init__(
        self,
        endpoints: Sequence[WebhookSettings],
        store: WebhookOutbox,
        count: CountRequest | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        node: str = "",
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.store = store
        self.count: CountRequest = count or (lambda endpoint, result: None)
        self.clock = clock
        self.rand = rand
        self.fanout = Fanout(self.endpoints, clock, node)  # node: the name stamped on events (Event.node)
        self.senders: dict[str, EndpointSender] = {}
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loose: list[OutboxRow] = []  # events that came only by the bus, waiting to be appended
        self._with_change: dict[str, None] = {}  # event_ids whose rows went with their change
        self._loose_ready = asyncio.Event()
        self.loose_failures = 0  # appends of loose rows the spool refused (each tried again)
        self.loose_dropped = 0  # loose rows given up: more than LOOSE_MAX waited
        self._backlog: dict[str, OutboxBacklog] = {}

    # -- the EventOutbox the accept path and the dispatcher use ----------------------------------------

    def rows(self, events: Sequence[Event]) -> Sequence[OutboxRow]:
        rows = self.fanout.rows(events)
        if rows:
            remembered = self._with_change
            remembered.update(dict.fromkeys(row.event_id for row in rows))
            while len(remembered) > WITH_CHANGE_MAX:
                del remembered[next(iter(remembered))]
        return rows

    def committed(self) -> None:
        for sender in self.senders.values():
            sender.wake()

    async def commit(self, events: Sequence[Event]) -> None:
        rows = self.rows(events)
        if rows:
            await self.store.outbox_append(rows)
            self.committed()

    # -- the bus subscriber: events that came with no change of the spool --------------------------------

    def __call__(self, event: Event) -> None:
        """Append an event no caller handed to the spool (member and shaping events, or a path that does
        not commit its events' rows): a moment late, so a crash in that moment can lose it."""
        if not self.fanout.wants(event.type):
            return
        if event.event_id in self._with_change:
            del self._with_change[event.event_id]  # already in the outbox, with its change
            return
        self._loose.extend(self.fanout.rows([event]))
        self._loose_ready.set()

    async def _append_loose(self) -> None:
        failing = False
        while True:
            await self._loose_ready.wait()
            self._loose_ready.clear()
            rows, self._loose = self._loose, []
            try:
                await self.store.outbox_append(rows)
            except SpoolError as e:
                # A spool that refuses now (a PostgreSQL restart, a locked or full file) will most likely take
                # them soon: they wait, in order, ahead of any that came meanwhile.
                self.loose_failures += 1
                self._keep_loose(rows)
                if not failing:
                    log.error("webhook events not appended; trying again", rows=len(rows), error=str(e))
                failing = True
                await asyncio.sleep(LOOSE_RETRY_S)
                self._loose_ready.set()
                continue
            if failing:
                log.info("webhook events appended again", rows=len(rows))
                failing = False
            self.committed()

    def _keep_loose(self, rows: list[OutboxRow]) -> None:
        self._loose[:0] = rows
        over = len(self._loose) - LOOSE_MAX
        if over > 0:
            del self._loose[:over]
            self.loose_dropped += over
            log.error("webhook events dropped: too many waiting for the spool", dropped=over)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self, run: Callable[[str, Loop], asyncio.Task[None]] | None = None) -> None:
        """`run` starts each loop as a task (the App's Supervisor, which starts a crashed one again; the
        mail does not depend on these, so they never stop the node); by default a plain task."""
        if not self.endpoints:
            return
        run = run or (lambda name, loop: asyncio.create_task(loop(), name=name))
        # trust_env off: no proxy or .netrc from the environment slips into where events go.
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        for endpoint in self.endpoints:
            if endpoint.signing_secret is None:
                log.warning("webhook requests are not signed: no secret", endpoint=endpoint.name)
            sender = EndpointSender(endpoint, self.store, self._client, self.count, self.clock, self.rand)
            self.senders[endpoint.name] = sender
            self._tasks.append(run(f"webhook-{endpoint.name}", sender.run))
        self._tasks.append(run("webhook-append", self._append_loose))
        self._tasks.append(run("webhook-backlog", self._refresh_backlog))

    async def stop(self) -> None:
        """Cancel the senders (a request in flight is posted again at the next start), let removals of
        acknowledged rows reach the disk for a moment, then close the client."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._loose:
            rows, self._loose = self._loose, []
            with contextlib.suppress(SpoolError):
                await self.store.outbox_append(rows)
        await asyncio.gather(*(s.finish_acks(STOP_ACKS_S) for s in self.senders.values()))
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- what is shown ---------------------------------------------------------------------------------

    async def _refresh_backlog(self) -> None:
        while True:
            try:
                self._backlog = {b.endpoint: b for b in await self.store.outbox_backlog()}
            except SpoolError as e:
                log.warning("webhook backlog count failed", error=str(e))
            await asyncio.sleep(BACKLOG_REFRESH_S)

    async def status(self) -> list[dict[str, Any]]:
        """Each endpoint: backlog, oldest pending age, last success, last error (`postmux webhooks`).

        Endpoints no longer configured that still have rows are listed too (configured: false): their
        rows wait for an endpoint of that name to come back.
        """
        backlog = {b.endpoint: b for b in await self.store.outbox_backlog()}
        self._backlog = backlog
        now = self.clock()
        out = [self._describe(e.name, shown_url(e.url), backlog.get(e.name), now) for e in self.endpoints]
        configured = {e.name for e in self.endpoints}
        out += [self._describe(n, "", b, now) for n, b in sorted(backlog.items()) if n not in configured]
        return out

    async def drop(self, endpoint: str) -> int:
        """Delete the records of an endpoint that is no longer configured (`postmux webhooks --drop`), and
        say how many went: no sender posts them, and they would wait for that name for ever. A configured
        endpoint's are its sender's: refused (EndpointConfigured)."""
        if endpoint in {e.name for e in self.endpoints}:
            raise EndpointConfigured(endpoint)
        dropped = await self.store.outbox_drop(endpoint)
        self._backlog.pop(endpoint, None)
        log.warning("webhook records dropped by the operator", endpoint=endpoint, records=dropped)
        return dropped

    def _describe(self, name: str, url: str, backlog: OutboxBacklog | None, now: float) -> dict[str, Any]:
        sender = self.senders.get(name)
        state = sender.state if sender is not None else EndpointState()

        def age(at: float | None) -> float | None:
            return None if at is None else round(max(0.0, now - at), 3)

        return {
            "endpoint": name,
            "url": url,
            "configured": bool(url),
            "backlog": backlog.rows if backlog else 0,
            "oldest_pending_age_s": age(backlog.oldest_created) if backlog else None,
            "last_success": state.last_success,
            "last_success_age_s": age(state.last_success),
            "last_error": state.last_error,
            "last_error_age_s": age(state.last_error_at),
            "failures_in_a_row": state.failures,
            "next_try_in_s": None
            if state.next_try_at is None
            else round(max(0.0, state.next_try_at - now), 3),
            "acknowledged": state.acknowledged,
        }

    def gauges(self) -> Iterable[GaugeMetricFamily]:
        """postmux_webhook_backlog{endpoint}: rows waiting, as last counted (every BACKLOG_REFRESH_S)."""
        backlog = GaugeMetricFamily(
            "postmux_webhook_backlog",
            "Event records waiting to be posted, per webhook endpoint",
            labels=["endpoint"],
        )
        names = [e.name for e in self.endpoints] + sorted(
            set(self._backlog) - {e.name for e in self.endpoints}
        )
        for name in names:
            b = self._backlog.get(name)
            backlog.add_metric([name], b.rows if b else 0)
        return [backlog]
