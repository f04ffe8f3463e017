"""Webhooks across kill -9: `postmux serve` killed twice mid-run while a receiver on loopback fails about
half of its requests at random and lets some time out; every event of the accepted messages still reaches
it, each request validly signed, in order per message.

What is checked, per endpoint:
- every accepted message (answered 250) has a Reception and a Delivery for each recipient at least once;
- every event the event log holds reached the receiver by its event_id, except those emitted in the last
  second before a kill (an outcome is emitted a moment before it is committed; a kill in between loses
  that outcome, and its event, together: the retry after the restart makes new ones);
- per message, the events in the order they first arrived have non-decreasing timestamps (the Receptions
  before any outcome, an outcome before a later retry's);
- no request had a bad signature, and the receiver really failed and stalled on some.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.test_crash import kill_left, start_serve, tail, write_config
from tests.support import Upstream, accept, fail_ratio, free_port, wait_until
from tests.webhook_receiver import FAIL, STALL, Receiver, flaky

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
SENDER = "app@example.com"
TIMEOUT_S = 0.3  # [[webhook]] timeout; the receiver stalls longer on the requests it lets time out


@dataclass(frozen=True)
class Scale:
    clients: int
    pause_s: float  # each client's wait between messages: the one-record-per-request endpoint is slow
    acked_per_run: tuple[int, int, int]  # accepted messages before each kill, then before the end
    deadline_s: float  # for every event to arrive after the traffic stops


FAST = Scale(clients=3, pause_s=0.08, acked_per_run=(15, 15, 10), deadline_s=60)
LONG = Scale(clients=6, pause_s=0.01, acked_per_run=(200, 200, 100), deadline_s=300)


def recipients_of(n: int) -> list[str]:
    """Every other message has two recipients: their events interleave within one message."""
    return [f"u{n}a@dest.test", f"u{n}b@dest.test"] if n % 2 else [f"u{n}@dest.test"]


@dataclass
class Traffic:
    port: int
    pause_s: float
    acked: dict[str, list[str]] = field(default_factory=dict)  # queue id -> recipients
    stop: bool = False
    _n: int = 0

    async def send_one(self, n: int) -> None:
        rcpts = recipients_of(n)
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=self.port, local_hostname="client.test", timeout=10, start_tls=False
        )
        data = f"From: {SENDER}\r\nSubject: hook {n}\r\nMessage-ID: <hook-{n}@example.com>\r\n\r\nhi\r\n"
        try:
            await client.connect()
            await client.mail(SENDER)
            for rcpt in rcpts:
                await client.rcpt(rcpt)
            reply = await client.data(data.encode())
        except (aiosmtplib.SMTPException, OSError):
            await asyncio.sleep(0.02)  # refused or in doubt: not checked; do not spin while postmux is down
            return
        finally:
            client.close()
        self.acked[reply.message.rsplit(" ", 1)[-1]] = rcpts

    async def worker(self) -> None:
        while not self.stop:
            self._n += 1
            await self.send_one(self._n)
            await asyncio.sleep(self.pause_s)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The event log's complete lines (a kill -9 can cut the last one short)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def webhook_tables(tmp_path: Path, url: str) -> str:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(SECRET + "\n")
    return f"""
[[webhook]]
name = "all"
url = "{url}/all"
secret = "{SECRET}"
batch_size = 20
batch_wait = "50ms"
timeout = "{TIMEOUT_S}s"
min_backoff = "20ms"
max_backoff = "200ms"

