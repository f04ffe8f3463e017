"""Which events go to which webhook endpoint: the fan-out into the spool's outbox rows (deciding, no I/O).

The promise (docs/webhooks.md): an event about an accepted message is never lost, kill -9 included. So
its outbox rows are committed no later than the change the event reports, in the same transaction: the
acceptor hands the Reception rows to `Spool.store`, the dispatcher a verdict's rows to `Spool.settle`
beside its settlements. Neither knows the endpoints; each asks an `EventOutbox` for the rows of its
events, and tells it once they are committed so the senders look at once.

Events that only go through the bus (member and shaping events, and any another path emits without
handing their rows to the spool) are appended by the bus subscriber a moment after they happen: never
dropped, but a crash in that moment can lose one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

from postmux.config import WebhookSettings
from postmux.events.types import Event, EventType
from postmux.spool.base import OutboxRow


class EventOutbox(Protocol):
    """What the accept path and the dispatcher ask for the webhook rows of their events."""

    def rows(self, events: Sequence[Event]) -> Sequence[OutboxRow]:
        """The rows to commit with the change `events` report: one per event per endpoint that asked for
        its type. Empty when no endpoint wants any of them (always, with no webhook configured): then
        nothing is written and nothing is serialised. Cost: one JSON encoding per event wanted."""
        ...

    def committed(self) -> None:
        """Rows given out by `rows` were just committed: the senders look at their outboxes now."""
        ...

    async def commit(self, events: Sequence[Event]) -> None:
        """The rows of events that no change of the queue carries (a complaint report read at accept),
        committed on their own: durable on return. Raises SpoolError when they could not be."""
        ...


class NoOutbox:
    """No webhook: no rows, nothing to tell."""

    def rows(self, events: Sequence[Event]) -> Sequence[OutboxRow]:
        return ()

    def committed(self) -> None:
        pass

    async def commit(self, events: Sequence[Event]) -> None:
        pass


NO_OUTBOX = NoOutbox()


def record_text(event: Event) -> str:
    """The event's record as the JSON-lines log writes it (events/log.py): one shape everywhere."""
    return event.as_json()


class Fanout:
    """The endpoints' event filters: for each event, the endpoints that asked for its type."""

    def __init__(
        self, endpoints: Sequence[WebhookSettings], clock: Callable[[], float] = time.time, node: str = ""
    ) -> None:
        self.clock = clock
        self.node = node  # stamped on events that have no node yet: rows are made before the bus sees them
        self._by_type: dict[EventType, list[str]] = defaultdict(list)
        for endpoint in endpoints:
            for name in endpoint.events:
                self._by_type[EventType(name)].append(endpoint.name)

    def wants(self, kind: EventType) -> bool:
        return kind in self._by_type

    def rows(self, events: Sequence[Event]) -> list[OutboxRow]:
        if not self._by_type:
            return []
        out: list[OutboxRow] = []
        now = self.clock()
        for event in events:
            names = self._by_type.get(event.type)
            if not names:
                continue
            if not event.node:
                event.node = self.node
            text = record_text(event)  # once, whatever the number of endpoints
            out.extend(OutboxRow(name, event.event_id, text, now) for name in names)
        return out
