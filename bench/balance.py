"""Balancing under trouble: four policies, three upstreams (fast, slow, flaky), one timeline.

    .venv/bin/python bench/balance.py [--policies round_robin,least_latency] [--rate 150] [--keep]

For each policy a fresh postmux (`App`, in a child process of its own, on uvloop) sits in front of three
aiosmtpd upstreams that run, with the load generator, in this process:

- fast: answers DATA at once;
- slow: answers DATA after 100 ms;
- flaky: t=0-6 s answers 451 to 20% of DATA (seeded), t=6 s refuses connections (listener and open
  sessions closed), t=12 s listens again on the same port but never answers DATA (greeting, EHLO, NOOP,
  MAIL and RCPT still work), t=18 s restarts healthy (hung sessions closed, as a restart would).

The load is 150 msgs/s for 30 s over 15 SMTP sessions, each message with a unique X-Bench-Id. What the
upstreams received is the ground truth for delivered, lost and duplicates. Latency (accept -> upstream
250) comes from postmux's Delivery events; the start of every attempt is recorded by a thin wrapper
around each member's transport inside the postmux process, because events carry only the end of an
attempt. The table goes to stdout, everything to bench/out/balance-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop

from postmux.testing import HANG, Behaviour, Upstream, accept, always, delay, fail_ratio

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
HOST = "127.0.0.1"  # loopback only, and never a name to resolve
ID_HEADER = "X-Bench-Id"
SENDER = "bench@example.com"
POLICIES = ("round_robin", "weighted", "least_connections", "least_latency")
MEMBERS = ("fast", "slow", "flaky")
FLAKY = "flaky"
SLOW_DELAY_S = 0.1
FLAKY_RATIO = 0.2
FLAKY_SEED = 7
FLAKY_REPLY = "451 4.3.0 try again later"
# The flaky member's timeline, in seconds after the load starts.
REFUSE_AT_S = 6.0
HANG_AT_S = 12.0
HEALTHY_AT_S = 18.0
MESSAGE_SIZE = 1500
DESTINATION_DOMAINS = 4
RAMP_BINS = 12  # one-second bins of the flaky member's share after it is healthy again
STARTUP_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 30.0  # after the last message is sent, wait at most this long for every delivery
STOP_TIMEOUT_S = 30.0
LAG_TICK_S = 0.02
LATENCY_DECAY_S = 10.0  # postmux's default [pool] latency_decay, which this bench does not change


class BenchError(Exception):
    """The benchmark could not complete a run; the message says what was seen."""


@dataclass(frozen=True)
class Options:
    policies: tuple[str, ...]
    rate: float
    duration_s: float
    sessions: int
    keep: bool

    @property
    def messages(self) -> int:
        return int(self.rate * self.duration_s)


# -- event-loop lag, in both processes: a saturated loop inflates every latency ------------------------


class LagMonitor:
    """Sleeps LAG_TICK_S again and again and records how late each wake-up was."""

    def __init__(self) -> None:
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            self.lags_s.append(max(0.0, loop.time() - before - LAG_TICK_S))

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {
            "p50_ms": 1000 * percentile(self.lags_s, 50),
            "p99_ms": 1000 * percentile(self.lags_s, 99),
            "max_ms": 1000 * max(self.lags_s, default=0.0),
        }


# -- the postmux side (child process) ---------------------------------------------------------------


class RecordingTransport:
    """A MemberTransport that notes when each attempt starts and ends, then defers to the real one."""

    def __init__(self, inner: Any, member: str, attempts: list[dict[str, Any]]) -> None:
        self.inner = inner
        self.member = member
        self.attempts = attempts

    async def deliver(self, work: Any, *, per_connection: int | None = None) -> Any:
        start = time.time()
        result = "crash"
        try:
            outcome = await self.inner.deliver(work, per_connection=per_connection)
            result = "ok" if outcome.failure is None else str(outcome.failure)
            return outcome
        finally:
            self.attempts.append(
                {"member": self.member, "start": start, "end": time.time(), "result": result}
            )

    def reap_idle(self, now: float) -> None:
        self.inner.reap_idle(now)

    async def close(self) -> None:
        await self.inner.close()

    def retire(self) -> None:
        self.inner.retire()

    @property
    def connections(self) -> int:
        return int(self.inner.connections)


def postmux_settings(policy: str, addresses: dict[str, str], workdir: Path) -> dict[str, Any]:
    members = [
        {"name": name, "address": addresses[name], "weight": 1, "max_connections": 10} for name in MEMBERS
    ]
    return {
        "smtp": {"listen": f"{HOST}:0", "hostname": "postmux.bench.test"},
        "http": {"listen": f"{HOST}:0"},
        "spool": {"path": str(workdir / "spool.db")},
        "events": {"log": str(workdir / "events.jsonl")},
        "retry": {"intervals": ["1s"], "jitter": 0, "max_age": "1h"},
        "delivery": {"connect_timeout": "1s", "command_timeout": "2s", "data_timeout": "2s"},
        "pool": [
            {
                "name": "default",
                "policy": policy,
                "members": members,
                "check": {"enabled": True, "interval": "500ms", "timeout": "500ms", "rise": 2, "fall": 2},
                "health": {"consecutive_failures": 3, "base_ejection_time": "2s", "max_ejection_time": "10s"},
                "slow_start": "5s",
            }
        ],
    }


def child_main(settings: dict[str, Any], workdir: str, conn: Connection) -> None:
    """Entry point of the postmux process: run the App until the parent says stop."""
    from postmux.logs import configure_logging

    log_file = Path(workdir, "postmux.log").open("a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    configure_logging(file=log_file)
    uvloop.run(_child(settings, Path(workdir), conn))


async def _child(settings_data: dict[str, Any], workdir: Path, conn: Connection) -> None:
    from postmux.app import App
    from postmux.config import settings_from_dict

    settings = settings_from_dict(settings_data, "<bench>")
    attempts: list[dict[str, Any]] = []
    app = App(settings)
    # The dispatcher looks transports up in this same dict at every attempt, so wrapping here is enough.
    for key, transport in list(app.transports.items()):
        app.transports[key] = RecordingTransport(transport, key[1], attempts)
    lag = LagMonitor()
    cpu_before = _cpu_s()
    async with app:
        lag.start()
        conn.send(("ready", app.smtp_port))
        while not await asyncio.to_thread(conn.poll, 0.5):
            pass  # the parent bounds the whole run and kills this process if it never says stop
        conn.recv()
        loop_lag = await lag.stop()
    (workdir / "attempts.json").write_text(json.dumps(attempts))
    conn.send(("done", {"cpu_s": _cpu_s() - cpu_before, "loop_lag": loop_lag}))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.asynccontextmanager
async def postmux_process(settings: dict[str, Any], workdir: Path) -> AsyncIterator[tuple[int, Connection]]:
    """Start the postmux child, yield (smtp port, pipe); always ended by PID, SIGKILL as a last resort.

    Every wait on the child runs in a thread: this loop serves the upstreams, whose health checks and
    deliveries must not stall while we wait.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=child_main, args=(settings, str(workdir), child), name="postmux")
    proc.start()
    stopped = False
    try:
        if not await asyncio.to_thread(parent.poll, STARTUP_TIMEOUT_S):
            raise BenchError(f"postmux not ready after {STARTUP_TIMEOUT_S:.0f}s; see {workdir}/postmux.log")
        kind, port = parent.recv()
        assert kind == "ready"
        yield int(port), parent
        stopped = True
    finally:
        # On the happy path the child has said "done" and exits by itself; otherwise end it now.
        await asyncio.to_thread(proc.join, STOP_TIMEOUT_S if stopped else 0.1)
        if proc.is_alive():
            print(f"postmux pid {proc.pid} still running: SIGTERM", file=sys.stderr)
            proc.terminate()
            await asyncio.to_thread(proc.join, 10)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 10)