[[webhook]]
name = "each"
url = "{url}/each"
secret_file = "{secret_file}"
events = ["Reception", "Delivery"]
timeout = "{TIMEOUT_S}s"
min_backoff = "20ms"
max_backoff = "200ms"
"""


def missing_events(receiver: Receiver, path: str, traffic: Traffic) -> list[str]:
    got = {(r["type"], r["id"], r["recipient"]) for r in receiver.records(path)}
    return [
        f"{kind} {mid} {rcpt}"
        for mid, rcpts in traffic.acked.items()
        for rcpt in rcpts
        for kind in ("Reception", "Delivery")
        if (kind, mid, rcpt) not in got
    ]


def out_of_order(receiver: Receiver, path: str) -> list[str]:
    first: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for r in receiver.records(path):
        if r["event_id"] not in seen:
            seen.add(r["event_id"])
            first[r["id"]].append(r)
    wrong = []
    for mid, records in first.items():
        stamps = [r["timestamp"] for r in records]
        if stamps != sorted(stamps):
            wrong.append(f"{mid}: {[(r['type'], r['recipient'], r['timestamp']) for r in records]}")
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize(
    "scale", [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.chaos)]
)
async def test_webhooks_survive_two_kill_9_with_a_flaky_receiver(tmp_path: Path, scale: Scale) -> None:
    receiver = await Receiver(secret=SECRET, decide=flaky(0.4, 0.1), stall_s=TIMEOUT_S + 0.2).start()
    upstreams = [await Upstream("steady", accept).start(), await Upstream("flaky", fail_ratio(0.3)).start()]
    smtp_port, http_port = free_port(), free_port()
    cfg = write_config(tmp_path, smtp_port, http_port, [(u.name, u.address, 4) for u in upstreams])
    cfg.write_text(cfg.read_text() + webhook_tables(tmp_path, receiver.url("")))
    logs = [tmp_path / f"serve-{i}.log" for i in (1, 2, 3)]
    procs: list[asyncio.subprocess.Process] = []
    traffic = Traffic(smtp_port, scale.pause_s)
    workers: list[asyncio.Task[None]] = []
    kills: list[float] = []
    started = time.monotonic()
    try:
        for run, log in enumerate(logs):
            procs.append(await start_serve(cfg, log, smtp_port))
            if run == 0:
                workers = [asyncio.create_task(traffic.worker()) for _ in range(scale.clients)]
            target = len(traffic.acked) + scale.acked_per_run[run]
            await wait_until(lambda t=target: len(traffic.acked) >= t, timeout=30)  # type: ignore[misc]
            if run == len(logs) - 1:
                break
            # Kill while the receiver is answering a request: a post is in flight.
            await wait_until(lambda: receiver.in_flight > 0, timeout=10, interval=0.001)
            os.kill(procs[-1].pid, signal.SIGKILL)
            kills.append(time.time())
            await asyncio.wait_for(procs[-1].wait(), timeout=10)
            assert procs[-1].returncode == -signal.SIGKILL
        traffic.stop = True
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)

        def complete() -> bool:
            return not missing_events(receiver, "/all", traffic) and not missing_events(
                receiver, "/each", traffic
            )

        try:
            await wait_until(complete, timeout=scale.deadline_s, interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"events never arrived: all={missing_events(receiver, '/all', traffic)[:10]}"
                f" each={missing_events(receiver, '/each', traffic)[:10]}\n{tail(logs[-1])}"
            ) from None

        # Every event the log kept (but those of the last second before a kill) arrived, by its id.
        logged = read_log(tmp_path / "events.jsonl")
        settled_before_kills = [
            e for e in logged if e.get("id") and not any(k - 1.0 <= e["timestamp"] <= k for k in kills)
        ]
        wanted = {"/all": {"Reception", "Delivery", "TransientFailure", "Bounce", "Expiration", "Held"}}
        wanted["/each"] = {"Reception", "Delivery"}
        for path, kinds in wanted.items():
            ids = {r["event_id"] for r in receiver.records(path)}

            def lost(kinds: set[str] = kinds, ids: set[str] = ids) -> list[str]:
                return [
                    e["event_id"]
                    for e in settled_before_kills
                    if e["type"] in kinds and e["event_id"] not in ids
                ]

            await wait_until(lambda lost=lost: not lost(), timeout=15, interval=0.1)  # type: ignore[misc]
            assert out_of_order(receiver, path) == []
        assert receiver.bad_signatures == []
        assert receiver.fates.get(FAIL, 0) > 0 and receiver.fates.get(STALL, 0) > 0
        assert {r["type"] for r in receiver.records("/all")} >= {"Reception", "Delivery", "TransientFailure"}

        elapsed = time.monotonic() - started
        print(
            f"\nwebhooks crash: acked={len(traffic.acked)} kills={len(kills)} requests={receiver.requests}"
            f" fates={receiver.fates} records_all={len(receiver.records('/all'))}"
            f" records_each={len(receiver.records('/each'))} logged={len(logged)} elapsed={elapsed:.1f}s"
        )
        os.kill(procs[-1].pid, signal.SIGTERM)
        await asyncio.wait_for(procs[-1].wait(), timeout=20)
        assert procs[-1].returncode == 0, tail(logs[-1])
    finally:
        traffic.stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await kill_left(procs)
        for u in upstreams:
            await u.stop()
        await receiver.stop()
