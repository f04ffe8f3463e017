"""A node on a PostgreSQL spool that fails or loses replies (outage review, /work/review/outage.md):

- item 1: a node renews only the leases of work it holds. A row leased to it whose work it does not
  have (a store whose commit reply was lost, an outcome it gave up recording) runs out and is taken by
  the next scan, never held until a restart; an outcome the spool refuses for a while is recorded once
  it answers, so the mail goes once.
- item 2: a bounce whose settle COMMIT reply was lost is retried without queueing a second DSN.
- item 3: with the link to PostgreSQL stalled, an SMTP client gets 451 4.3.0 within [spool] timeout or
  so, and what it sent is not delivered when the link comes back.

The spool's refusals are real PostgreSQL ones: a trigger in the test's schema that refuses to settle a
recipient, dropped when the "outage" ends; lost replies and stalls come from a loopback proxy in front of
the server (tests/pg_proxy.py).
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import asyncpg

from postmux.app import App
from postmux.envelope import Envelope, new_message_id
from postmux.scheduling.dispatcher import DispatchLimits
from postmux.spool.postgres import PostgresSpool
from postmux.testing import SmtpEnvelope, Upstream
from tests.integration.test_postgres_spool import delivered_ids, left_in_spool, node_settings, running
from tests.pg_proxy import PgProxy
from tests.support import StartUpstream, message, send_many, wait_until


async def refuse_settling(dsn: str) -> None:
    """From now on the spool refuses to record any outcome (a recipient leaving 'leased'); renewals
    (which keep it leased) still pass."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE FUNCTION refuse_settle() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'outcome refused (test outage)'; END $$;"
            " CREATE TRIGGER refuse_settle BEFORE UPDATE ON recipient FOR EACH ROW"
            " WHEN (OLD.state = 'leased' AND NEW.state <> 'leased') EXECUTE FUNCTION refuse_settle()"
        )
    finally:
        await conn.close()


