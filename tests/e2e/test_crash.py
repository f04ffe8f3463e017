"""Crash test: kill -9 `postmux serve` mid-traffic, start it again, and check what was promised.

Every message that got a 250 is delivered; none that got a refusal is; duplicates come only from
deliveries in flight at the kill (delivered upstream, outcome not yet committed to the spool).
A message whose connection broke after DATA was sent but before the reply (the two-generals window)
is "in doubt": delivered or not, both are allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from tests.support import Behaviour, Upstream, accept, delay, free_port, wait_until

SRC = Path(__file__).resolve().parents[2] / "src"

SENDER = "app@example.com"
RECIPIENT = "user@dest.test"
CLIENTS = 10  # concurrent SMTP sessions, one message per connection
ACKED_BEFORE_KILL = 300
DOWN_FOR_S = 0.7  # the client keeps trying while postmux is dead: all of these are refused
ACKED_AFTER_RESTART = 100
DELIVERY_TIMEOUT_S = 60.0

# One Received: header, possibly folded onto continuation lines, and nothing else.
RECEIVED_HEADER = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
LISTENING = re.compile(r"postmux: smtp on port (\d+), http on port (\d+)")


SPILL_BYTES = 16_384  # [smtp] spill_bytes: texts longer than this reach the spool as files (issue 12)


def build_message(test_id: str, n: int) -> bytes:
    """A message whose size and shape vary with n, with dot-leading lines to exercise transparency.

    Every path a text can take to the spool is crashed: most stay in their row; every fourth is longer
    than the spool keeps in a row (a segment file of its group commit); every sixth is longer than
    SPILL_BYTES (written to a file by ingress as it arrives, adopted by the spool).
    """
    lines = [f"line {i} of {test_id}: " + "abcdefghij" * (i % 7) for i in range(5 + (n * 37) % 60)]
    if n % 4 == 1:
        lines += [f"segment {i} " + "0123456789" * 7 for i in range(160)]  # ~13 KB
    elif n % 6 == 5:
        lines += [f"spilled {i} " + "0123456789" * 7 for i in range(500)]  # ~40 KB
    if n % 3 == 0:
        lines.insert(1, ".a line that starts with a dot")
    if n % 5 == 0:
        lines.insert(2, "..")
    body = "".join(line + "\r\n" for line in lines)
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: crash {test_id}\r\nX-Test-Id: {test_id}\r\n"
        f"Message-ID: <{test_id}@example.com>\r\n\r\n{body}"
    ).encode()


def tracking(behaviour: Behaviour, active: list[int]) -> Behaviour:
    """Wrap a behaviour to count the DATA transactions an upstream is working on right now."""

    async def wrapped(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        active[0] += 1
        try:
            return await behaviour(upstream, envelope)
        finally:
            active[0] -= 1

    return wrapped


@dataclass
class Traffic:
    port: int
    sent: dict[str, bytes] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    in_doubt: list[str] = field(default_factory=list)
    stop: bool = False
    _n: int = 0

    def next_id(self) -> tuple[str, int]:
        self._n += 1
        return f"crash-{self._n:05d}", self._n

    async def send_one(self, test_id: str, data: bytes) -> str:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=self.port, local_hostname="client.test", timeout=10, start_tls=False
        )
        try:
            try:
                await client.connect()
                await client.ehlo()
                await client.mail(SENDER)
                await client.rcpt(RECIPIENT)
            except (aiosmtplib.SMTPException, OSError):
                return "refused"  # DATA was never sent
            try:
                await client.data(data)
            except aiosmtplib.SMTPResponseException:
                return "refused"  # a definite non-2xx reply (to DATA or to the final dot)
            except (aiosmtplib.SMTPException, OSError):
                # The connection broke somewhere after DATA was sent and before the final reply.
                return "in_doubt"
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
            return "acked"
        finally:
            client.close()

    async def worker(self) -> None:
        while not self.stop:
            test_id, n = self.next_id()
            data = build_message(test_id, n)
            self.sent[test_id] = data
            outcome = await self.send_one(test_id, data)
            getattr(self, outcome).append(test_id)
            if outcome != "acked":
                await asyncio.sleep(0.02)  # do not spin while postmux is down


def write_config(
    tmp_path: Path,
    smtp_port: int,
    http_port: int,
    members: list[tuple[str, str, int]],
    workers: int = 0,
    spool: str = "",
    name: str = "postmux.toml",
    *,
    hostname: str = "postmux.test",
    delivery: str = "",
) -> Path:
    """`spool`, `delivery`: more keys of [spool] (a PostgreSQL spool's backend, dsn, node_id) and of
    [delivery], as TOML lines; `hostname` names the node in the Received: header it adds."""
    member_tables = "".join(
        f'\n[[pool.members]]\nname = "{name}"\naddress = "{address}"\nmax_connections = {conns}\n'
        for name, address, conns in members
    )
    cfg = tmp_path / name
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "{hostname}"
workers = {workers}
spill_bytes = {SPILL_BYTES}

[http]
listen = "127.0.0.1:{http_port}"

[spool]
path = "{tmp_path / "spool.db"}"
{spool}

[events]
log = "{tmp_path / "events.jsonl"}"

[retry]
intervals = ["1s"]
max_age = "1h"
jitter = 0

[delivery]
connect_timeout = "2s"
command_timeout = "5s"
data_timeout = "5s"
{delivery}
[[pool]]
name = "default"
policy = "round_robin"
{member_tables}"""
    )
    return cfg


