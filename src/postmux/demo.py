"""`postmux demo`: a whole farm in one process, to see balancing, retries and durability at work.

Three upstream relays run on loopback in this event loop (fast, slow, flaky), postmux sits in front of
them, and a client sends mail through it. What the upstreams actually received is the ground truth:
"lost" is computed from it, never from postmux's own view of itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from postmux.app import App
from postmux.config import Settings, settings_from_dict
from postmux.events.types import EventType
from postmux.testing import Behaviour, Upstream, accept, delay, fail_ratio

HOST = "127.0.0.1"  # the demo never leaves loopback, and never resolves a name
ID_HEADER = "X-Demo-Id"
SENDER = "demo@example.com"
CLIENT_SESSIONS = 20
MESSAGE_SIZE = 1500
DESTINATION_DOMAINS = 4
DELIVERY_TIMEOUT_S = 120.0
SLOW_DELAY_S = 0.05
FLAKY_RATIO = 0.2
FLAKY_REPLY = "451 4.3.0 try again later"

# -- the upstream relays ----------------------------------------------------------------------------


@dataclass
class DemoUpstream:
    """A member of the demo's farm: a loopback relay (postmux.testing), its weight, and what it does."""

    upstream: Upstream
    weight: int
    about: str

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def address(self) -> str:
        return self.upstream.address

    @property
    def received(self) -> list[str]:
        """The X-Demo-Id of every message this relay accepted, in order."""
        return self.upstream.header_values(ID_HEADER)


def relay(name: str, behaviour: Behaviour) -> Upstream:
    return Upstream(name, behaviour, HOST, hostname=f"{name}.demo.test", index_headers=[ID_HEADER])


def make_farm() -> list[DemoUpstream]:
    return [
        DemoUpstream(relay("fast", accept), 3, "accepts at once"),
        DemoUpstream(
            relay("slow", delay(SLOW_DELAY_S)), 1, f"waits {SLOW_DELAY_S * 1000:.0f} ms before answering DATA"
        ),
        # Seeded, so two runs defer the same share of attempts and are comparable.
        DemoUpstream(
            relay("flaky", fail_ratio(FLAKY_RATIO, FLAKY_REPLY, seed=7)),
            1,
            f"answers 451 to ~{FLAKY_RATIO:.0%} of DATA",
        ),
    ]


@contextlib.asynccontextmanager
async def running_farm() -> AsyncIterator[list[DemoUpstream]]:
    farm = make_farm()
    try:
        for member in farm:
            await member.upstream.start()
        yield farm
    finally:
        for member in farm:
            await member.upstream.stop()


def received_ids(farm: list[DemoUpstream]) -> set[str]:
    return {i for u in farm for i in u.received}


def describe_farm(farm: list[DemoUpstream]) -> str:
    members = ", ".join(f"{u.name} {u.address} (weight {u.weight}, {u.about})" for u in farm)
    return f"farm: postmux -> weighted pool 'default' of {members}"


# -- settings -----------------------------------------------------------------------------------------


def clean_workdir(workdir: Path) -> None:
    """Each demo starts empty: leftover work in an old spool would be recovered and skew the counts."""
    workdir.mkdir(parents=True, exist_ok=True)
    for old in [*workdir.glob("spool.db*"), workdir / "events.jsonl"]:
        old.unlink(missing_ok=True)


def demo_settings(farm: list[DemoUpstream], workdir: Path) -> Settings:
    # A member's connections should match its weight: a member at max_connections is skipped (as in nginx and
    # HAProxy), so a weight-3 member with a third of the connections it needs would get less than its share.
    members = [
        {"name": u.name, "address": u.address, "weight": u.weight, "max_connections": 10 * u.weight}
        for u in farm
    ]
    return settings_from_dict(
        {
            "smtp": {"listen": f"{HOST}:0", "hostname": "postmux.demo.test"},
            "http": {"listen": f"{HOST}:0"},
            "spool": {"path": str(workdir / "spool.db")},
            "events": {"log": str(workdir / "events.jsonl")},
            # A deferral comes back after a second, so the flaky member's 451s do not stretch the demo.
            "retry": {"intervals": ["1s"], "jitter": 0, "max_age": "1h"},
            "pool": [{"name": "default", "policy": "weighted", "members": members}],
        },
        path="<demo>",
    )


