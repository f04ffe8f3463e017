"""Health verdicts shared by several nodes: when the other nodes' active checks take a member out here.

Each node probes every member itself (balancing/probes.py) and publishes its verdict (after rise/fall)
for a few probe intervals (scheduling/redis_health.py). A member is out of rotation on every node when a
strict majority of the live nodes that probe it find it down, this node included; a node's own verdict
still holds for itself whatever the others say. So:

- one node's broken path (its route, its firewall, its DNS) takes the member out on that node only: the
  others still reach it, and a tie (1 of 2) is no majority;
- a real outage is seen by every node as soon as most of them have seen it, even by a node whose own probe
  has not failed yet (its next probe may be an interval away, then `fall` of them);
- a node that stops publishing (dead, or its checks turned off) drops out of the count when its verdicts
  expire, so the majority is always of the nodes still probing.

A majority, not any one node, because probes see paths as much as members: one node's failing probe
more often says something about that node than about the member. A minority cannot eject a member
everywhere, and no node sends to a member it finds down itself. Passive
health (outlier detection on real attempts, balancing/health.py) stays each node's own: it judges
paths as this node's traffic finds them, and its ejections are short. Cost: a count over the verdicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SharedVerdict:
    """How many of the live nodes that probe a member find it down, this node included."""

    down: int
    nodes: int

    @property
    def out(self) -> bool:
        """A strict majority finds it down: out of rotation on every node."""
        return 2 * self.down > self.nodes

    def __str__(self) -> str:
        return f"{'down' if self.down else 'up'} {self.down if self.down else self.nodes}/{self.nodes} nodes"


def shared_verdict(own: bool | None, others: Iterable[bool]) -> SharedVerdict:
    """The verdict of the nodes that probe a member. `own`: this node's (True: up), None when it has none
    (it does not probe the member, or no probe has finished yet); `others`: each other live node's."""
    verdicts = [*([] if own is None else [own]), *others]
    return SharedVerdict(sum(not up for up in verdicts), len(verdicts))
