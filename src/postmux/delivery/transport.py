"""The member transport seam: one SMTP transaction for one work item, one reply per recipient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from postmux.reply import Reply
from postmux.spool.base import WorkItem


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt gave: a reply per recipient id, and whether the member as a whole failed.

    `member_failed` is true for local failures (refused, timeout, dropped connection) and for replies to
    the connection as a whole (a 421, a 4xx to MAIL FROM): those count against the member's health,
    while a reply about one recipient does not.
    """

    replies: dict[int, Reply]
    member_failed: bool
    remote: str


class MemberTransport(Protocol):
    async def deliver(self, work: WorkItem) -> AttemptOutcome:
        """Run one transaction; never raises for anything the network or the server does."""
        ...

    def reap_idle(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout (in the background)."""
        ...

    async def close(self) -> None:
        """QUIT every idle connection; called at shutdown after attempts in flight have ended."""
        ...

    @property
    def connections(self) -> int:
        """Open connections, busy and idle."""
        ...