# -- the sending client -------------------------------------------------------------------------------


def demo_message(n: int, demo_id: str, recipient: str) -> bytes:
    head = (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: postmux demo {n}\r\n{ID_HEADER}: {demo_id}\r\n"
        f"Message-ID: <{demo_id}@example.com>\r\n\r\n"
    )
    line = "The quick brown fox jumps over the lazy dog, and postmux carries it on.\r\n"
    lines = max(1, (MESSAGE_SIZE - len(head)) // len(line))
    return (head + line * lines).encode()


def recipient_for(n: int) -> str:
    return f"user{n}@dest{n % DESTINATION_DOMAINS}.test"


@dataclass
class Tally:
    """What the client saw (accepted ids, refusals) and when each phase ended, for the rates."""

    accepted: set[str] = field(default_factory=set)
    refused: int = 0
    started: float = 0.0
    sent: float = 0.0
    delivered: float = 0.0
    complete: bool = False


async def send_one(client: aiosmtplib.SMTP, n: int, tally: Tally) -> None:
    demo_id = f"demo-{n:06d}"
    recipient = recipient_for(n)
    try:
        await client.sendmail(SENDER, [recipient], demo_message(n, demo_id, recipient))
    except aiosmtplib.SMTPResponseException:
        # Refused is not lost: postmux said no, so the client still owns the message.
        tally.refused += 1
        return
    # sendmail raises on anything but 250 to DATA, so reaching here is a 250.
    tally.accepted.add(demo_id)


async def client_session(port: int, numbers: Iterator[int], tally: Tally) -> None:
    """One SMTP session sending until no numbers are left; the sessions share one iterator."""
    # local_hostname: aiosmtplib would otherwise ask the resolver for this machine's name (getfqdn).
    async with aiosmtplib.SMTP(
        hostname=HOST, port=port, start_tls=False, local_hostname="client.demo.test"
    ) as client:
        for n in numbers:
            await send_one(client, n, tally)


async def send_all(port: int, messages: int, tally: Tally) -> None:
    numbers = iter(range(messages))
    await asyncio.gather(*(client_session(port, numbers, tally) for _ in range(CLIENT_SESSIONS)))
    tally.sent = time.monotonic()


# -- watching -----------------------------------------------------------------------------------------


def delivered_ids(tally: Tally, farm: list[DemoUpstream]) -> set[str]:
    return tally.accepted & received_ids(farm)


async def wait_for_delivery(tally: Tally, farm: list[DemoUpstream], timeout_s: float) -> None:
    """Until every accepted id reached some upstream, or `timeout_s` passed (tally.complete says which)."""
    deadline = time.monotonic() + timeout_s
    while not tally.accepted <= received_ids(farm) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    tally.complete = tally.accepted <= received_ids(farm)
    tally.delivered = time.monotonic()


class ProgressView:
    """Two bars, accepted and delivered, redrawn from the tally and the upstreams (not from postmux)."""

    def __init__(self, console: Console, messages: int, tally: Tally, farm: list[DemoUpstream]) -> None:
        self.tally = tally
        self.farm = farm
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._accepted = self.progress.add_task("accepted ", total=messages)
        self._delivered = self.progress.add_task("delivered", total=messages)

    def refresh(self) -> None:
        self.progress.update(self._accepted, completed=len(self.tally.accepted))
        self.progress.update(self._delivered, completed=len(delivered_ids(self.tally, self.farm)))

    async def follow(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(0.1)


async def run_traffic(app: App, messages: int, farm: list[DemoUpstream], console: Console) -> Tally:
    """Send every message and wait for its delivery, under a progress bar."""
    tally = Tally(started=time.monotonic())
    view = ProgressView(console, messages, tally, farm)
    with view.progress:
        follower = asyncio.create_task(view.follow())
        try:
            await send_all(app.smtp_port, messages, tally)
            await wait_for_delivery(tally, farm, DELIVERY_TIMEOUT_S)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            view.refresh()  # the final counts, not those of the last tick
    return tally


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class MemberStats:
    delivered: int = 0
    deferred: int = 0
    latencies_s: list[float] = field(default_factory=list)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def member_stats(records: Iterable[dict[str, Any]], names: list[str]) -> dict[str, MemberStats]:
    stats = {name: MemberStats() for name in names}
    for record in records:
        member = stats.get(record["member"])
        if member is None:
            continue  # member events, and deferrals when no member was usable
        if record["type"] == EventType.DELIVERY:
            member.delivered += 1
            if record["latency_s"] is not None:
                member.latencies_s.append(record["latency_s"])
        elif record["type"] == EventType.TRANSIENT_FAILURE:
            member.deferred += 1
    return stats


def percentile_ms(values: list[float], q: float) -> str:
    """Nearest-rank percentile, in ms; '-' when there is nothing to rank."""
    if not values:
        return "-"
    ranked = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ranked)))
    return f"{ranked[rank - 1] * 1000:.1f}"


