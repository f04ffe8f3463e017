"""What the suppression list costs per RCPT, and what loading it costs at start (issue 15).

    .venv/bin/python bench/suppression_lookup.py [--entries 100000] [--lookups 200000]

Fills a SQLite spool's suppression table with --entries entries (9 in 10 addresses, 1 in 10 *@domain,
a tenth of them scoped to a sender domain), loads them as a node does at start, then times
SuppressionList.refusal for recipients that are listed, listed by their domain, and not listed (the usual
case: every scope is looked at). Prints µs per lookup (median of 5 rounds), the load time, and the
memory the index takes (tracemalloc).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from postmux.config import SuppressionSettings
from postmux.reputation.suppression import SuppressionList, entry
from postmux.spool.sqlite import SqliteSpool


def per_lookup_us(listed: SuppressionList, recipients: list[str], sender: str, n: int) -> float:
    k = len(recipients)
    start = time.perf_counter()
    for i in range(n):
        listed.refusal(recipients[i % k], sender)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(7)
    now = time.time()
    entries = []
    for i in range(args.entries):
        address = f"*@d{i}.example" if i % 10 == 0 else f"user{i}@d{i % 5000}.example"
        scope = f"sender_domain:s{i % 50}.example" if i % 10 == 1 else "global"
        entries.append(entry(address, reason="bench", source="manual", scope=scope, created=now))
    with tempfile.TemporaryDirectory() as tmp:
        spool = SqliteSpool(Path(tmp) / "spool.db")
        await spool.open()
        start = time.perf_counter()
        await spool.suppression_put(entries)
        put_s = time.perf_counter() - start
        listed = SuppressionList(spool, SuppressionSettings())
        start = time.perf_counter()
        await listed.load()
        load_s = time.perf_counter() - start
        # Again under tracemalloc, which slows the load down: what the index keeps once it is loaded.
        tracemalloc.start()
        measured = SuppressionList(spool, SuppressionSettings())
        await measured.load()
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del measured
        await spool.close()
    listed_rcpts = [
        f"user{i}@d{i % 5000}.example" for i in rng.sample(range(args.entries), 1000) if i % 10 > 1
    ]
    domain_rcpts = [f"someone@d{i}.example" for i in range(0, args.entries, 10)][:1000]
    clean_rcpts = [f"clean{i}@c{i % 97}.example" for i in range(1000)]
    for name, rcpts in (("listed", listed_rcpts), ("by domain", domain_rcpts), ("not listed", clean_rcpts)):
        figures = [per_lookup_us(listed, rcpts, "app@s3.example", args.lookups) for _ in range(5)]
        print(f"{name:11s} {statistics.median(figures):5.2f} µs per RCPT lookup")
    print(
        f"{args.entries} entries: written in {put_s:.2f} s (one transaction), loaded in {load_s:.2f} s, "
        f"index {size / 1e6:.0f} MB"
    )


if __name__ == "__main__":
    asyncio.run(main())
