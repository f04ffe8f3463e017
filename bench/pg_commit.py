"""The cost of the PostgreSQL spool's commit path: one transaction storing a batch of small messages.

Measures psycopg 3 (async, pipeline mode) beside asyncpg (executemany), each on one connection to the local
PostgreSQL (127.0.0.1:5432, trust auth), storing a batch of N messages of 1.5 KB with one recipient each
(a message row with its bytes and a recipient row, as the spool writes them), then COMMIT: the group
commit the spool does. Prints the median time per batch and per message over `--repeat` batches.

Usage: .venv/bin/python bench/pg_commit.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
It creates a database of its own (postmux_bench_<random>) and drops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import asyncpg
import psycopg

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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--sizes", default="1,10,100,1000")
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
        await pg.close()
        await apg.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
