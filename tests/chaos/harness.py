"""The chaos run: many messages through a real `postmux serve`, faulty upstreams, and kill -9 again and again.

One run, in the test's event loop:

- three upstream members (aiosmtpd, tests/support.py) that, phase by phase at random, refuse connections
  (port closed), greet with 421, answer DATA with 451, hang up after DATA (with or without keeping the
  message), or hang until postmux's data_timeout gives up; plus one clean sink for DSNs, which a route
  sends the sender's bounce domain to;
- a sender with `clients` concurrent sessions that sends every message until it gets a 250 or a 5xx;
  after a 4xx, a refused connection or no reply at all it sends the same message again (a new attempt);
- a killer that sends SIGKILL to the postmux process (its own PID) `kills` times, at even steps of the
  sending, preferably while upstreams are inside a DATA transaction, and starts it again on the same spool.

Then it waits until every acked message is delivered or reported and the spool is empty, stops postmux
cleanly, opens the SQLite file, and hands everything to `verdict.judge`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import random
import re
import signal
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from tests.chaos.verdict import ACKED, IN_DOUBT, REFUSED, RETRY, Copy, Dsn, Ledger, Observed, Verdict, judge
from tests.e2e.test_crash import recovered_at_start, start_serve, tail
from tests.support import DROP, DROP_AFTER_STORE, HANG, Received, Upstream, free_port, wait_until

SENDER = "app@bounce.test"  # DSNs come back here: a route sends bounce.test to the DSN sink
BOUNCE_DOMAIN = "bounce.test"
RECIPIENT_DOMAINS = ("dest.test", "other.test")  # two queues in the default pool
DOOMED_MARK = b"X-Chaos-Fate: doomed\r\n"

# How much of the time a member spends in each state; a state lasts 0.3-1 s.
PHASES = {"ok": 40, "refuse": 12, "greet421": 12, "data4xx": 12, "drop": 8, "drop_stored": 4, "hang": 12}
DATA_FAULTS = {"data4xx": "451 4.3.0 chaos: try again later", "drop": DROP, "drop_stored": DROP_AFTER_STORE}
DATA_FAULTS["hang"] = HANG
DATA_FAULT_RATIO = 0.7  # in a faulty phase some transactions still go through

DEFAULT_SEED = 20240521

RECEIVED_HEADER = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
CHAOS_ID = re.compile(rb"^X-Chaos-Id: (\S+)\r$", re.MULTILINE)
CHAOS_ATTEMPT = re.compile(rb"^X-Chaos-Attempt: (\d+)\r$", re.MULTILINE)
MESSAGE_ID = re.compile(rb"^Message-ID: (\S+)\r$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    messages: int
    kills: int
    deadline_s: float  # the whole run, start to verdict; past it the run fails with what it knows
    clients: int = 16
    seed: int = DEFAULT_SEED
    doomed_every: int = 37  # every upstream answers 550: the sender must get exactly one DSN
    oversized_every: int = 89  # larger than max_message_size: postmux must refuse it with 552
    max_message_size: int = 65_536
    spill_bytes: int = 16_384  # texts longer than this go to the spool as files ([smtp] spill_bytes)
    member_connections: int = 4
    bounce_connections: int = 2

    @property
    def max_in_flight(self) -> int:
        return 3 * self.member_connections + self.bounce_connections


@dataclass(slots=True)
class ChaosReport:
    plan: ChaosPlan
    verdict: Verdict
    faults: Counter[str]
    in_flight_at_kills: list[int]
    recovered: list[int]
    elapsed_s: float
    attempts: Counter[str]

    def lines(self) -> list[str]:
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        return [
            self.verdict.summary(),
            self.verdict.details()
            + f" attempts={dict(self.attempts)} in_flight_at_kills={self.in_flight_at_kills}"
            + f" recovered_at_restart={self.recovered} elapsed={self.elapsed_s:.1f}s",
            f"chaos faults: {faults} seed={self.plan.seed}",
        ]


# -- the messages --------------------------------------------------------------------------------------


def fate(plan: ChaosPlan, n: int) -> str:
    if n % plan.doomed_every == 0:
        return "doomed"
    if n % plan.oversized_every == 0:
        return "oversized"
    return "ok"


def build_message(plan: ChaosPlan, n: int, attempt: int) -> bytes:
    """Message n, attempt `attempt`: sizes from ~300 B to ~9 KB, dot-leading lines for transparency; every
    seventh ~13 KB more (the spool keeps it in a segment file), every eleventh ~30 KB more (ingress
    writes it to a file as it arrives, [smtp] spill_bytes), so the chaos runs over every path a text
    takes to disk (issue 12)."""
    chaos_id, to = chaos_id_of(n), recipient_of(n)
    lines = [f"{chaos_id} line {i}: " + "0123456789" * (i % 6) for i in range(4 + (n * 53) % 120)]
    if n % 7 == 3:
        lines += [f"{chaos_id} segment {i}: " + "0123456789" * 7 for i in range(150)]
    elif n % 11 == 4:
        lines += [f"{chaos_id} spilled {i}: " + "0123456789" * 7 for i in range(350)]
    if fate(plan, n) == "oversized":
        lines += ["x" * 76] * (plan.max_message_size // 78 + 10)
    if n % 3 == 0:
        lines.insert(1, ".a line that starts with a dot")
    if n % 5 == 0:
        lines.insert(2, ".")  # would end DATA without dot-stuffing (RFC 5321 4.5.2)
    body = "".join(line + "\r\n" for line in lines)
    return (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: chaos {chaos_id}\r\nMessage-ID: <{chaos_id}@example.com>\r\n"
        f"X-Chaos-Id: {chaos_id}\r\nX-Chaos-Attempt: {attempt}\r\nX-Chaos-Fate: {fate(plan, n)}\r\n\r\n{body}"
    ).encode()


def chaos_id_of(n: int) -> str:
    return f"chaos-{n:05d}"


def recipient_of(n: int) -> str:
    return f"user{n % 50}@{RECIPIENT_DOMAINS[n % 2]}"


# -- the upstreams ---------------------------------------------------------------------------------------


class FaultyMember:
    """An upstream that moves at random between working and failing in one of the ways a relay fails."""

    def __init__(self, name: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.upstream = Upstream(name, self._behaviour)
        self.phase = "ok"
        self.injected: Counter[str] = Counter()

    async def _behaviour(self, upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        doomed = DOOMED_MARK in (envelope.original_content or b"")
        fault = DATA_FAULTS.get(self.phase)
        if fault is not None and self.rng.random() < DATA_FAULT_RATIO:
            self.injected[self.phase] += 1
            # A relay that refuses a message for good does not keep it before hanging up.
            return DROP if doomed and fault == DROP_AFTER_STORE else fault
        if doomed:
            return "550 5.7.1 chaos: refused for good"
        # A relay takes a moment to store a message: the window in which a kill makes a duplicate.
        await asyncio.sleep(self.rng.uniform(0.002, 0.02))
        return None

    async def run_faults(self, calm: asyncio.Event) -> None:
        phases, weights = list(PHASES), list(PHASES.values())
        while not calm.is_set():
            await self._enter(self.rng.choices(phases, weights)[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(calm.wait(), timeout=self.rng.uniform(0.3, 1.0))
        await self._enter("ok")
        for _ in range(50):  # the port may be held for a moment by a client socket that got it
            if self.upstream.listening:
                return
            await asyncio.sleep(0.1)
            await self._enter("ok")

    async def _enter(self, phase: str) -> None:
        self.phase = phase
        self.upstream.greeting_refusal = "421 4.3.2 chaos: not now" if phase == "greet421" else None
        if phase == "refuse":
            if self.upstream.listening:
                self.injected["refuse"] += 1
            self.upstream.close_listener()
        elif not self.upstream.listening:
            # An outgoing socket may have been given this port while it was closed: try again later.
            with contextlib.suppress(OSError):
                await self.upstream.reopen_listener()


# -- postmux ---------------------------------------------------------------------------------------------


class Postmux:
    """One `postmux serve` at a time on one config and spool; every start gets its own log file."""

    def __init__(self, tmp_path: Path, plan: ChaosPlan, members: list[Upstream], bounces: Upstream) -> None:
        self.tmp_path = tmp_path
        self.smtp_port, self.http_port = free_port(), free_port()
        self.spool = tmp_path / "spool.db"
        self.cfg = write_config(tmp_path, plan, self.smtp_port, self.http_port, members, bounces)
        self.logs: list[Path] = []
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.tmp_path / f"serve-{len(self.logs) + 1}.log"
        self.logs.append(log)
        self.proc = await start_serve(self.cfg, log, self.smtp_port)

    async def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), timeout=10)
        assert self.proc.returncode == -signal.SIGKILL

    async def stop(self) -> int:
        """SIGTERM and wait: postmux stops accepting, lets attempts in flight end, closes the spool."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), timeout=30)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    def messages_in_spool(self) -> int:
        """Messages still in the spool (finished ones are deleted), read beside the running process."""
        if not self.spool.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True, timeout=5)) as db:
            (n,) = db.execute("SELECT count(*) FROM message").fetchone()
            (open_rcpts,) = db.execute(
                "SELECT count(*) FROM recipient WHERE state IN ('queued', 'leased')"
            ).fetchone()
        return max(int(n), int(open_rcpts))

    def log_tails(self) -> str:
        return "".join(f"\n--- {log.name} ---\n{tail(log, 15)}" for log in self.logs[-2:])