def stats_table(stats: dict[str, MemberStats]) -> Table:
    table = Table(title="deliveries per member (accept -> upstream 250)")
    for column in ("member", "delivered", "deferred", "p50 ms", "p99 ms", "share"):
        table.add_column(column, justify="left" if column == "member" else "right")
    total = sum(s.delivered for s in stats.values()) or 1
    for name, s in stats.items():
        table.add_row(
            name,
            str(s.delivered),
            str(s.deferred),
            percentile_ms(s.latencies_s, 50),
            percentile_ms(s.latencies_s, 99),
            f"{100 * s.delivered / total:.1f}%",
        )
    return table


def rate(count: int, since: float, until: float) -> float:
    return count / max(until - since, 1e-9)


def report(console: Console, tally: Tally, farm: list[DemoUpstream], events: Path) -> int:
    """Print the table and the totals; returns how many accepted messages no upstream received."""
    console.print(stats_table(member_stats(read_events(events), [u.name for u in farm])))
    received = [i for u in farm for i in u.received]
    delivered = delivered_ids(tally, farm)
    lost = len(tally.accepted - delivered)
    duplicates = len(received) - len(set(received))
    totals = f"accepted: {len(tally.accepted)}  delivered: {len(delivered)}  lost: {lost}"
    if duplicates:
        totals += f"  duplicates: {duplicates}"
    if tally.refused:
        totals += f"  refused: {tally.refused}"
    console.print(totals, style="bold red" if lost else "bold green")
    console.print(
        f"accept rate: {rate(len(tally.accepted), tally.started, tally.sent):.0f} msgs/s  "
        f"end-to-end rate: {rate(len(delivered), tally.started, tally.delivered):.0f} msgs/s"
    )
    if not tally.complete:
        # Undelivered is not gone: the work stays in the spool and is recovered at the next start.
        console.print(
            f"[red]gave up waiting for delivery after {DELIVERY_TIMEOUT_S:.0f} s;"
            " what was not delivered stays in the spool[/red]"
        )
    return lost


# -- the whole demo -----------------------------------------------------------------------------------


async def run_demo(messages: int, workdir: Path) -> None:
    """Start the farm and postmux, send `messages` through, report; SystemExit(1) if any mail was lost."""
    console = Console()
    clean_workdir(workdir)
    async with running_farm() as farm:
        settings = demo_settings(farm, workdir)
        console.print(describe_farm(farm))
        async with App(settings) as app:
            tally = await run_traffic(app, messages, farm, console)
        # Read the log only once the app has stopped: stopping lets attempts in flight settle and
        # flushes the log, so every Delivery behind what the upstreams received is in it.
        lost = report(console, tally, farm, Path(settings.events.log))
    if lost:
        raise SystemExit(1)
