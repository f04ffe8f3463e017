"""SMTP ingress in worker processes: the main process keeps the spool; a worker never says 250 alone."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiosmtplib
import pytest

from postmux.app import App
from postmux.body import BodyFile
from postmux.config import SmtpSettings
from postmux.envelope import Envelope
from postmux.ingress.workers import IngressWorkers, RemoteAcceptor
from postmux.spool.base import SpoolError
from tests.e2e.test_crash import running
from tests.support import StartUpstream, make_settings, message, read_events, send, send_many, wait_until


async def test_two_workers_take_the_sessions_and_the_main_process_delivers(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, smtp={"workers": 2})) as app:
        assert app.workers is not None and app._smtp is None  # no SMTP in the main process
        pids = app.workers.pids
        assert len(pids) == 2 and all(running(p) for p in pids)
        await send_many(app.smtp_port, [f"m{i}" for i in range(60)])
        await wait_until(lambda: len(up.received) == 60)
        # One worker dies: the other still accepts on the shared socket, and a new one takes its place.
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: not running(pids[0]))
        await send_many(app.smtp_port, [f"after{i}" for i in range(20)])
        await wait_until(lambda: len(up.received) == 80)
        workers = app.workers
        await wait_until(lambda: len(workers.pids) == 2 and pids[0] not in workers.pids, timeout=15)
        replacement = next(p for p in workers.pids if p not in pids)
        assert running(replacement)
        pids.append(replacement)
        await wait_until(lambda: app.dispatcher.in_flight == 0)  # outcomes recorded
        counts = await app.spool.counts()
    assert not any(running(p) for p in pids)  # stopped with the app, by PID
    assert sorted(r.test_id for r in up.received) == sorted(
        [f"m{i}" for i in range(60)] + [f"after{i}" for i in range(20)]
    )
    assert counts["queued"] == counts["leased"] == 0


class RefusingSpool:
    """An acceptor whose spool always fails, the way a full disk does (pure stand-in, no call checks)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def accept(self, envelope: Envelope) -> str:
        raise self.error


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (SpoolError("disk full", disk_full=True), "452 4.3.1"),
        (SpoolError("I/O error"), "451 4.3.0"),
        (RuntimeError("bug"), "451 4.3.0"),
    ],
)
async def test_a_worker_answers_what_the_spool_process_says(error: Exception, reply: str) -> None:
    workers = IngressWorkers(
        SmtpSettings(listen="127.0.0.1:0", hostname="postmux.test"), RefusingSpool(error), 1
    )
    await workers.start()
    try:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=workers.port, local_hostname="client.test", start_tls=False
        )
        await client.connect()
        await client.mail("app@example.com")
        await client.rcpt("u@dest.test")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(message("x"))
        assert f"{refused.value.code} {refused.value.message}".startswith(reply)
        await client.quit()
    finally:
        await workers.stop()


async def test_a_workers_250_carries_the_queue_id_the_main_process_stored(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, smtp={"workers": 1})) as app:
        reply = await send(app.smtp_port, "one")
        await wait_until(lambda: len(up.received) == 1)
    receptions = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "Reception"]
    assert reply == f"2.0.0 Ok: queued as {receptions[0]['id']}"
    assert f"id {receptions[0]['id']}".encode() in up.received[0].data  # the main process's Received header


class Keeper:
    """An acceptor in the main process that keeps what the worker hands it."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return f"q{len(self.envelopes)}"


async def test_a_text_larger_than_the_pipes_buffers_crosses_whole_with_what_the_worker_found() -> None:
    keeper = Keeper()
    workers = IngressWorkers(SmtpSettings(listen="127.0.0.1:0", hostname="postmux.test"), keeper, 1)
    await workers.start()
    texts = [message("big", size=600_000), message("dot") + b".dot\r\n", message("small")]
    try:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=workers.port, local_hostname="client.test", start_tls=False
        )
        await client.connect()
        for i, text in enumerate(texts, 1):
            _, reply = await client.sendmail("app@example.com", ["u@dest.test"], text)
            assert reply == f"2.0.0 Ok: queued as q{i}"
        await client.quit()
    finally:
        await workers.stop()
    assert [e.data for e in keeper.envelopes] == texts  # aiosmtplib stuffed the dot, ingress took it off
    assert [e.clean for e in keeper.envelopes] == [True, False, True]
    assert all(e.recipients == ("u@dest.test",) and e.helo == "client.test" for e in keeper.envelopes)


async def test_a_worker_writes_a_large_text_to_the_spill_directory_and_hands_over_the_file(
    tmp_path: Path,
) -> None:
    keeper = Keeper()
    settings = SmtpSettings(listen="127.0.0.1:0", hostname="postmux.test", spill_bytes=10_000)
    workers = IngressWorkers(settings, keeper, 1, spill_dir=tmp_path)
    await workers.start()
    text = message("big", size=600_000)
    try:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=workers.port, local_hostname="client.test", start_tls=False
        )
        await client.connect()
        _, reply = await client.sendmail("app@example.com", ["u@dest.test"], text)
        assert reply == "2.0.0 Ok: queued as q1"
        await client.quit()
    finally:
        await workers.stop()
    [envelope] = keeper.envelopes
    assert envelope.tail is not None and Path(envelope.tail.path).parent == tmp_path
    assert len(envelope.data) <= 10_000 and envelope.data + envelope.tail.read() == text
    assert envelope.clean and envelope.size == len(text)


async def test_a_worker_whose_main_process_is_gone_deletes_the_text_file_it_could_not_send(
    tmp_path: Path,
) -> None:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    acceptor = RemoteAcceptor(reader, writer)
    theirs.close()
    await acceptor.read_replies()  # EOF with nothing in doubt: no spool behind it any more
    path = tmp_path / "text-1.tmp"
    path.write_bytes(b"rest\r\n")
    envelope = Envelope("a@b.test", ("c@d.test",), b"head\r\n", tail=BodyFile(str(path), 0, 6))
    with pytest.raises(SpoolError):
        await acceptor.accept(envelope)
    assert not path.exists()  # handed to accept: no one else would delete it
    writer.close()
    await writer.wait_closed()