def stop_postmux(conn: Connection) -> dict[str, Any]:
    """Ask the child to stop (it drains, writes attempts.json) and wait for its figures; run in a thread."""
    conn.send("stop")
    if not conn.poll(STOP_TIMEOUT_S):
        raise BenchError(f"postmux did not stop within {STOP_TIMEOUT_S:.0f}s")
    kind, info = conn.recv()
    assert kind == "done"
    return dict(info)


# -- the upstreams (this process) -------------------------------------------------------------------


def relay(name: str, behaviour: Behaviour) -> Upstream:
    """A loopback upstream (postmux.testing) that notes each message's X-Bench-Id as it arrives."""
    # SMTPUTF8 off, as aiosmtpd has it by default: the relays this bench measured before were plain aiosmtpd.
    return Upstream(
        name, behaviour, HOST, hostname=f"{name}.bench.test", smtputf8=False, index_headers=[ID_HEADER]
    )


def start_behaviours() -> dict[str, Behaviour]:
    """Each member's behaviour at t=0; fresh for every run, so the flaky member's 451s repeat run to run."""
    return {
        "fast": accept,
        "slow": delay(SLOW_DELAY_S),
        FLAKY: fail_ratio(FLAKY_RATIO, FLAKY_REPLY, FLAKY_SEED),
    }