async def settle_again(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TRIGGER refuse_settle ON recipient")
    finally:
        await conn.close()


async def test_a_lease_whose_store_reply_the_node_never_got_runs_out_and_its_own_scan_delivers_it(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Item 1 (b, c): a message committed leased to the node, whose answer never reached it (a lost
    COMMIT reply of an accept or a scan). The node renews what it holds, so this lease runs out after
    lease_ttl and the node's own scan delivers it; renewed by owner it would wait for a restart."""
    up = await upstream()
    app = App(node_settings(tmp_path / "n1", up, postgres_dsn, "n1", lease_ttl="2s"))
    async with running(app):
        lost = PostgresSpool(postgres_dsn, owner="n1", lease_ttl_s=2.0)  # the node's name, not its memory
        await lost.open()
        try:
            env = Envelope("app@example.com", ("user@dest.test",), message("lost-reply"))
            stored_at = time.time()
            await lost.store(new_message_id(), env, {"user@dest.test": "default"}, stored_at)
        finally:
            await lost.close()
        await send_many(app.smtp_port, ["held"])  # work the node does hold goes at once
        await wait_until(lambda: len(up.received) >= 2, timeout=10)
        left = await left_in_spool(app.spool)
    assert delivered_ids(up) == ["held", "lost-reply"]
    lost_at = next(r.at for r in up.received if r.header("X-Test-Id") == "lost-reply")
    assert 2.0 <= lost_at - stored_at < 2.0 + 3.0  # once its lease ran out, by a scan or two
    assert left == 0


async def test_an_outcome_the_spool_refused_for_a_while_is_recorded_once_it_answers_and_sent_once(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Item 1 (a): the outcome of a delivery is retried for as long as the spool refuses it (8 s here,
    longer than the ~6 s the dispatcher used to retry), the work held (and its lease renewed) meanwhile,
    so nobody attempts it again; recorded once the spool answers, the mail went once."""
    up = await upstream()
    app = App(node_settings(tmp_path / "n1", up, postgres_dsn, "n1", lease_ttl="3s"))
    async with running(app):
        await refuse_settling(postgres_dsn)
        await send_many(app.smtp_port, ["refused-a-while"])
        await wait_until(lambda: len(up.received) >= 1, timeout=10)
        delivered_at = time.monotonic()
        await wait_until(lambda: time.monotonic() - delivered_at > 8.0, timeout=15)
        assert (await app.spool.counts())["leased"] == 1
        await settle_again(postgres_dsn)
        left = await left_in_spool(app.spool, timeout_s=10)
    assert left == 0  # recorded: renewed forever and never tried again, it would still be leased
    assert delivered_ids(up) == ["refused-a-while"]  # and not sent twice


async def test_an_outcome_given_up_lets_its_lease_run_out_so_the_work_is_attempted_again(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Item 1 (a), the other end: an outcome the spool refuses for longer than record_patience_s is let
    go. Its lease is no longer renewed, runs out, and the node's next scan attempts the work again: at
    least once (here it goes twice, as it must once its first outcome is lost), never held until a
    restart."""
    up = await upstream()
    patient_a_second = DispatchLimits(record_patience_s=1.0)
    app = App(node_settings(tmp_path / "n1", up, postgres_dsn, "n1", lease_ttl="2s"), limits=patient_a_second)
    async with running(app):
        await refuse_settling(postgres_dsn)
        await send_many(app.smtp_port, ["given-up"])
        await wait_until(lambda: len(up.received) >= 2, timeout=15)
        await settle_again(postgres_dsn)
        left = await left_in_spool(app.spool, timeout_s=10)
    assert left == 0
    assert set(delivered_ids(up)) == {"given-up"}


def send_one(port: int, test_id: str, timeout_s: float = 30.0) -> tuple[int, float]:
    """One message over SMTP: the reply to its final dot, and how long it took to come."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=timeout_s) as client:
        client.ehlo("client.test")
        client.mail("app@example.com")
        client.rcpt("user@dest.test")
        started = time.monotonic()
        code, _ = client.data(message(test_id))
        return code, time.monotonic() - started


async def test_a_stalled_link_to_postgresql_gets_the_client_a_451_in_bounded_time_and_stores_nothing(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Item 3: the link stalls (no RST). The accept gives up after [spool] timeout or so and the client
    hears 451 4.3.0; the store it began is rolled back, so when the link comes back nothing is delivered
    of a message whose sender never saw a 250 (it would send it again: a duplicate)."""
    up = await upstream()
    proxy = await PgProxy(postgres_dsn).start()
    try:
        settings = node_settings(tmp_path / "n1", up, proxy.dsn, "n1", lease_ttl="30s")
        settings = settings.model_copy(update={"spool": settings.spool.model_copy(update={"timeout": 1.0})})
        app = App(settings)
        async with running(app):
            code, _ = await asyncio.to_thread(send_one, app.smtp_port, "before")
            assert code == 250
            await wait_until(lambda: len(up.received) >= 1, timeout=10)
            proxy.freeze()
            code, took = await asyncio.to_thread(send_one, app.smtp_port, "stalled")
            assert code == 451
            assert took < 5.0  # a turn at the writer (1 s), a statement (1 s), a margin
            proxy.thaw()
            await asyncio.sleep(3.0)  # the link is back: a store that lived on would commit and go now
            code, _ = await asyncio.to_thread(send_one, app.smtp_port, "after")
            assert code == 250  # the node connected again by itself
            await wait_until(lambda: len(up.received) >= 2, timeout=10)
            await asyncio.sleep(1.0)
            left = await left_in_spool(app.spool)
    finally:
        await proxy.stop()
    assert delivered_ids(up) == ["after", "before"]  # never "stalled"
    assert left == 0


async def refuse_bounce(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
    """550 to the message, 250 to its DSN (the null sender)."""
    return None if envelope.mail_from in ("", "<>") else "550 5.1.1 no such user"


async def test_a_bounce_whose_settle_commit_reply_was_lost_queues_one_dsn(
    tmp_path: Path, postgres_dsn: str, upstream: StartUpstream
) -> None:
    """Item 2: the settle of a bounce commits (with its DSN) but the reply is lost; the dispatcher
    retries it, and the retry finds it recorded: one DSN reaches the sender, not two."""
    up = await upstream(behaviour=refuse_bounce)
    proxy = await PgProxy(postgres_dsn).start()
    try:
        app = App(node_settings(tmp_path / "n1", up, proxy.dsn, "n1"))
        async with running(app):
            proxy.cut_after_commit(b"multipart/report")  # only a DSN's text carries it
            code, _ = await asyncio.to_thread(send_one, app.smtp_port, "bounced")
            assert code == 250
            await wait_until(lambda: any(r.sender in ("", "<>") for r in up.received), timeout=10)
            await asyncio.sleep(3.0)  # a second DSN, if the retry queued one, would come by now
            left = await left_in_spool(app.spool)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    assert len([r for r in up.received if r.sender in ("", "<>")]) == 1
    assert left == 0
