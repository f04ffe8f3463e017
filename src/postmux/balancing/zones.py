"""Placement by zone: a node keeps its mail on members of its own zone, on Envoy's zone aware routing.

A farm spread over sites (zones: a site, a rack, a region) sends from each node through the members of the
node's own zone while that zone is healthy enough, and spills to the other zones only as far as it must:

- while at least `local_threshold` of the local zone's capacity (its members' weight, within the tier
  being used) is healthy, every pick stays local;
- below that, the local zone keeps `healthy / local_threshold` of the picks, so each of its healthy
  members takes at most 1 / local_threshold of its usual load (Envoy keeps the load per host level the
  same way), and the overflow goes to the other zones, spread over them by the pool's policy (in
  proportion to their healthy capacity for the weighted policies);
- below `local_minimum`, or with no healthy local member, the other zones take all of it.

Envoy compares the share of callers in the zone with the share of upstream hosts in it; a postmux node
does not know how the other nodes are spread, so the local zone's own health stands in for that ratio:
each node expects its zone's members to carry its mail, and hands on what they cannot.

Members without a zone belong to every zone (they are as near as anything); a node without a zone, a tier
with no member of another zone, and a pool in panic (Envoy likewise) make no split at all: the pool picks
as it does without zones. Plain functions of the members' state, worked out when health changes
(Pool._current), never per pick: a pick then costs one comparison, or one random draw while spilling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from postmux.balancing.member import Member
from postmux.config import ZoneRoutingSettings


@dataclass(frozen=True, slots=True)
class ZoneSplit:
    """The usable members of one tier, by where they are, and the share of picks the local side gets."""

    local: list[Member]  # usable members in the node's zone, and those without a zone
    remote: list[Member]  # usable members in other zones; never empty (else there is no split)
    local_share: float  # 1.0: every pick stays local; 0.0: every pick goes to other zones
    local_health: float = 1.0  # the healthy share of the local zone's capacity in the tier (for operators)

    def first(self, draw: float) -> tuple[list[Member], list[Member]]:
        """The side to pick from, then the side to spill to; `draw` is uniform in [0, 1)."""
        if draw < self.local_share:
            return self.local, self.remote
        return self.remote, self.local


def is_local(member: Member, zone: str) -> bool:
    """A member in the node's zone, or in none (then it is as near to every node)."""
    where = member.zone
    return where is None or where == zone


def local_share(healthy_weight: float, total_weight: float, settings: ZoneRoutingSettings) -> float:
    """The share of picks the local zone keeps, from its healthy and its whole capacity (weights)."""
    if healthy_weight <= 0 or total_weight <= 0:
        return 0.0
    health = min(1.0, healthy_weight / total_weight)
    if health < settings.local_minimum:
        return 0.0
    if health >= settings.local_threshold:
        return 1.0
    return health / settings.local_threshold


def split(
    usable: Sequence[Member], tier: Sequence[Member], zone: str | None, settings: ZoneRoutingSettings
) -> ZoneSplit | None:
    """How a node in `zone` divides the `usable` (healthy) members of a tier; None: no preference.

    `tier` is every member of that tier that would be in service when healthy (removed and zero-weight
    members left out): a draining or unhealthy local member is capacity the zone has lost.
    """
    if zone is None or not settings.enabled:
        return None
    local = [m for m in usable if is_local(m, zone)]
    if len(local) == len(usable):
        return None  # nowhere else to go (or everyone is here): as without zones
    remote = [m for m in usable if not is_local(m, zone)]
    total = sum(m.weight for m in tier if is_local(m, zone))
    healthy = sum(m.weight for m in local)
    health = min(1.0, healthy / total) if total > 0 else 0.0
    return ZoneSplit(local, remote, local_share(healthy, total, settings), health)


# Where a node's picks of a pool go, in a word: local (all in its zone), spilling (part to other zones),
# remote (all to other zones), panic (every member, whatever its zone), off ([pool.zone_routing] enabled
# = false), none (the node has no zone), down (no member usable in any zone).
RoutingState = Literal["local", "spilling", "remote", "panic", "off", "none", "down"]


@dataclass(frozen=True, slots=True)
class ZoneRouting:
    """Where a node's picks of one pool go now, for the operator (the dashboard, `postmux top`)."""

    state: RoutingState
    local_share: float | None = None  # of the picks, kept in the node's zone (None: no zone preference)
    local_health: float | None = None  # healthy share of the zone's capacity, while the tier is split
    local_threshold: float | None = None  # the zone spills below this health ([pool.zone_routing])


def routing(
    zone: str | None,
    settings: ZoneRoutingSettings,
    usable: Sequence[Member],
    zones: ZoneSplit | None,
    panic: bool,
) -> ZoneRouting:
    """The state of a pool's choice (its usable members, their split, panic), told for an operator.

    Read off what the pool worked out when health last changed: a pick never calls it."""
    if zone is None:
        return ZoneRouting("none")
    if not settings.enabled:
        return ZoneRouting("off")
    if not usable:
        return ZoneRouting("down")
    if panic:
        return ZoneRouting("panic")
    threshold = settings.local_threshold
    if zones is None:  # every usable member is local (or without a zone): nowhere else to go
        return ZoneRouting("local", 1.0, None, threshold)
    share = zones.local_share
    state: RoutingState = "local" if share >= 1.0 else "remote" if share <= 0.0 else "spilling"
    return ZoneRouting(state, share, zones.local_health, threshold)
