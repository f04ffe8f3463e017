"""The event bus: synchronous fan-out to subscribers that must not block (they buffer their own I/O)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from postmux.events.types import Event

Subscriber = Callable[[Event], None]
log = structlog.get_logger("postmux.events")


class EventBus:
    """`node`: the emitting node's name, stamped on each event that has none yet (Event.node)."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        if not event.node:
            event.node = self.node
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                # A broken consumer must never stop mail from flowing.
                log.exception("event subscriber failed", subscriber=repr(subscriber))