async def start_serve(
    cfg: Path, log_path: Path, smtp_port: int, timeout_s: float = 20.0
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
    }
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postmux",
            "serve",
            "-c",
            str(cfg),
            cwd=SRC.parent,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        m = LISTENING.search(log_path.read_text(errors="replace"))
        if m:
            assert int(m.group(1)) == smtp_port, log_path.read_text(errors="replace")
            return proc
        if proc.returncode is not None or time.monotonic() > deadline:
            output = log_path.read_text(errors="replace")
            raise AssertionError(f"postmux serve did not start (exit {proc.returncode}):\n{output}")
        await asyncio.sleep(0.02)


async def kill_left(procs: list[asyncio.subprocess.Process]) -> None:
    """A test's end, whatever happened: each `postmux serve` still running is killed (-9) and reaped."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


async def stop_serves(procs: list[asyncio.subprocess.Process], timeout_s: float = 30.0) -> None:
    """Stop each `postmux serve` as an operator would (SIGTERM, all at once), killing one that does not
    end within `timeout_s`."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), timeout=timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def recovered_at_start(log_path: Path) -> int:
    """How many leased recipients the restarted process reclaimed, from its JSON log line."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "recovered unfinished work":
                return int(entry["recipients"])
    return 0


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.parametrize("ingress_workers", [0, 2], ids=["in-process", "2-ingress-workers"])
async def test_kill_9_loses_no_acknowledged_message(tmp_path: Path, ingress_workers: int) -> None:
    await kill_9_and_start_again(tmp_path, ingress_workers)


PG_LEASE_TTL_S = 3.0


@pytest.mark.slow
async def test_kill_9_of_a_node_on_postgresql_its_work_taken_over_by_another_node(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """Issue 17: the node started after the kill is another node (another node_id) on the same database:
    it takes over the dead node's leases once they run out, within the lease time."""
    spool = f'backend = "postgresql"\ndsn = "{postgres_dsn}"\nlease_ttl = "{PG_LEASE_TTL_S}s"\n'
    took_s = await kill_9_and_start_again(
        tmp_path, 0, (spool + 'node_id = "node-1"\n', spool + 'node_id = "node-2"\n')
    )
    assert took_s < PG_LEASE_TTL_S + 10.0, took_s


