"""Event records. One shape for every kind (DESIGN.md: interfaces users see), so consumers stay simple."""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from postmux.reply import Reply


class EventType(enum.StrEnum):
    RECEPTION = "Reception"
    DELIVERY = "Delivery"
    TRANSIENT_FAILURE = "TransientFailure"
    BOUNCE = "Bounce"
    EXPIRATION = "Expiration"
    MEMBER_DOWN = "MemberDown"
    MEMBER_UP = "MemberUp"
    SHAPING_CHANGED = "ShapingChanged"  # a member x destination was suspended, cut or recovered
    HELD = "Held"  # set aside until an operator releases it; the reason in tags.reason


_PREFIX = os.urandom(3).hex()
_SEQ = itertools.count(1)


def _event_id() -> str:
    return f"{_PREFIX}-{next(_SEQ)}"


@dataclass(slots=True)
class Event:
    type: EventType
    id: str = ""  # message (queue) id; empty for member events
    sender: str = ""
    recipient: str = ""
    queue: str = ""
    pool: str = ""
    member: str = ""
    response: Reply | None = None
    num_attempts: int = 0
    latency_s: float | None = None
    size: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    event_id: str = field(default_factory=_event_id)

    def as_record(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "id": self.id,
            "event_id": self.event_id,
            "timestamp": self.timestamp,
            "sender": self.sender,
            "recipient": self.recipient,
            "queue": self.queue,
            "pool": self.pool,
            "member": self.member,
            "response": self.response.as_dict() if self.response else None,
            "num_attempts": self.num_attempts,
            "latency_s": None if self.latency_s is None else round(self.latency_s, 6),
            "size": self.size,
            "tags": self.tags,
        }
