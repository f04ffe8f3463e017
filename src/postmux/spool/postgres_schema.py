"""The PostgreSQL spool's tables and their migrations (`postmux migrate`).

The schema has a version (table postmux_schema). `migrate` applies the steps above the stored version,
each in its own transaction, under an advisory lock so two nodes starting at once do not both apply it.
At open, a database without the tables gets them (a fresh database: the first node's start is enough);
a database at an older version is refused with "run postmux migrate", so an upgrade that changes tables
is the operator's step, taken once, not a side effect of whichever node restarts first; a newer version
is refused too (an older postmux must not write tables it does not know).

Times are Unix seconds in double precision, as the SQLite spool's REAL columns; message texts are bytea
in their row, so any node can deliver any message (no text on one node's disk).
"""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger("postmux.spool")

# Advisory lock keys (pg_advisory_xact_lock): the migration, and the webhook outbox's appends (see
# postgres_queue.outbox_append). Arbitrary constants, the same on every node.
MIGRATION_LOCK = 7_001_017
OUTBOX_LOCK = 7_001_018

# Each step is applied once, in order; the version is its position (1-based). Never edit a step that
# shipped: add one.
STEPS: tuple[str, ...] = (
    """
    CREATE TABLE message (
        id                TEXT COLLATE "C" PRIMARY KEY,  -- ids sort by acceptance time, bytewise
        sender            TEXT NOT NULL,
        client_ip         TEXT NOT NULL DEFAULT '',
        smtputf8          BOOLEAN NOT NULL DEFAULT false,
        created           DOUBLE PRECISION NOT NULL,
        data              BYTEA NOT NULL,
        clean             BOOLEAN NOT NULL DEFAULT false,
        message_id_header TEXT NOT NULL DEFAULT '',
        labels            TEXT NOT NULL DEFAULT '',
        attempts_kept     BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE recipient (
        rid          BIGSERIAL PRIMARY KEY,
        message_id   TEXT COLLATE "C" NOT NULL,
        address      TEXT NOT NULL,
        pool         TEXT NOT NULL,
        domain       TEXT NOT NULL,
        state        TEXT NOT NULL,
        due          DOUBLE PRECISION NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        last_reply   TEXT NOT NULL DEFAULT '',
        rounds       INTEGER NOT NULL DEFAULT 0,
        local_errors INTEGER NOT NULL DEFAULT 0,
        owner        TEXT NOT NULL DEFAULT '',
        lease_until  DOUBLE PRECISION,
        last_member  TEXT NOT NULL DEFAULT '',
        last_at      DOUBLE PRECISION
    );
    -- lease_due's two searches: due queued work, and leases that can run out (a node that died).
    CREATE INDEX recipient_due ON recipient (due) WHERE state = 'queued';
    CREATE INDEX recipient_lease ON recipient (lease_until)
        WHERE state = 'leased' AND lease_until IS NOT NULL;
    CREATE INDEX recipient_owner ON recipient (owner) WHERE state = 'leased';
    CREATE INDEX recipient_message ON recipient (message_id);
    CREATE TABLE attempt (
        aid        BIGSERIAL PRIMARY KEY,
        message_id TEXT NOT NULL,
        rid        BIGINT NOT NULL,
        member     TEXT NOT NULL,
        reply      TEXT NOT NULL,
        at         DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX attempt_message ON attempt (message_id);
    CREATE TABLE idempotency (
        client       TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        answer       TEXT NOT NULL,
        created      DOUBLE PRECISION NOT NULL,
        expires      DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (client, key)
    );
    CREATE INDEX idempotency_expires ON idempotency (expires);
    CREATE TABLE webhook_outbox (
        seq      BIGSERIAL PRIMARY KEY,
        endpoint TEXT NOT NULL,
        event_id TEXT NOT NULL,
        created  DOUBLE PRECISION NOT NULL,
        record   TEXT NOT NULL
    );
    CREATE INDEX webhook_outbox_endpoint ON webhook_outbox (endpoint, seq);
    CREATE TABLE suppression (
        address TEXT NOT NULL,
        scope   TEXT NOT NULL,
        reason  TEXT NOT NULL,
        source  TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION,
        PRIMARY KEY (address, scope)
    );
    """,
)
LATEST = len(STEPS)


class SchemaError(Exception):
    """The database's schema is not the one this postmux writes: what to do is in the message."""


async def version(conn: asyncpg.Connection) -> int | None:
    """The schema version stored, or None when the database has no postmux tables yet."""
    present = await conn.fetchval("SELECT to_regclass('postmux_schema') IS NOT NULL")
    if not present:
        return None
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM postmux_schema"))


async def migrate(conn: asyncpg.Connection) -> tuple[int, int]:
    """Apply every step above the stored version; returns (version before, version after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS postmux_schema (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION"
            " NOT NULL DEFAULT extract(epoch FROM now()))"
        )
        before = await version(conn) or 0
        if before > LATEST:
            raise SchemaError(
                f"the database's schema is version {before}, newer than this postmux ({LATEST})"
            )
        for number in range(before + 1, LATEST + 1):
            await conn.execute(STEPS[number - 1])
            await conn.execute("INSERT INTO postmux_schema (version) VALUES ($1)", number)
            log.info("spool schema migrated", version=number)
    return before, LATEST


async def migrate_database(dsn: str) -> tuple[int, int]:
    """`postmux migrate`: connect, migrate, disconnect. SchemaError for a newer schema; asyncpg's errors
    (unreachable server, refused login) as they come."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def prepare(conn: asyncpg.Connection) -> None:
    """At open: create the tables in an empty database; refuse one at another version."""
    found = await version(conn)
    if found is None or found == 0:
        await migrate(conn)
    elif found < LATEST:
        raise SchemaError(
            f"the database's schema is version {found}, this postmux writes {LATEST}: run `postmux migrate`"
        )
    elif found > LATEST:
        raise SchemaError(f"the database's schema is version {found}, newer than this postmux ({LATEST})")
