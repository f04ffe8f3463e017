"""The event bus: synchronous fan-out to subscribers that must not block (they buffer their own I/O)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from postmux.events.types import Event

Subscriber = Callable[[Event], None]
log = structlog.get_logger("postmux.events")


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                # A broken consumer must never stop mail from flowing.
                log.exception("event subscriber failed", subscriber=repr(subscriber))
