"""A node on a PostgreSQL spool that fails or loses replies (outage review, /work/review/outage.md):

- item 1: a node renews only the leases of work it holds. A row leased to it whose work it does not
  have (a store whose commit reply was lost, an outcome it gave up recording) runs out and is taken by
  the next scan, never held until a restart; an outcome the spool refuses for a while is recorded once
  it answers, so the mail goes once.

The spool's refusals are real PostgreSQL ones: a trigger in the test's schema that refuses to settle a
recipient, dropped when the "outage" ends.
"""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg

from postmux.app import App
from postmux.envelope import Envelope, new_message_id
from postmux.scheduling.dispatcher import DispatchLimits
from postmux.spool.postgres import PostgresSpool
from tests.integration.test_postgres_spool import delivered_ids, left_in_spool, node_settings, running
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