def write_config(
    tmp_path: Path,
    plan: ChaosPlan,
    smtp_port: int,
    http_port: int,
    members: list[Upstream],
    bounces: Upstream,
) -> Path:
    member_list = ",\n".join(
        f'  {{ name = "{u.name}", address = "{u.address}", max_connections = {plan.member_connections} }}'
        for u in members
    )
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "postmux.test"
max_message_size = {plan.max_message_size}
spill_bytes = {plan.spill_bytes}

[http]
listen = "127.0.0.1:{http_port}"

[spool]
path = "{tmp_path / "spool.db"}"

[events]
log = "{tmp_path / "events.jsonl"}"

# Short waits so that deferred mail comes back within the run.
[retry]
intervals = ["500ms", "1s", "2s"]
max_age = "1h"
jitter = 0.1

# A hung member costs one second, not two minutes.
[delivery]
connect_timeout = "1s"
command_timeout = "1s"
data_timeout = "1s"
max_messages_per_connection = 5
idle_timeout = "2s"

[[pool]]
name = "default"
policy = "round_robin"
members = [
{member_list},
]

[pool.health]
consecutive_failures = 3
base_ejection_time = "1s"
max_ejection_time = "2s"

# AIMD stays on, but a run of 451s cannot take a lane below 10/s. With the default floor of 1/min, a
# second of 451s from a member cuts its lanes to a few per minute (one cut per attempt started after the
# last cut; a restarted process has no accepted rate to hold the cut up), and +1/min per delivery takes
# many minutes to climb back: the run would end at its deadline with the backlog still queued.
[shaping]
min_rate = "600/min"