async def kill_9_and_start_again(
    tmp_path: Path, ingress_workers: int, spools: tuple[str, str] = ("", "")
) -> float:
    """kill -9 a `postmux serve` under load, start the second configuration, check every promise; returns
    the seconds from the kill until every message acknowledged before it was delivered."""
    slow_active = [0]
    upstreams = [
        await Upstream("fast1", accept).start(),
        await Upstream("fast2", accept).start(),
        await Upstream("slow", tracking(delay(0.03), slow_active)).start(),
    ]
    members = [(u.name, u.address, 4) for u in upstreams]
    max_in_flight = sum(conns for _, _, conns in members)
    smtp_port, http_port = free_port(), free_port()
    cfgs = [
        write_config(tmp_path, smtp_port, http_port, members, ingress_workers, spool, f"postmux-{i}.toml")
        for i, spool in enumerate(spools, 1)
    ]
    logs = [tmp_path / "serve-1.log", tmp_path / "serve-2.log"]

    procs: list[asyncio.subprocess.Process] = []
    traffic = Traffic(smtp_port)
    workers: list[asyncio.Task[None]] = []
    try:
        procs.append(await start_serve(cfgs[0], logs[0], smtp_port))
        workers = [asyncio.create_task(traffic.worker()) for _ in range(CLIENTS)]

        await wait_until(lambda: len(traffic.acked) >= ACKED_BEFORE_KILL, timeout=15)
        # Kill only while the slow upstream is inside a DATA transaction: deliveries are in flight.
        await wait_until(lambda: slow_active[0] > 0, timeout=5, interval=0.001)
        in_flight_at_kill = slow_active[0]
        ingress = children(procs[0].pid)
        assert len(ingress) == ingress_workers
        os.kill(procs[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        acked_at_kill = len(traffic.acked)
        acked_before_kill = set(traffic.acked)
        await asyncio.wait_for(procs[0].wait(), timeout=10)
        assert procs[0].returncode == -signal.SIGKILL
        # Workers without their spool process stop at once: no 250 without a spool behind it.
        await wait_until(lambda: not any(running(pid) for pid in ingress), timeout=5)

        refused_before_down = len(traffic.refused)
        await asyncio.sleep(DOWN_FOR_S)
        refused_while_down = len(traffic.refused) - refused_before_down
        # Everything received so far came from the first process; everything later, from the second.
        first_copies = {u.name: len(u.received) for u in upstreams}

        procs.append(await start_serve(cfgs[1], logs[1], smtp_port))
        acked_at_restart = len(traffic.acked)
        await wait_until(lambda: len(traffic.acked) >= acked_at_restart + ACKED_AFTER_RESTART, timeout=15)
        traffic.stop = True
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)

        acked = set(traffic.acked)
        refused = set(traffic.refused)
        in_doubt = set(traffic.in_doubt)
        assert not (acked & refused or acked & in_doubt or refused & in_doubt)

        def delivered_ids() -> set[str]:
            return {r.test_id for u in upstreams for r in u.received}

        await wait_until(
            lambda: acked_before_kill <= delivered_ids(), timeout=DELIVERY_TIMEOUT_S, interval=0.05
        )
        took_s = time.monotonic() - killed_at
        try:
            await wait_until(lambda: acked <= delivered_ids(), timeout=DELIVERY_TIMEOUT_S, interval=0.05)
        except AssertionError:
            missing = sorted(acked - delivered_ids())
            raise AssertionError(
                f"{len(missing)} acknowledged messages never delivered: {missing[:20]}\n"
                f"--- serve-1 ---\n{tail(logs[0])}\n--- serve-2 ---\n{tail(logs[1])}"
            ) from None
        # Give recovered in-doubt work and possible strays a moment to show up before judging.
        await asyncio.sleep(1.0)

        received = [(u.name, i, r) for u in upstreams for i, r in enumerate(u.received)]
        copies = Counter(r.test_id for _, _, r in received)
        delivered = set(copies)

        unknown = delivered - set(traffic.sent)
        assert not unknown, f"upstreams received messages nobody sent (DSNs?): {sorted(unknown)[:10]}"
        wrongly_delivered = sorted(delivered & refused)
        assert not wrongly_delivered, f"refused messages were delivered: {wrongly_delivered[:20]}"

        for name, _, r in received:
            sent = traffic.sent[r.test_id]
            assert r.data.endswith(sent), f"{r.test_id} via {name}: body changed in transit"
            prefix = r.data[: len(r.data) - len(sent)]
            assert RECEIVED_HEADER.fullmatch(prefix), f"{r.test_id}: unexpected prefix {prefix!r}"
            body_hash = hashlib.sha256(r.data[len(prefix) :]).hexdigest()
            assert body_hash == hashlib.sha256(sent).hexdigest()
            assert r.sender == SENDER and r.recipients == [RECIPIENT], r

        # A duplicate is one copy from the killed process and one from its successor, never more.
        duplicates = {tid: n for tid, n in copies.items() if n > 1}
        for tid, n in duplicates.items():
            before = sum(1 for name, i, r in received if r.test_id == tid and i < first_copies[name])
            assert n == 2 and before == 1, f"{tid}: {n} copies, {before} from the killed process"
        assert len(duplicates) <= max_in_flight, (
            f"{len(duplicates)} duplicates, more than the {max_in_flight} deliveries that can be in flight"
        )

        recovered = recovered_at_start(logs[1])
        print(
            f"\ncrash test: acked={len(acked)} (at kill {acked_at_kill}) refused={len(refused)}"
            f" (while down {refused_while_down}) in_doubt={len(in_doubt)}"
            f" (delivered {len(in_doubt & delivered)}) delivered={len(delivered)}"
            f" receptions={len(received)} duplicates={len(duplicates)} (bound {max_in_flight})"
            f" slow_in_flight_at_kill={in_flight_at_kill}"
            f" recovered={recovered} all_acked_before_kill_delivered_after_s={took_s:.1f}"
            f" per_upstream={ {u.name: len(u.received) for u in upstreams} }"
        )
        if duplicates:
            print(f"duplicates: {sorted(duplicates)}")

        os.kill(procs[1].pid, signal.SIGTERM)
        await asyncio.wait_for(procs[1].wait(), timeout=20)
        assert procs[1].returncode == 0, tail(logs[1])
        return took_s
    finally:
        traffic.stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await kill_left(procs)
        for u in upstreams:
            await u.stop()
