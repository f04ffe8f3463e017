"""The member transport seam: one SMTP transaction, one reply per recipient, reported as facts.

A transport says what happened (postmux.attempt.AttemptOutcome: the replies, where the attempt broke off)
and never what it means for the member: the pool classifies the facts (Pool.observe) and the verdicts
decide what becomes of the mail.
"""

from __future__ import annotations

from typing import Protocol

from postmux.attempt import AttemptOutcome, Transaction


class MemberTransport(Protocol):
    async def deliver(self, transaction: Transaction, *, per_connection: int | None = None) -> AttemptOutcome:
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