[[pool]]
name = "bounces"
members = [
  {{ name = "{bounces.name}", address = "{bounces.address}", max_connections = {plan.bounce_connections} }},
]

[[route]]
match = {{ recipient_domain = "{BOUNCE_DOMAIN}" }}
pool = "bounces"
"""
    )
    return cfg


# -- the sender ------------------------------------------------------------------------------------------


@dataclass
class Sender:
    plan: ChaosPlan
    port: int
    ledger: Ledger = field(default_factory=Ledger)
    pending: deque[int] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    finished: int = 0
    accepted: int = 0
    tally: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for n in range(1, self.plan.messages + 1):
            self.pending.append(n)
            self.ledger.ids.append(chaos_id_of(n))
            if fate(self.plan, n) == "doomed":
                self.ledger.doomed.add(chaos_id_of(n))

    @property
    def done(self) -> bool:
        return self.finished >= self.plan.messages

    async def client(self) -> None:
        while not self.done:
            if not self.pending:
                await asyncio.sleep(0.05)  # others hold the last messages; one may come back
                continue
            n = self.pending.popleft()
            attempt = self.attempts[n] = self.attempts.get(n, 0) + 1
            data = build_message(self.plan, n, attempt)
            key = (chaos_id_of(n), attempt)
            self.ledger.sha256[key] = hashlib.sha256(data).hexdigest()
            outcome = self.ledger.outcome[key] = await send_one(self.port, recipient_of(n), data)
            self.tally[outcome] += 1
            if outcome in (ACKED, REFUSED):
                self.finished += 1
                self.accepted += outcome == ACKED
            else:
                self.pending.append(n)
                await asyncio.sleep(0.05)  # do not spin while postmux is down


async def send_one(port: int, recipient: str, data: bytes) -> str:
    """One attempt: ACKED (250), REFUSED (5xx), IN_DOUBT (cut off after DATA), or RETRY."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, local_hostname="client.test", timeout=10, start_tls=False
    )
    try:
        try:
            await client.connect()
            await client.ehlo()
            await client.mail(SENDER)
            await client.rcpt(recipient)
        except aiosmtplib.SMTPResponseException as e:
            return REFUSED if e.code >= 500 else RETRY
        except (aiosmtplib.SMTPException, OSError):
            return RETRY  # DATA was never sent
        try:
            await client.data(data)
        except aiosmtplib.SMTPResponseException as e:
            return REFUSED if e.code >= 500 else RETRY  # a definite reply: nothing was queued
        except (aiosmtplib.SMTPException, OSError):
            return IN_DOUBT  # the connection broke after DATA and before the final reply
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
        return ACKED
    finally:
        client.close()


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class Killer:
    plan: ChaosPlan
    postmux: Postmux
    sender: Sender
    in_flight: Callable[[], int]
    upstreams: list[Upstream]
    at_kills: list[int] = field(default_factory=list)
    # Per upstream, how many messages it had received when each successor process started: the copies
    # before the k-th mark came from processes that the first k kills ended.
    marks: dict[str, list[int]] = field(default_factory=dict)

    def epoch(self, upstream: str, index: int) -> int:
        return bisect.bisect_right(self.marks.get(upstream, []), index)

    async def run(self) -> None:
        rng = random.Random(self.plan.seed)
        for i in range(1, self.plan.kills + 1):
            threshold = self.plan.messages * i // (self.plan.kills + 1)
            await wait_until(lambda t=threshold: self.sender.accepted >= t, timeout=self.plan.deadline_s)
            # The interesting moment is one with deliveries under way; do not wait long for it.
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: self.in_flight() > 0, timeout=1.0, interval=0.001)
            self.at_kills.append(self.in_flight())
            await self.postmux.kill()
            await asyncio.sleep(rng.uniform(0.2, 0.8))  # the sender keeps trying: all refused
            # Marked after the pause, so that data the dead process left in socket buffers is counted as
            # its own (an upstream still reads and stores it after the kill).
            for u in self.upstreams:
                self.marks.setdefault(u.name, []).append(len(u.received))
            await self.postmux.start()
            await asyncio.sleep(0.5)  # let the restarted process get going before the next kill


