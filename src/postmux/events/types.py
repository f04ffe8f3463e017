"""Event records. One shape for every kind (DESIGN.md: interfaces users see), so consumers stay simple."""

from __future__ import annotations

import enum
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from postmux.reply import Reply
from postmux.text import readable


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
    # The node's shared limits went to its own share of each (Redis unreachable) or back to Redis;
    # tags.state ("fallback" | "redis"), tags.reason, tags.live_nodes.
    THROTTLES_BACKEND_CHANGED = "ThrottlesBackendChanged"
    COMPLAINT = "Complaint"  # a recipient reported the message as spam (an ARF report, RFC 5965)
    # An ARF report that calls the message no abuse (tags.feedback_type: not-spam, auth-failure, other, ...):
    # told, never a complaint (reputation/returns.py is_complaint); no suppression, no breaker count.
    FEEDBACK = "Feedback"
    BLOCKLIST_CHANGED = "BlocklistChanged"  # a sending IP or domain listed or delisted (tags: subject, zone)
    # A recipient on the suppression list, accepted and dropped ([suppression] action = "drop"): never sent.
    SUPPRESSED = "Suppressed"
    # A recipient asked for no more mail from a sender domain (RFC 8058 one-click, ingress/unsubscribe.py):
    # recipient, sender_domain, the copy's id and message_id; the suppression list consumes it.
    UNSUBSCRIBE = "Unsubscribe"


_PREFIX = os.urandom(3).hex()
_SEQ = itertools.count(1)


def _event_id() -> str:
    return f"{_PREFIX}-{next(_SEQ)}"


# For what orjson refuses (see compact_json); one encoder, as json.dumps given any argument builds one a call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(record: dict[str, Any]) -> str:
    """`record` as one line of compact JSON, UTF-8 as it is, every string valid Unicode.

    orjson: 0.6 µs a Delivery record where the standard library's encoder took 6.7, and the main thread
    spent 8% less CPU a message at 1.5 KB (bench/README.md, issue 12). It refuses two things the standard
    encoder writes: an integer past 64 bits, and text with lone surrogates, which is how octets that are not
    UTF-8 arrive (a client's HELO name, decoded by aiosmtpd with surrogateescape). Those records go through
    the standard encoder with each such octet made U+FFFD: a line no UTF-8 file or webhook body refuses.
    """
    try:
        return orjson.dumps(record).decode()
    except TypeError:
        return _ENCODER.encode(_readable(record))


def _readable(value: Any) -> Any:
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, dict):
        return {readable(str(k)): _readable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_readable(v) for v in value]
    return value


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
    # Labels: postmux's own about this event (reason, tls, ...) and the sender's about the message (the
    # API's `tags`, X-Postmux-Tag: name=value), the event's own winning a clash. Short; never metric labels.
    tags: dict[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    event_id: str = field(default_factory=_event_id)
    # What the sender attached to the message (the API's `metadata`, X-Postmux-Meta: name=value): opaque,
    # returned as given on every event of the message.
    metadata: dict[str, str] = field(default_factory=dict)
    message_id: str = ""  # the Message-ID header field, as the sender wrote it (without <>)
    created: float | None = None  # when the message was accepted
    source_ip: str = ""  # the address the attempt left from (direct-to-MX members), else ""
    mx_host: str = ""  # the host connected to: the MX's name, or the relay member's address
    peer: str = ""  # the peer's IP address and port as connected
    bounce_class: str = ""  # the class of a failure reply (the reputation work fills it; "" until then)
    # Reception only: who handed the message in.
    client: str = ""
    helo: str = ""
    auth_user: str = ""
    # Unsubscribe only: the sender domain the recipient unsubscribed from (the token's scope).
    sender_domain: str = ""
    # The member's zone ([[pool]] members' zone) on member and attempt events; "" when it has none.
    zone: str = ""
    # The node that emitted the event ([node] name, else its host's name): set by the node's bus and its
    # webhook fan-out, whichever sees the event first (events/bus.py), so the emitters need not know it.
    node: str = ""

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
            "metadata": self.metadata,
            "message_id": self.message_id,
            "created": self.created,
            "queue_time_s": None
            if self.created is None
            else round(max(0.0, self.timestamp - self.created), 6),
            "source_ip": self.source_ip,
            "mx_host": self.mx_host,
            "peer": self.peer,
            "bounce_class": self.bounce_class,
            "zone": self.zone,
            "node": self.node,
            **(
                {"client": self.client, "helo": self.helo, "auth_user": self.auth_user}
                if self.type is EventType.RECEPTION
                else {}
            ),
            **({"sender_domain": self.sender_domain} if self.type is EventType.UNSUBSCRIBE else {}),
        }

    def as_json(self) -> str:
        """The record as one line of compact JSON (UTF-8 as it is): the event log's and the webhooks'."""
        return compact_json(self.as_record())
