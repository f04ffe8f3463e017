"""`postmux top`: the dashboard at a glance in a terminal, for operators on SSH.

Polls the admin API's snapshot (GET /api/v1/dashboard, the one the page is built from) and draws it with
rich: the node's name and zone, members, redundancy per pool, where each pool's picks go by zone, the
last minutes' throughput and latency, the busiest queues.
`frame` is a plain function of a snapshot (tested without a terminal); `run` is the loop around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

MINUTES_SHOWN = 10
QUEUES_SHOWN = 10
MEMBER_COLUMNS = (
    "pool",
    "member",
    "zone",
    "state",
    "why",
    "conns",
    "in flight",
    "EWMA ms",
    "errors 5m",
    "ejected",
)
_STATE_STYLE = {"up": "green", "ramping": "cyan", "draining": "yellow"}


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def members_table(members: list[dict[str, Any]]) -> Table:
    table = Table(title="members", expand=True)
    for column in MEMBER_COLUMNS:
        table.add_column(column)
    for m in members:
        state = m["state"]
        rate = m.get("error_rate")
        table.add_row(
            m["pool"],
            m["member"],
            m.get("zone") or "-",
            Text(state, style=_STATE_STYLE.get(state, "bold red")),
            Text("" if state == "up" else str(m.get("why", ""))[:60]),  # a reply: text, not markup
            f"{m['connections']}/{m['max_connections']}",
            str(m["in_flight"]),
            f"{m['ewma_latency_ms']:.1f}",
            "" if rate is None else f"{rate * 100:.1f}%",
            _age(m["ejected_for_s"]) if m["ejected_for_s"] else "",
        )
    return table


def pools_table(pools: list[dict[str, Any]]) -> Table:
    table = Table(title="redundancy (N+1: the pool's busiest minute without its biggest member)", expand=True)
    for column in ("pool", "up", "peak/min", "capacity/min", "without biggest", "N+1"):
        table.add_column(column)
    for p in pools:
        n1 = p["n_plus_1"]
        verdict = (
            Text("-", style="dim") if n1 is None else Text("yes", "green") if n1 else Text("NO", "bold red")
        )
        table.add_row(
            p["pool"],
            f"{p['up']}/{p['members']}",
            str(p["peak_per_min"]),
            f"{p['capacity_per_min']:.0f}",
            f"{p['without_biggest_per_min']:.0f}",
            verdict,
        )
    return table


def routing_words(r: dict[str, Any]) -> Text:
    """Where the node's picks of a pool go by zone (Pool.zone_routing), as the dashboard says it."""
    state = r["state"]
    health = r.get("local_health")
    of = "" if health is None else f" (zone {health:.0%} healthy, threshold {r['local_threshold']:.0%})"
    words = {
        "local": ("all in the zone" + of, "green"),
        "spilling": (f"spilling {1 - (r['local_share'] or 0.0):.0%} of picks to other zones" + of, "yellow"),
        "remote": ("all to other zones" + of, "bold red"),
        "panic": ("panic: every member, whatever its zone", "bold red"),
        "off": ("zone routing off", "dim"),
        "none": ("the node has no zone", "dim"),
    }
    text, style = words.get(state, ("no member usable", "bold red"))
    return Text(text, style=style)


def zones_table(pools: list[dict[str, Any]]) -> Table:
    """Per pool and zone: members up of all, the share of the last minute's attempts; and where the
    node's picks go (its own zone, spilling, ...) on the pool's first row."""
    table = Table(
        title="zones (the node's picks by zone; members up, share of the last minute's attempts)", expand=True
    )
    for column in ("pool", "routing", "zone", "up", "attempts/min", "share"):
        table.add_column(column)
    for p in pools:
        for i, z in enumerate(p["zones"]):
            share = z["share"]
            table.add_row(
                p["pool"] if i == 0 else "",
                routing_words(p["zone_routing"]) if i == 0 else "",
                (z["zone"] or "(no zone)") + (" *" if z["local"] else ""),
                f"{z['up']}/{z['members']}",
                f"{z['attempts_last_min']:g}",
                "" if share is None else f"{share:.0%}",
            )
    table.caption = "* local: the node's zone, and members without a zone"
    return table


def zoned(snapshot: dict[str, Any]) -> bool:
    """Whether zones say anything here: the node has a zone, or some member has one."""
    node_zone = snapshot.get("node", {}).get("zone")
    return node_zone is not None or any(m.get("zone") for m in snapshot["members"])


def header(snapshot: dict[str, Any]) -> Text:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot["now"]))
    node = snapshot.get("node", {})
    where = [node["name"]] if node.get("name") else []
    if node.get("zone") is not None:
        where.append(f"zone {node['zone']}")
    said = f"  {'  '.join(where)}" if where else ""
    return Text(f"postmux top{said}  {stamp}  (Ctrl-C to quit)", style="bold")


def throughput_table(series: dict[str, list[Any]]) -> Table:
    table = Table(title=f"the last {MINUTES_SHOWN} minutes (recipients per minute)", expand=True)
    for column in ("minute (UTC)", "accepted", "delivered", "deferred", "bounced", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for i in range(len(series["t"]) - 1, max(-1, len(series["t"]) - 1 - MINUTES_SHOWN), -1):
        table.add_row(
            time.strftime("%H:%M", time.gmtime(series["t"][i])),
            *(str(series[k][i]) for k in ("accepted", "delivered", "deferred", "bounced")),
            *("" if series[k][i] is None else f"{series[k][i]:g}" for k in ("p50_ms", "p99_ms")),
        )
    return table


def queue_table(queue: dict[str, Any]) -> Table:
    rows = sorted(queue.get("destinations", []), key=lambda d: -d["recipients"])[:QUEUES_SHOWN]
    title = queue.get("error") or (
        f"queue: {queue.get('recipients', 0)} recipients, oldest {_age(queue.get('oldest_age_s', 0.0))}"
    )
    table = Table(title=title, expand=True)
    for column in ("pool", "destination", "recipients", "held", "oldest", "last error"):
        table.add_column(column)
    for d in rows:
        table.add_row(
            d["pool"],
            d["destination"] or d["domain"],
            str(d["recipients"]),
            str(d["held"]),
            _age(d["oldest_age_s"]),
            Text(str(d["last_error"])[:50]),  # a receiver's reply ("[mx1.example.net]"): not markup
        )
    return table


def frame(snapshot: dict[str, Any]) -> Group:
    """One screen of `postmux top` from the admin API's snapshot (the zones only where there are some)."""
    parts: list[RenderableType] = [
        header(snapshot),
        members_table(snapshot["members"]),
        pools_table(snapshot["pools"]),
    ]
    if zoned(snapshot):
        parts.append(zones_table(snapshot["pools"]))
    parts += [throughput_table(snapshot["series"]), queue_table(snapshot.get("queue", {}))]
    return Group(*parts)


def run(fetch: Callable[[], dict[str, Any]], interval_s: float, once: bool, console: Console) -> None:
    """Draw frames until Ctrl-C (KeyboardInterrupt ends it quietly); `once`: one frame, printed."""
    if once:
        console.print(frame(fetch()))
        return
    try:
        with Live(frame(fetch()), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(fetch()), refresh=True)
    except KeyboardInterrupt:
        pass