async def run_chaos(tmp_path: Path, plan: ChaosPlan) -> ChaosReport:
    started = time.monotonic()
    faulty = [FaultyMember(f"relay-{c}", plan.seed + i) for i, c in enumerate("abc")]
    bounces = Upstream("bounces")
    calm = asyncio.Event()
    fault_tasks: list[asyncio.Task[None]] = []
    clients: list[asyncio.Task[None]] = []
    postmux: Postmux | None = None
    try:
        for m in faulty:
            await m.upstream.start()
        await bounces.start()
        upstreams = [m.upstream for m in faulty]
        postmux = Postmux(tmp_path, plan, upstreams, bounces)
        sender = Sender(plan, postmux.smtp_port)
        everyone = [*upstreams, bounces]
        killer = Killer(plan, postmux, sender, lambda: sum(u.active for u in everyone), everyone)
        try:
            async with asyncio.timeout(plan.deadline_s):
                await postmux.start()
                fault_tasks = [asyncio.create_task(m.run_faults(calm)) for m in faulty]
                clients = [asyncio.create_task(sender.client()) for _ in range(plan.clients)]
                await killer.run()
                await asyncio.gather(*clients)
                await wait_until(
                    lambda: all_reported(sender.ledger, upstreams, bounces), plan.deadline_s, 0.2
                )
                calm.set()
                await asyncio.gather(*fault_tasks)
                await wait_until(lambda: postmux.messages_in_spool() == 0, plan.deadline_s, 0.2)
                await asyncio.sleep(1.0)  # strays (a late duplicate) get a moment to show before judging
                returncode = await postmux.stop()
        except TimeoutError:
            raise AssertionError(
                f"chaos run past its {plan.deadline_s:.0f}s deadline: sent {sender.finished}/{plan.messages}"
                f" finished, kills {len(killer.at_kills)}/{plan.kills},"
                f" spool holds {postmux.messages_in_spool()}{postmux.log_tails()}"
            ) from None
        assert returncode == 0, f"postmux did not stop cleanly (exit {returncode}){postmux.log_tails()}"
        seen = observe(upstreams, bounces, plan, killer, postmux.messages_in_spool())
        faults = sum((m.injected for m in faulty), Counter())
        faults["greet421"] = sum(u.refused_greetings for u in upstreams)
        return ChaosReport(
            plan=plan,
            verdict=judge(sender.ledger, seen),
            faults=faults,
            in_flight_at_kills=killer.at_kills,
            recovered=[recovered_at_start(log) for log in postmux.logs[1:]],
            elapsed_s=time.monotonic() - started,
            attempts=sender.tally,
        )
    finally:
        calm.set()
        for task in [*clients, *fault_tasks]:
            task.cancel()
        await asyncio.gather(*clients, *fault_tasks, return_exceptions=True)
        if postmux is not None:
            await postmux.cleanup()
        for u in [*(m.upstream for m in faulty), bounces]:
            await u.stop()