def received_with_times(upstream: Upstream) -> list[tuple[str, float]]:
    """(bench id, when the 250 was sent) of every message the upstream accepted."""
    return list(zip(upstream.header_values(ID_HEADER), (r.at for r in upstream.received), strict=True))


async def flaky_timeline(flaky: Upstream, t0: float, marks: dict[str, float]) -> None:
    """refuse at REFUSE_AT_S, hang at HANG_AT_S (same port), healthy at HEALTHY_AT_S (restarted)."""
    await _sleep_until(t0 + REFUSE_AT_S)
    await flaky.stop()  # listener and open sessions closed, as a crash would
    marks["refuse"] = time.time()
    await _sleep_until(t0 + HANG_AT_S)
    flaky.behaviour = always(HANG)  # never answers DATA; postmux's data_timeout gives up first
    await flaky.reopen_listener()
    marks["hang"] = time.time()
    await _sleep_until(t0 + HEALTHY_AT_S)
    await flaky.stop()
    flaky.behaviour = accept
    await flaky.reopen_listener()
    marks["healthy"] = time.time()


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time()))


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    accepted: dict[str, float] = field(default_factory=dict)  # bench id -> when the client saw 250
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    behind_s: float = 0.0  # how far the sender fell behind its schedule at worst


def bench_message(n: int, bench_id: str, recipient: str) -> bytes:
    head = (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: balance {n}\r\n{ID_HEADER}: {bench_id}\r\n"
        f"Message-ID: <{bench_id}@example.com>\r\n\r\n"
    )
    line = "The quick brown fox jumps over the lazy dog, and postmux carries it on.\r\n"
    return (head + line * max(1, (MESSAGE_SIZE - len(head)) // len(line))).encode()


async def session(port: int, numbers: Iterator[int], t0: float, rate: float, tally: Tally) -> None:
    """One SMTP session sending scheduled messages until none are left; the sessions share `numbers`."""
    # local_hostname: aiosmtplib would otherwise ask the resolver for this machine's name (getfqdn).
    client = aiosmtplib.SMTP(
        hostname=HOST, port=port, start_tls=False, local_hostname="client.bench.test", timeout=10
    )
    await client.connect()
    try:
        for n in numbers:
            due = t0 + n / rate
            late = time.time() - due
            tally.behind_s = max(tally.behind_s, late)
            if late < 0:
                await asyncio.sleep(-late)
            bench_id = f"b{n:06d}"
            recipient = f"user{n}@dest{n % DESTINATION_DOMAINS}.test"
            try:
                await client.sendmail(SENDER, [recipient], bench_message(n, bench_id, recipient))
            except aiosmtplib.SMTPResponseException:
                tally.refused += 1  # refused is not lost: the client still owns the message
                continue
            except aiosmtplib.SMTPException as e:
                tally.errors.append(f"{bench_id}: {e!r}")  # outcome unknown; reconnect and go on
                client.close()
                await client.connect()
                continue
            tally.accepted[bench_id] = time.time()
    finally:
        client.close()


async def send_load(port: int, opts: Options, t0: float, tally: Tally) -> None:
    numbers = iter(range(opts.messages))
    await asyncio.gather(*(session(port, numbers, t0, opts.rate, tally) for _ in range(opts.sessions)))


def received_ids(upstreams: Sequence[Upstream]) -> set[str]:
    return {i for u in upstreams for i in u.header_values(ID_HEADER)}


async def wait_delivered(tally: Tally, upstreams: Sequence[Upstream], timeout_s: float) -> float:
    """Until every accepted id reached an upstream, or timeout; returns the seconds waited."""
    start = time.time()
    while not tally.accepted.keys() <= received_ids(upstreams) and time.time() - start < timeout_s:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let duplicates and stragglers show before counting
    return time.time() - start


# -- one policy -------------------------------------------------------------------------------------


@dataclass
class Raw:
    """What one run left behind, before analysis."""

    policy: str
    t0: float
    marks: dict[str, float]
    tally: Tally
    upstreams: dict[str, list[tuple[str, float]]]
    events: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    child: dict[str, Any]
    parent_loop_lag: dict[str, float]
    drain_wait_s: float
    load_s: float
    bench_cpu_s: float


async def run_policy(policy: str, opts: Options, base: Path) -> Raw:
    upstreams = {name: relay(name, behaviour) for name, behaviour in start_behaviours().items()}
    for u in upstreams.values():
        await u.start()
    workdir = Path(tempfile.mkdtemp(prefix=f"postmux-balance-{policy}-", dir=base))
    lag = LagMonitor()
    try:
        settings = postmux_settings(policy, {n: u.address for n, u in upstreams.items()}, workdir)
        async with postmux_process(settings, workdir) as (port, conn):
            lag.start()
            tally = Tally()
            marks: dict[str, float] = {}
            t0 = time.time() + 0.2
            cpu_before = _cpu_s()
            timeline = asyncio.create_task(flaky_timeline(upstreams[FLAKY], t0, marks))
            try:
                await asyncio.wait_for(send_load(port, opts, t0, tally), timeout=opts.duration_s + 60)
                load_s = time.time() - t0
                await timeline  # the timeline ends at HEALTHY_AT_S, well inside the load
                drain_wait_s = await wait_delivered(tally, list(upstreams.values()), DRAIN_TIMEOUT_S)
                bench_cpu_s = _cpu_s() - cpu_before
            finally:
                timeline.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timeline
            child = await asyncio.to_thread(stop_postmux, conn)
        parent_lag = await lag.stop()
        events = [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines() if line]
        attempts = json.loads((workdir / "attempts.json").read_text())
    finally:
        for u in upstreams.values():
            await u.stop()
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return Raw(
        policy=policy,
        t0=t0,
        marks=marks,
        tally=tally,
        upstreams={n: received_with_times(u) for n, u in upstreams.items()},
        events=events,
        attempts=attempts,
        child=child,
        parent_loop_lag=parent_lag,
        drain_wait_s=drain_wait_s,
        load_s=load_s,
        bench_cpu_s=bench_cpu_s,
    )


# -- analysis ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank; nan when there is nothing to rank."""
    if not values:
        return math.nan
    ranked = sorted(values)
    return ranked[max(1, math.ceil(q / 100 * len(ranked))) - 1]


def outage(
    attempts: list[dict[str, Any]], events: list[dict[str, Any]], start: float, end: float
) -> dict[str, Any]:
    """The flaky member from `start` (its death) to `end`: attempts started on it, when it went out."""
    mine = sorted(a["start"] for a in attempts if a["member"] == FLAKY and start <= a["start"] < end)
    caught = [a for a in attempts if a["member"] == FLAKY and a["start"] < start < a["end"]]
    downs = [e for e in events if e["type"] == "MemberDown" and start <= e["timestamp"] < end]
    ups = [e for e in events if e["type"] == "MemberUp" and start <= e["timestamp"] < end]
    return {
        "in_flight_at_death": len(caught),
        "in_flight_results": sorted(a["result"] for a in caught),
        "attempts_started": len(mine),
        "first_attempt_s": mine[0] - start if mine else None,
        "last_attempt_s": mine[-1] - start if mine else None,  # the "time to stop": no new attempts after it
        "member_down_s": [round(e["timestamp"] - start, 3) for e in downs],
        "member_down_reasons": [e["tags"].get("reason", "") for e in downs],
        "member_up_s": [round(e["timestamp"] - start, 3) for e in ups],
        "member_up_reasons": [e["tags"].get("reason", "") for e in ups],
    }


def ramp(deliveries: list[dict[str, Any]], events: list[dict[str, Any]], healthy: float) -> dict[str, Any]:
    """After the flaky member is healthy again: when it was back, and its share of deliveries per second."""
    shares: list[float | None] = []
    for k in range(RAMP_BINS):
        in_bin = [d for d in deliveries if healthy + k <= d["timestamp"] < healthy + k + 1]
        flaky = sum(d["member"] == FLAKY for d in in_bin)
        shares.append(round(flaky / len(in_bin), 3) if in_bin else None)
    ups = [e for e in events if e["type"] == "MemberUp" and e["timestamp"] >= healthy]
    first = min(
        (d["timestamp"] for d in deliveries if d["member"] == FLAKY and d["timestamp"] >= healthy),
        default=None,
    )
    return {
        "member_up_s": round(ups[0]["timestamp"] - healthy, 3) if ups else None,
        "member_up_reason": ups[0]["tags"].get("reason", "") if ups else None,
        "first_delivery_s": round(first - healthy, 3) if first is not None else None,
        "share_per_second": shares,
    }


def replay_least_latency(attempts: list[dict[str, Any]], until: float) -> dict[str, Any]:
    """What least_latency saw of fast and slow at each pick, replayed from the recorded attempts.

    The same rules as Member.observe_latency / latency_at (peak EWMA, LATENCY_DECAY_S) and
    LeastLatencyPolicy.cost (latency x (in flight + 1) / weight; fast and slow never ramp, weight 1).
    Only picks before `until` (the flaky member's death), so the outages do not blur the picture.
    """
    ewma = dict.fromkeys(MEMBERS, 0.0)
    ewma_at: dict[str, float | None] = dict.fromkeys(MEMBERS, None)
    in_flight = dict.fromkeys(MEMBERS, 0)

    def now_latency(m: str, t: float) -> float:
        at = ewma_at[m]
        return 0.0 if at is None else ewma[m] * math.exp(-max(0.0, t - at) / LATENCY_DECAY_S)

    timeline = sorted(
        [(a["end"], 0, a) for a in attempts] + [(a["start"], 1, a) for a in attempts], key=lambda x: x[:2]
    )
    seen: dict[str, list[float]] = {"fast": [], "slow": [], "fast_in_flight": [], "slow_in_flight": []}
    slow_cheaper = 0
    for t, is_start, a in timeline:
        m = a["member"]
        if is_start:
            if t < until:
                lat = {x: now_latency(x, t) for x in ("fast", "slow")}
                cost = {x: lat[x] * (in_flight[x] + 1) for x in ("fast", "slow")}
                seen["fast"].append(lat["fast"])
                seen["slow"].append(lat["slow"])
                seen["fast_in_flight"].append(in_flight["fast"])
                seen["slow_in_flight"].append(in_flight["slow"])
                slow_cheaper += cost["slow"] <= cost["fast"]
            in_flight[m] += 1
            continue
        in_flight[m] -= 1
        sample = a["end"] - a["start"]
        at = ewma_at[m]
        if at is None or sample > ewma[m]:
            ewma[m] = sample  # peak: a slower sample counts at once
        else:
            keep = math.exp(-max(0.0, t - at) / LATENCY_DECAY_S)
            ewma[m] = ewma[m] * keep + sample * (1.0 - keep)
        ewma_at[m] = t
    picks = len(seen["fast"]) or 1
    fast_samples = [a["end"] - a["start"] for a in attempts if a["member"] == "fast" and a["start"] < until]
    return {
        "picks": len(seen["fast"]),
        "fast_attempt_p50_ms": 1000 * percentile(fast_samples, 50),
        "fast_attempt_p90_ms": 1000 * percentile(fast_samples, 90),
        "fast_ewma_p50_ms": 1000 * percentile(seen["fast"], 50),
        "slow_ewma_p50_ms": 1000 * percentile(seen["slow"], 50),
        "fast_in_flight_mean": sum(seen["fast_in_flight"]) / picks,
        "slow_in_flight_mean": sum(seen["slow_in_flight"]) / picks,
        "slow_cost_not_above_fast": slow_cheaper / picks,
    }


def share_by_phase(deliveries: list[dict[str, Any]], t0: float, end_s: float) -> dict[str, dict[str, float]]:
    """Each member's share of the deliveries in each phase of the flaky member's timeline."""
    edges = {
        "0-6 s flaky 451s": (0.0, REFUSE_AT_S),
        "6-12 s flaky refuses": (REFUSE_AT_S, HANG_AT_S),
        "12-18 s flaky hangs": (HANG_AT_S, HEALTHY_AT_S),
        f"18-{end_s:.0f} s flaky healthy": (HEALTHY_AT_S, end_s),
    }
    out = {}
    for label, (lo, hi) in edges.items():
        inside = [d for d in deliveries if lo <= d["timestamp"] - t0 < hi]
        out[label] = {
            m: round(sum(d["member"] == m for d in inside) / (len(inside) or 1), 3) for m in MEMBERS
        }
    return out


def analyse(raw: Raw) -> dict[str, Any]:
    received = [i for recs in raw.upstreams.values() for i, _ in recs]
    unique = set(received)
    accepted = set(raw.tally.accepted)
    deliveries = [e for e in raw.events if e["type"] == "Delivery"]
    latencies = [d["latency_s"] for d in deliveries]
    by_member = {m: sum(d["member"] == m for d in deliveries) for m in MEMBERS}
    total = sum(by_member.values()) or 1
    # Latency of messages accepted before the flaky member died: the slow member's effect alone.
    calm = [d["latency_s"] for d in deliveries if d["timestamp"] - d["latency_s"] < raw.marks["refuse"]]
    durations = {
        m: [a["end"] - a["start"] for a in raw.attempts if a["member"] == m and a["result"] == "ok"]
        for m in MEMBERS
    }
    after_ok = {m: sum(1 for d in deliveries if d["member"] == m and d["num_attempts"] > 1) for m in MEMBERS}
    other = {t: sum(e["type"] == t for e in raw.events) for t in ("TransientFailure", "Bounce", "Expiration")}
    return {
        "policy": raw.policy,
        "accepted": len(accepted),
        "refused_at_ingress": raw.tally.refused,
        "client_errors": raw.tally.errors,
        "delivered": len(accepted & unique),
        "lost": len(accepted - unique),
        "lost_ids": sorted(accepted - unique)[:20],
        "duplicates": len(received) - len(unique),
        "delivery_events": len(deliveries),
        "other_events": other,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "max_ms": 1000 * max(latencies, default=math.nan),
        "before_refuse_p50_ms": 1000 * percentile(calm, 50),
        "before_refuse_p99_ms": 1000 * percentile(calm, 99),
        "over_1s": sum(x > 1.0 for x in latencies),
        "over_slow": sum(x > SLOW_DELAY_S for x in latencies),
        "share": {m: by_member[m] / total for m in MEMBERS},
        "deliveries_per_member": by_member,
        "share_by_phase": share_by_phase(deliveries, raw.t0, raw.load_s),
        "received_per_member": {m: len(recs) for m, recs in raw.upstreams.items()},
        "retried_deliveries_per_member": after_ok,
        "attempt_p50_ms": {m: 1000 * percentile(v, 50) for m, v in durations.items()},
        "attempts_per_member": {m: sum(a["member"] == m for a in raw.attempts) for m in MEMBERS},
        "refuse": outage(raw.attempts, raw.events, raw.marks["refuse"], raw.marks["hang"]),
        "hang": outage(raw.attempts, raw.events, raw.marks["hang"], raw.marks["healthy"]),
        "ramp": ramp(deliveries, raw.events, raw.marks["healthy"]),
        "least_latency_view": replay_least_latency(raw.attempts, raw.marks["refuse"]),
        "load_s": raw.load_s,
        "sender_behind_s": raw.tally.behind_s,
        "drain_wait_s": raw.drain_wait_s,
        "postmux_cpu_s": raw.child["cpu_s"],
        "bench_cpu_s": raw.bench_cpu_s,
        "postmux_loop_lag": raw.child["loop_lag"],
        "bench_loop_lag": raw.parent_loop_lag,
        "marks_s": {k: round(v - raw.t0, 3) for k, v in raw.marks.items()},
        "member_events": [
            {
                "t_s": round(e["timestamp"] - raw.t0, 3),
                "type": e["type"],
                "member": e["member"],
                "reason": e["tags"].get("reason", ""),
            }
            for e in raw.events
            if e["type"] in ("MemberDown", "MemberUp")
        ],
    }


# -- reporting --------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


RAMP_SHOWN = (1, 3, 5, 7, 9)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One row per policy, ready for bench/README.md. Times are seconds after the event named."""
    print(
        "\n| policy | delivered | lost | dup | p50 ms | p99 ms | p99 ms, accepted before t=6"
        " | share fast / slow / flaky %"
        " | refused at t=6: last new attempt (attempts) | hung at t=12: let in, last new attempt (attempts)"
        " | healthy at t=18: let in; flaky share % at +" + "/+".join(str(k) for k in RAMP_SHOWN) + " s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in rows:
        share = " / ".join(f"{100 * r['share'][m]:.1f}" for m in MEMBERS)
        ref, hang, back = r["refuse"], r["hang"], r["ramp"]
        hang_in = hang["member_up_s"][0] if hang["member_up_s"] else None
        shares = " / ".join(_pct(back["share_per_second"][k]) for k in RAMP_SHOWN)
        print(
            f"| {r['policy']} | {r['delivered']} | {r['lost']} | {r['duplicates']} | {r['p50_ms']:.1f}"
            f" | {r['p99_ms']:.0f} | {r['before_refuse_p99_ms']:.0f} | {share}"
            f" | +{_s(ref['last_attempt_s'] or 0.0)} s ({ref['attempts_started']})"
            f" | +{_s(hang_in)} s, +{_s(hang['last_attempt_s'])} s ({hang['attempts_started']})"
            f" | +{_s(back['member_up_s'])} s; {shares} |"
        )


def print_details(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"\n{r['policy']}:", file=sys.stderr)
        for key in (
            "attempt_p50_ms",
            "attempts_per_member",
            "other_events",
            "over_1s",
            "over_slow",
            "postmux_loop_lag",
            "bench_loop_lag",
            "postmux_cpu_s",
            "bench_cpu_s",
            "sender_behind_s",
            "drain_wait_s",
        ):
            print(f"  {key}: {r[key]}", file=sys.stderr)
        print(f"  refuse: {r['refuse']}", file=sys.stderr)
        print(f"  hang: {r['hang']}", file=sys.stderr)
        print(f"  ramp: {r['ramp']}", file=sys.stderr)
        print(f"  least_latency_view: {r['least_latency_view']}", file=sys.stderr)
        print(f"  share_by_phase: {r['share_by_phase']}", file=sys.stderr)
        for e in r["member_events"]:
            print(f"    t={e['t_s']:6.2f} {e['type']:10} {e['member']}: {e['reason']}", file=sys.stderr)


def problems_of(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    for r in rows:
        if r["lost"]:
            problems.append(f"{r['policy']}: {r['lost']} accepted messages never reached an upstream")
        if r["duplicates"]:
            problems.append(f"{r['policy']}: {r['duplicates']} duplicate deliveries")
        if r["client_errors"] or r["refused_at_ingress"]:
            refused, errors = r["refused_at_ingress"], len(r["client_errors"])
            problems.append(f"{r['policy']}: ingress refused {refused}, client errors {errors}")
    return problems


def machine() -> dict[str, str | int]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count() or 0, "cpu": model}


def base_dir() -> Path:
    """The spools go under /tmp, which is a real disk here (bench/README.md: tmpfs would hide fsync)."""
    base = Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all four)")
    p.add_argument("--rate", type=float, default=150.0, help="messages per second (default 150)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30, >= 20)")
    p.add_argument("--sessions", type=int, default=15, help="client SMTP sessions (default 15)")
    p.add_argument("--keep", action="store_true", help="keep each run's spool, events and postmux.log")
    a = p.parse_args(argv)
    policies = tuple(x.strip() for x in a.policies.split(",") if x.strip())
    if not policies or any(x not in POLICIES for x in policies):
        p.error(f"--policies: choose among {', '.join(POLICIES)}")
    if a.duration < HEALTHY_AT_S + 2 or a.rate <= 0 or a.sessions < 1:
        p.error("--duration must be at least 20, --rate and --sessions above 0")
    return Options(policies, a.rate, a.duration, a.sessions, a.keep)


async def run_all(opts: Options) -> list[dict[str, Any]]:
    rows = []
    for policy in opts.policies:
        print(f"{policy}: {opts.messages} messages at {opts.rate:.0f}/s ...", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        raw = await run_policy(policy, opts, base_dir())
        row = analyse(raw) | {"load_before": load}
        print(
            f"    delivered {row['delivered']}/{row['accepted']}, lost {row['lost']},"
            f" p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.0f} ms (1-min load before {load:.2f})",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = datetime.now().astimezone()
    rows = uvloop.run(run_all(opts))
    print_details(rows)
    print_table(rows)
    problems = problems_of(rows)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"balance-{started.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "options": asdict(opts),
        "timeline_s": {"refuse": REFUSE_AT_S, "hang": HANG_AT_S, "healthy": HEALTHY_AT_S},
        "runs": rows,
        "problems": problems,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
