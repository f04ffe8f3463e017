"""The cost of the PostgreSQL spool's commit path: one transaction storing a batch of small messages.

Measures psycopg 3 (async, pipeline mode) beside asyncpg (executemany), each on one connection to the local
PostgreSQL (127.0.0.1:5432, trust auth), storing a batch of N messages of 1.5 KB with one recipient each
(a message row with its bytes and a recipient row, as the spool writes them), then COMMIT: the group
commit the spool does. Prints the median time per batch and per message over `--repeat` batches.

Then the spools themselves: `--concurrency` stores at once (as many SMTP sessions' accepts), group
committed, on the PostgreSQL spool and on the SQLite spool (a file in a temporary directory on disk, not
tmpfs), each store a 1.5 KB message to one recipient, leased: wall time per message and commits used.

Usage: .venv/bin/python bench/pg_commit.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
It creates a database of its own (postmux_bench_<random>) and drops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
import psycopg

from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import SpoolBackend
from postmux.spool.postgres import PostgresSpool
from postmux.spool.sqlite import SqliteSpool

SCHEMA = """
CREATE TABLE message (id TEXT PRIMARY KEY, sender TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
                      data BYTEA NOT NULL);
CREATE TABLE recipient (rid BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, address TEXT NOT NULL,
                        state TEXT NOT NULL, due DOUBLE PRECISION NOT NULL);
"""
BODY = b"Subject: bench\r\n\r\n" + b"x" * 1480 + b"\r\n"


def rows(n: int) -> list[tuple[str, str, float, bytes]]:
    return [(secrets.token_hex(8), "bench@example.com", time.time(), BODY) for _ in range(n)]


async def psycopg_batch(conn: psycopg.AsyncConnection[object], n: int) -> float:
    batch = rows(n)
    start = time.perf_counter()
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO message (id, sender, created, data) VALUES (%s, %s, %s, %s)", batch
        )
        await cur.executemany(
            "INSERT INTO recipient (message_id, address, state, due) VALUES (%s, 'a@b.test', 'leased', %s)",
            [(r[0], r[2]) for r in batch],
        )
    return time.perf_counter() - start


async def asyncpg_batch(conn: asyncpg.Connection, n: int) -> float:
    batch = rows(n)
    start = time.perf_counter()
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO message (id, sender, created, data) VALUES ($1, $2, $3, $4)", batch
        )
        await conn.executemany(
            "INSERT INTO recipient (message_id, address, state, due) VALUES ($1, 'a@b.test', 'leased', $2)",
            [(r[0], r[2]) for r in batch],
        )
    return time.perf_counter() - start


async def spool_stores(spool: SpoolBackend, concurrency: int, rounds: int) -> tuple[float, float]:
    """Microseconds per message over `rounds` rounds of `concurrency` stores at once, and messages per
    commit."""
    await spool.open()
    try:
        env = Envelope("bench@example.com", ("a@b.test",), BODY)
        commits, start = spool.commits, time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(
                *(
                    spool.store(new_message_id(), env, {"a@b.test": "p"}, time.time())
                    for _ in range(concurrency)
                )
            )
        elapsed = time.perf_counter() - start
        n = concurrency * rounds
        return elapsed / n * 1e6, n / max(1, spool.commits - commits)
    finally:
        await spool.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--concurrency", default="1,20,200")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    name = f"postmux_bench_{secrets.token_hex(4)}"
    admin = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + name
    try:
        pg = await psycopg.AsyncConnection.connect(dsn)
        await pg.execute(SCHEMA)
        await pg.commit()
        apg = await asyncpg.connect(dsn)
        print(f"{'driver':10} {'batch':>6} {'ms/batch':>9} {'us/msg':>8}")
        for n in (int(s) for s in args.sizes.split(",")):
            for label in ("psycopg", "asyncpg"):

                async def run(label: str = label, n: int = n) -> float:
                    return await (psycopg_batch(pg, n) if label == "psycopg" else asyncpg_batch(apg, n))

                await run()  # warm: prepared statements, caches
                times = [await run() for _ in range(args.repeat)]
                med = statistics.median(times)
                print(f"{label:10} {n:>6} {med * 1e3:>9.2f} {med / n * 1e6:>8.1f}")
        await pg.execute("CREATE SCHEMA spool")  # the spool's own tables, apart from the drivers' above
        await pg.commit()
        await pg.close()
        await apg.close()
        print(f"\n{'spool':10} {'stores at once':>14} {'us/msg':>8} {'msgs/commit':>12}")
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
            for c in (int(x) for x in args.concurrency.split(",")):
                for label, spool in (
                    ("postgresql", PostgresSpool(dsn + "?search_path=spool", lease_ttl_s=60)),
                    ("sqlite", SqliteSpool(Path(tmp) / f"spool-{c}.db")),
                ):
                    us, per_commit = await spool_stores(spool, c, args.rounds)
                    print(f"{label:10} {c:>14} {us:>8.1f} {per_commit:>12.1f}")
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