def all_reported(ledger: Ledger, upstreams: list[Upstream], bounces: Upstream) -> bool:
    """Every acked attempt has reached an upstream, or (doomed) the bounce sink as a DSN."""
    seen = {key for u in upstreams for r in u.received if (key := key_of(r.data)) is not None}
    seen |= {key for r in bounces.received if (key := key_of(r.data)) is not None}
    return ledger.keys_with(ACKED) <= seen


def key_of(data: bytes) -> tuple[str, int] | None:
    chaos_id, attempt = CHAOS_ID.search(data), CHAOS_ATTEMPT.search(data)
    if chaos_id is None or attempt is None:
        return None
    return chaos_id.group(1).decode(), int(attempt.group(1))


def observe(
    upstreams: list[Upstream], bounces: Upstream, plan: ChaosPlan, killer: Killer, unfinished: int
) -> Observed:
    copies: list[Copy] = []
    dsns: list[Dsn] = []
    strays = misrouted = 0
    for u in upstreams:
        for i, r in enumerate(u.received):
            if r.sender == "":
                misrouted += 1
            elif (copy := copy_of(u.name, r, killer.epoch(u.name, i))) is not None:
                copies.append(copy)
            else:
                strays += 1
    for i, r in enumerate(bounces.received):
        key, dsn_id = key_of(r.data), MESSAGE_ID.search(r.data)
        if r.sender != "":
            misrouted += 1  # ordinary mail at the DSN sink
        elif key is not None and dsn_id is not None:
            dsns.append(Dsn(key, dsn_id.group(1).decode(), killer.epoch(bounces.name, i)))
        else:
            strays += 1
    kills = len(killer.at_kills)
    return Observed(copies, dsns, strays, kills, plan.max_in_flight, unfinished, misrouted)


def copy_of(member: str, r: Received, epoch: int) -> Copy | None:
    key = key_of(r.data)
    if key is None:
        return None
    prefix = RECEIVED_HEADER.match(r.data)
    body = r.data[prefix.end() :] if prefix else r.data
    prefix_ok = prefix is not None and body.startswith(b"From: ")
    return Copy(member, key, hashlib.sha256(body).hexdigest(), prefix_ok, r.dropped, epoch)
