"""Ready queues: work due now, one FIFO per queue (pool x destination), as KumoMTA's ready queues.

Work arrives straight from the acceptor (the hot path) or from the spool's scan. Its queue is known once
its destination (the shaping key: provider, else domain) is: at once for relay pools (the provider's own
domains), and for source pools only once the domain's MX hosts are known. Until then the work is parked
by (pool, domain), one lookup runs for all of it, and it joins its queue when the answer comes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator

import structlog

from postmux.work import WorkItem

log = structlog.get_logger("postmux.dispatcher")

# The item's destination, or None while it depends on an MX answer not known yet.
DestinationOf = Callable[[WorkItem], str | None]
# Looks a domain's MX hosts up and names the destination they make.
LookUp = Callable[[str], Awaitable[str]]


class ReadyQueues:
    """Work in memory waiting for a member, by queue name; `count` includes the parked work."""

    def __init__(self, destination_of: DestinationOf, look_up: LookUp, wake: Callable[[], None]) -> None:
        self._destination_of = destination_of
        self._look_up_destination = look_up
        self._wake = wake
        self.queues: dict[str, deque[WorkItem]] = {}
        self.count = 0
        # Work for source pools whose domain's MX is being looked up, by (pool, domain).
        self._parked: dict[tuple[str, str], list[WorkItem]] = {}
        self.lookups: set[asyncio.Task[None]] = set()

    def submit(self, items: Iterable[WorkItem], *, front: bool = False) -> None:
        """Queue `items` (at the front: they were taken from it, or another member may take them now)."""
        for item in items:
            if not item.destination:
                destination = self._destination_of(item)
                if destination is None:
                    self._park(item)
                    continue
                item.destination = destination
            q = self.queues.get(item.queue)
            if q is None:
                q = self.queues[item.queue] = deque()
            if front:
                q.appendleft(item)
            else:
                q.append(item)
            self.count += 1
        self._wake()

    def items(self) -> Iterator[WorkItem]:
        """Every item in memory here: queued, and parked for an MX answer."""
        for q in self.queues.values():
            yield from q
        for parked in self._parked.values():
            yield from parked

    def take(self, q: deque[WorkItem]) -> WorkItem:
        """The item at the head of `q`, out of the ready work."""
        self.count -= 1
        return q.popleft()

    def put_back(self, q: deque[WorkItem], item: WorkItem) -> None:
        """Back at the head of `q` (the recipients one transaction could not carry)."""
        q.appendleft(item)
        self.count += 1

    def _park(self, item: WorkItem) -> None:
        key = (item.pool, item.domain)
        self.count += 1
        waiting = self._parked.setdefault(key, [])
        waiting.append(item)
        if len(waiting) == 1:
            task = asyncio.create_task(self._look_up(key), name=f"mx {item.domain}")
            self.lookups.add(task)
            task.add_done_callback(self.lookups.discard)

    async def _look_up(self, key: tuple[str, str]) -> None:
        try:
            destination = await self._look_up_destination(key[1])
        except Exception:  # the attempt will meet the same failure and say what it is
            log.exception("MX lookup crashed", domain=key[1])
            destination = key[1]
        items = self._parked.pop(key, [])
        self.count -= len(items)
        for item in items:
            item.destination = destination
        self.submit(items)
