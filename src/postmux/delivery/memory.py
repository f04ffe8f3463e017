"""A transport factory whose members deliver into memory: every recipient accepted, nothing sent.

For tests and benches that measure or check what happens around delivery (accepting, spooling,
balancing, settling) without sockets, as httpx's MockTransport stands in for the network.
`App(settings, transport_factory=MemoryFarm())`; the farm's `delivered` lists what each member took.

It keeps each text whole, tail included (postmux.body), as a test wants to compare it: a bench that
sends large messages through it holds them all in memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from postmux.attempt import AttemptOutcome, Transaction
from postmux.body import BodyUnreadable
from postmux.config import DeliverySettings, MemberSettings
from postmux.delivery.mx import MxResolver
from postmux.reply import Reply

ACCEPTED = Reply(250, "2.0.0", "accepted in memory")


@dataclass(frozen=True, slots=True)
class Delivered:
    """One transaction a memory member took."""

    member: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes  # the whole text: the transaction's data, then its tail's octets


class MemoryFarm:
    """The factory (a TransportFactory): one MemoryTransport per member, all writing to `delivered`."""

    def __init__(self) -> None:
        self.delivered: list[Delivered] = []

    def __call__(
        self,
        member: MemberSettings,
        delivery: DeliverySettings,
        ehlo_hostname: str,
        resolver: MxResolver | None,
    ) -> MemoryTransport:
        return MemoryTransport(member, self)

    def recipients(self, member: str | None = None) -> list[str]:
        """Every recipient delivered (by `member`, or by any), in the order delivered."""
        return [r for d in self.delivered if member in (None, d.member) for r in d.recipients]


class MemoryTransport:
    """A member transport (MemberTransport) that keeps each transaction in its farm's list."""

    def __init__(self, member: MemberSettings, farm: MemoryFarm) -> None:
        self.member = member
        self.farm = farm

    async def deliver(self, work: Transaction, *, per_connection: int | None = None) -> AttemptOutcome:
        recipients = tuple(r.address for r in work.recipients)
        text = work.data
        if work.tail is not None:
            try:
                text += await asyncio.to_thread(work.tail.read)
            except OSError as e:  # as SmtpTransport: the message's fault, a crash of the attempt
                raise BodyUnreadable.of(work.tail, e) from e
        self.farm.delivered.append(Delivered(self.member.name, work.sender, recipients, text))
        replies = {r.rid: ACCEPTED for r in work.recipients}
        return AttemptOutcome(replies=replies, remote=self.member.target)

    def reap_idle(self, now: float) -> None:
        """No connections: nothing to reap."""

    async def close(self) -> None:
        """No connections: nothing to close."""

    def retire(self) -> None:
        """No connections to end."""

    @property
    def connections(self) -> int:
        return 0
