"""Gauges an operator's Prometheus reads from the node's state at scrape time: the queue by pool and
destination (depth and oldest age), the shaping lanes (limits now, suspensions).

The queue is read from the spool every QUEUE_EVERY_S by the node's queue counter (app.py), not at each
scrape: a summary reads the whole queue index (bench/README.md, queue_scale), a scrape must stay cheap.
Labels are bounded: the MAX_DESTINATIONS busiest (pool, destination) pairs, the rest summed as
destination="other"; lanes are counted by state per member, and only a suspended lane is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily

from postmux.admin.control import Control
from postmux.admin.queue import criteria

log = structlog.get_logger("postmux.gauges")

QUEUE_EVERY_S = 15.0
MAX_DESTINATIONS = 50


def by_destination(
    rows: Iterable[dict[str, Any]], keep: int = MAX_DESTINATIONS
) -> dict[tuple[str, str], Any]:
    """The queue summary's (pool, domain) rows as (pool, destination) -> [recipients, oldest age]; past
    `keep` pairs, the smaller ones of each pool are summed into destination "other"."""
    totals: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        key = (row["pool"], row["destination"] or row["domain"])
        got = totals.setdefault(key, [0, 0.0])
        got[0] += row["recipients"]
        got[1] = max(got[1], row["oldest_age_s"])
    if len(totals) <= keep:
        return totals
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    kept = dict(ranked[: keep - 1])
    for (pool, _), (n, age) in ranked[keep - 1 :]:
        other = kept.setdefault((pool, "other"), [0, 0.0])
        other[0] += n
        other[1] = max(other[1], age)
    return kept


class NodeGauges:
    def __init__(self, control: Control, clock: Callable[[], float], every_s: float = QUEUE_EVERY_S) -> None:
        self.control = control
        self.clock = clock
        self.every_s = every_s
        self._queue: dict[tuple[str, str], Any] = {}
        self._queue_read_at = -math.inf

    async def refresh_queue(self) -> None:
        """Read the queue summary again when `every_s` has passed (the queue counter calls it)."""
        now = self.clock()
        if now - self._queue_read_at < self.every_s:
            return
        self._queue_read_at = now
        try:
            summary = await self.control.queue.summary(criteria({}))
        except Exception as e:
            log.warning("queue summary for the metrics failed", error=str(e))
            return
        self._queue = by_destination(summary["destinations"])

    def collect(self) -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "postmux_queue_destination_recipients",
            f"Recipients queued, leased or held per pool and destination (read every {QUEUE_EVERY_S:.0f} s)",
            labels=["pool", "destination"],
        )
        oldest = GaugeMetricFamily(
            "postmux_queue_oldest_age_seconds",
            "Age of the oldest message with a recipient still to deliver, per pool and destination",
            labels=["pool", "destination"],
        )
        for (pool, destination), (n, age) in sorted(self._queue.items()):
            depth.add_metric([pool, destination], n)
            oldest.add_metric([pool, destination], age)
        return [depth, oldest, *self._lanes()]

    def _lanes(self) -> list[GaugeMetricFamily]:
        lanes = GaugeMetricFamily(
            "postmux_lanes",
            "Shaping lanes (member x destination) by state",
            labels=["pool", "member", "state"],
        )
        cut = GaugeMetricFamily(
            "postmux_lanes_cut",
            "Lanes whose connections or rate an AIMD reaction has cut below their configured limit",
            labels=["pool", "member"],
        )
        suspended = GaugeMetricFamily(
            "postmux_lane_suspended_seconds",
            "Time left on a suspended lane's suspension",
            labels=["pool", "member", "destination"],
        )
        states: dict[tuple[str, str, str], int] = {}
        cuts: dict[tuple[str, str], int] = {}
        for lane in self.control.shaping():
            key = (lane["pool"], lane["member"])
            states[(*key, lane["state"])] = states.get((*key, lane["state"]), 0) + 1
            below = lane["connections"] < lane["max_connections"] or (
                lane["max_rate_per_min"] is not None
                and lane["rate_per_min"] is not None
                and lane["rate_per_min"] < lane["max_rate_per_min"]
            )
            cuts[key] = cuts.get(key, 0) + below
            if lane["suspended_for_s"] > 0:
                suspended.add_metric([*key, lane["destination"]], lane["suspended_for_s"])
        for labels, n in sorted(states.items()):
            lanes.add_metric(list(labels), n)
        for labels2, n in sorted(cuts.items()):
            cut.add_metric(list(labels2), n)
        return [lanes, cut, suspended]
