"""The member transport seam: one SMTP transaction for one work item, one reply per recipient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from postmux.balancing.health import FailureKind
from postmux.reply import Reply
from postmux.spool.base import WorkItem


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt gave: a reply per recipient id, and whether it counts against the member.

    `failure` is LOCAL for refused, timed out or dropped connections, REPLY_4XX when the member answered
    but took nothing (only 4xx replies, a 421 at any step, a refusing greeting), and None otherwise: a
    5xx about one recipient is a verdict on the address, not on the member.
    """

    replies: dict[int, Reply]
    failure: FailureKind | None
    remote: str
    # The replies were made up here (no connection, timeout, DNS), not said by the receiver: shaping's
    # reactions and AIMD listen only to what receivers say.
    local: bool = False
    # The connection's TLS: "TLSv1.3 TLS_AES_256_GCM_SHA384", "none" for plaintext, "" when none was made.
    tls: str = ""
    # This member cannot take this message (its server lacks a needed extension, SMTPUTF8): the replies
    # are permanent only if no other member can take it either; the dispatcher decides which.
    unfit: bool = False

    @property
    def member_failed(self) -> bool:
        return self.failure is not None


def judge(replies: dict[int, Reply]) -> FailureKind | None:
    """Whether a completed transaction counts against the member: only 4xx back, or a 421 anywhere."""
    values = list(replies.values())
    if values and (all(r.is_transient for r in values) or any(r.code == 421 for r in values)):
        return FailureKind.REPLY_4XX
    return None


class MemberTransport(Protocol):
    async def deliver(self, work: WorkItem, *, per_connection: int | None = None) -> AttemptOutcome:
        """Run one transaction; never raises for anything the network or the server does.

        `per_connection` caps messages per connection for this attempt's destination (shaping).
        """
        ...

    def reap_idle(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout (in the background)."""
        ...

    async def close(self) -> None:
        """QUIT every idle connection; called at shutdown after attempts in flight have ended."""
        ...

    def retire(self) -> None:
        """No more reuse: connections are closed as their attempts end (a reload replaced this transport)."""
        ...

    @property
    def connections(self) -> int:
        """Open connections, busy and idle."""
        ...
