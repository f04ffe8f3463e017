"""Does postmux slow down or grow with a large queue? 1,000,000 deferred messages against none (issue 6).

    .venv/bin/python bench/queue_scale.py [--queued 1000000] [--due 10000] [--messages 10000] [--repeat 1]

1. **Fill.** A spool (the real schema, created by the real `SqliteSpool`) gets --queued messages of --size
   bytes, one recipient each, state `queued`, due in a day: a deferred backlog that is not due. The fill
   is a bulk insert with synchronous=OFF (fast; the rows are the same as `store` writes). The filled file
   is kept under the base directory and reused by later runs (`--refill` to rebuild it).
2. **Query plans.** EXPLAIN QUERY PLAN of every statement the spool runs, against the full file, and the
   time each takes there: a plan that SCANs a table (not through an index) costs in proportion to the queue.
3. **Runs.** For the empty spool and the full one (alternating, --repeat times): --due messages are added
   due now, then `postmux serve` starts on that spool (three smtp-sinks behind it, as bench/throughput).
   - startup s: from spawn until postmux listens (open, recovery);
   - dispatch msgs/s: the due messages through the scanner (`lease_due` -> deliver -> `settle`): --due over
     the span from the first to the last Delivery event in the events log;
   - accept msgs/s / end-to-end msgs/s: smtp-source --messages over --sessions, as bench/throughput;
   - peak RSS MB (VmHWM of postmux): must not grow with the queue, bodies stay on disk.
   The table shows each run and the ratio full / empty (issue 6 asks for rates within 20%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from throughput import (
    BenchError,
    delivery_results,
    ensure_tools,
    finish_report,
    inject,
    peak_rss_mb,
    pick_base_dir,
    run_main,
    running_postmux,
    scrape,
    start_sinks,
    stop_process,
    write_config,
)
from throughput import Options as ThroughputOptions

from postmux.envelope import new_message_id
from postmux.spool.sqlite import SqliteSpool
from postmux.spool.sqlite_schema import BAD_MESSAGES, BAD_RECIPIENTS

FILL_CHUNK = 50_000
DAY_S = 86_400.0
# The statements of src/postmux/spool/sqlite.py and sqlite_schema.py, verbatim, with sample parameters.
SPOOL_QUERIES: tuple[tuple[str, str, tuple[object, ...]], ...] = (
    # The quarantine checks at open are the spool's own text (imported), so they stay in step.
    ("quarantine check: messages (open)", BAD_MESSAGES, ()),
    ("quarantine check: recipients (open)", BAD_RECIPIENTS, ()),
    ("recover (open)", "UPDATE recipient SET state = 'queued' WHERE state = 'leased'", ()),
    (
        "lease_due: expired leases",
        "SELECT rid, message_id, address, pool, domain, attempts, rounds, local_errors"
        " FROM recipient INDEXED BY recipient_lease"
        " WHERE state = 'leased' AND lease_until <= ? ORDER BY lease_until LIMIT ?",
        (time.time(), 500),
    ),
    (
        "lease_due",
        "SELECT rid, message_id, address, pool, domain, attempts, rounds, local_errors FROM recipient"
        " WHERE state = 'queued' AND due <= ? ORDER BY due LIMIT ?",
        (time.time(), 500),
    ),
    (
        "lease_due: message",
        "SELECT sender, client_ip, smtputf8, created, data FROM message WHERE id = ?",
        ("x",),
    ),
    (
        "lease_due: lease",
        "UPDATE recipient SET state = 'leased', owner = ?, lease_until = ? WHERE rid IN (?, ?)",
        ("bench", None, 0, 1),
    ),
    (
        "renew",
        "UPDATE recipient INDEXED BY recipient_lease SET lease_until = ?"
        " WHERE state = 'leased' AND owner = ? AND lease_until IS NOT NULL",
        (time.time(), "bench"),
    ),
    (
        "settle: update",
        "UPDATE recipient SET state = ?, due = ?, attempts = max(attempts, ?), last_reply = ?,"
        " rounds = max(rounds, ?), local_errors = ?, last_member = coalesce(nullif(?, ''), last_member),"
        " last_at = ? WHERE rid = ?",
        ("delivered", 0.0, 1, "", 0, 0, "m", 0.0, 0),
    ),
    (
        "settle: keep attempts",
        "INSERT INTO attempt (message_id, rid, member, reply, at) VALUES (?, ?, ?, ?, ?)",
        ("x", 0, "m", "451", 0.0),
    ),
    (
        "settle: mark attempts kept",
        "UPDATE message SET attempts_kept = 1 WHERE id = ? AND attempts_kept = 0",
        ("x",),
    ),
    (
        "settle: open count",
        "SELECT count(*) FROM recipient WHERE message_id = ? AND state IN ('queued', 'leased', 'held')",
        ("x",),
    ),
    ("settle: delete recipients", "DELETE FROM recipient WHERE message_id = ?", ("x",)),
    ("settle: delete attempts (if kept)", "DELETE FROM attempt WHERE message_id = ?", ("x",)),
    ("settle: delete message", "DELETE FROM message WHERE id = ? RETURNING seg, attempts_kept", ("x",)),
    ("counts (every 2 s, app.py)", "SELECT state, count(*) FROM recipient GROUP BY state", ()),
)


@dataclass(frozen=True)
class Options:
    queued: int
    due: int
    messages: int
    sessions: int
    size: int
    repeat: int
    refill: bool
    delivery_timeout_s: float
    keep: bool


@dataclass
class Run:
    queue: str
    queued_before: int
    startup_s: float
    dispatch_rate: float
    accepted_rate: float
    end_to_end_rate: float
    peak_rss_mb: float
    load_before: float


# -- filling the spool -----------------------------------------------------------------------------------


def create_schema(path: Path) -> None:
    async def open_close() -> None:
        spool = SqliteSpool(path)
        await spool.open()
        await spool.close()

    asyncio.run(open_close())


def body(size: int) -> bytes:
    head = b"From: bench@example.com\r\nTo: user@dest.test\r\nSubject: queue scale\r\n\r\n"
    line = b"y" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def add_messages(path: Path, count: int, size: int, due: float) -> float:
    """Bulk insert `count` queued one-recipient messages due at `due`; returns seconds taken."""
    data = body(size)
    now = time.time()
    start = time.monotonic()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # the fill only: the runs use postmux's own FULL
        done = 0
        while done < count:
            n = min(FILL_CHUNK, count - done)
            # new_message_id is time-based with 4 random bytes; a counter suffix keeps a bulk fill unique.
            ids = [f"{new_message_id()}{i:06x}" for i in range(n)]
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO message (id, sender, client_ip, smtputf8, created, data)"
                " VALUES (?, 'bench@example.com', '127.0.0.1', 0, ?, ?)",
                ((mid, now, data) for mid in ids),
            )
            conn.executemany(
                "INSERT INTO recipient (message_id, address, pool, domain, state, due)"
                " VALUES (?, 'user@dest.test', 'default', 'dest.test', 'queued', ?)",
                ((mid, due) for mid in ids),
            )
            conn.execute("COMMIT")
            done += n
            if count >= 10 * FILL_CHUNK and done % (4 * FILL_CHUNK) == 0:
                print(f"    filled {done}/{count}", file=sys.stderr, flush=True)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.monotonic() - start


def queued_count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM recipient WHERE state = 'queued'").fetchone()[0])
    finally:
        conn.close()


def full_spool(base: Path, opts: Options) -> Path:
    """The filled spool, built once and reused while it holds exactly --queued queued recipients."""
    folder = base / f"postmux-queue-scale-{opts.queued}"
    path = folder / "spool.db"
    if path.exists() and not opts.refill and queued_count(path) == opts.queued:
        print(f"reusing {path} ({opts.queued} queued)", file=sys.stderr)
        return path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    create_schema(path)
    print(f"filling {path} with {opts.queued} messages of {opts.size} B ...", file=sys.stderr, flush=True)
    took = add_messages(path, opts.queued, opts.size, time.time() + DAY_S)
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"    {took:.0f}s, {opts.queued / took:.0f} msgs/s, {size_mb:.0f} MB on disk", file=sys.stderr)
    return path


# -- query plans -----------------------------------------------------------------------------------------


def explain(path: Path) -> list[dict[str, object]]:
    """Each spool statement's plan and its time on the full file (inside a transaction rolled back)."""
    out: list[dict[str, object]] = []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for name, sql, params in SPOOL_QUERIES:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            conn.execute("BEGIN")
            start = time.perf_counter()
            conn.execute(sql, params).fetchall()
            took_ms = 1000 * (time.perf_counter() - start)
            conn.execute("ROLLBACK")
            scans = [p for p in plan if p.startswith("SCAN") and "COVERING INDEX" not in p]
            whole = [p for p in plan if p.startswith("SCAN")]
            out.append({"statement": name, "plan": plan, "ms": took_ms, "scans_table": bool(scans or whole)})
    finally:
        conn.close()
    return out


# -- one run ---------------------------------------------------------------------------------------------


def wait_delivered(http_port: int, target: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if delivery_results(scrape(http_port)).get("delivered", 0.0) >= target:
            return time.monotonic() - start
        time.sleep(0.05)
    raise BenchError(f"{target} deliveries not reached in {timeout_s:.0f}s")


def run_once(queue: str, spool: Path, opts: Options, tools: tuple[str, str], sinks: list[int]) -> Run:
    """One postmux on `spool`: --due messages through the scanner, then --messages through SMTP."""
    load = os.getloadavg()[0]
    workdir = spool.parent
    for leftover in ("events.jsonl", "postmux.log"):
        (workdir / leftover).unlink(missing_ok=True)
    queued_before = queued_count(spool)
    add_messages(spool, opts.due, opts.size, time.time() - 1.0)
    config = write_config(workdir, True, sinks)
    spawned = time.monotonic()
    with running_postmux(config, workdir / "postmux.log") as (proc, smtp_port, http_port):
        startup_s = time.monotonic() - spawned
        wait_delivered(http_port, opts.due, opts.delivery_timeout_s)
        load_opts = ThroughputOptions(
            opts.messages, opts.messages, opts.sessions, opts.size, 1, opts.delivery_timeout_s, False
        )
        start = time.monotonic()
        accepted_s = inject(tools[0], smtp_port, load_opts, opts.messages)
        wait_delivered(http_port, opts.due + opts.messages, opts.delivery_timeout_s)
        end_to_end_s = time.monotonic() - start
        rss = peak_rss_mb(proc.pid)
    # The first --due deliveries are the scanner's (the SMTP load starts after they are all done).
    dispatch_rate = dispatch_span_rate(workdir / "events.jsonl", opts.due)
    return Run(
        queue=queue,
        queued_before=queued_before,
        startup_s=startup_s,
        dispatch_rate=dispatch_rate,
        accepted_rate=opts.messages / accepted_s,
        end_to_end_rate=opts.messages / end_to_end_s,
        peak_rss_mb=rss,
        load_before=load,
    )


def dispatch_span_rate(events: Path, due: int) -> float:
    """--due over the span of the first --due Delivery events (the scanner's, before any SMTP load)."""
    stamps: list[float] = []
    with events.open() as f:
        for line in f:
            record = json.loads(line)
            if record["type"] == "Delivery":
                stamps.append(float(record["timestamp"]))
    stamps.sort()
    if len(stamps) < due or due < 2:
        return float("nan")
    return (due - 1) / (stamps[due - 1] - stamps[0])


@contextmanager
def empty_spool(base: Path, keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="postmux-queue-scale-empty-", dir=base))
    try:
        path = folder / "spool.db"
        create_schema(path)
        yield path
    finally:
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# -- main ------------------------------------------------------------------------------------------------

COLUMNS = (
    ("startup s", "startup_s", "{:.2f}"),
    ("dispatch msgs/s", "dispatch_rate", "{:.0f}"),
    ("accepted msgs/s", "accepted_rate", "{:.0f}"),
    ("end-to-end msgs/s", "end_to_end_rate", "{:.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.1f}"),
)


def print_report(plans: list[dict[str, object]], runs: list[Run]) -> dict[str, float]:
    print("\n| statement | plan | ms on the full spool |\n|---|---|---:|")
    for p in plans:
        plan = "; ".join(str(x) for x in p["plan"])  # type: ignore[attr-defined]
        flag = " **(scans)**" if p["scans_table"] else ""
        print(f"| {p['statement']} | {plan}{flag} | {p['ms']:.1f} |")
    print("\n| queue | queued before | " + " | ".join(t for t, _, _ in COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for r in runs:
        cells = [fmt.format(getattr(r, key)) for _, key, fmt in COLUMNS]
        print(f"| {r.queue} | {r.queued_before} | " + " | ".join(cells) + " |")
    ratio: dict[str, float] = {}
    for _, key, _ in COLUMNS:
        full = statistics.median(getattr(r, key) for r in runs if r.queue == "full")
        empty = statistics.median(getattr(r, key) for r in runs if r.queue == "empty")
        ratio[key] = full / empty if empty else float("nan")
    print("| ratio full / empty (medians) | | " + " | ".join(f"{ratio[k]:.2f}" for _, k, _ in COLUMNS) + " |")
    return ratio


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queued", type=int, default=1_000_000, help="deferred messages in the full spool")
    p.add_argument("--due", type=int, default=10_000, help="messages due now, through the scanner")
    p.add_argument("--messages", type=int, default=10_000, help="smtp-source messages per run")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--repeat", type=int, default=1, help="empty / full pairs (alternating)")
    p.add_argument("--refill", action="store_true", help="rebuild the full spool even if one is kept")
    p.add_argument("--delivery-timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the empty spools' directories")
    a = p.parse_args(argv)
    if min(a.queued, a.due, a.messages, a.sessions, a.size, a.repeat) < 1:
        p.error("every count must be at least 1")
    return Options(
        a.queued, a.due, a.messages, a.sessions, a.size, a.repeat, a.refill, a.delivery_timeout, a.keep
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = ensure_tools()
    base, kind = pick_base_dir()
    print(f"spools under {base} (filesystem {kind})", file=sys.stderr)
    full = full_spool(base, opts)
    plans = explain(full)
    sinks = start_sinks(tools[1], 3)
    runs: list[Run] = []
    try:
        for i in range(opts.repeat):
            for queue in ("empty", "full"):
                print(f"[{i + 1}/{opts.repeat}] {queue} queue ...", file=sys.stderr, flush=True)
                if queue == "full":
                    r = run_once(queue, full, opts, tools, [port for port, _ in sinks])
                else:
                    with empty_spool(base, opts.keep) as path:
                        r = run_once(queue, path, opts, tools, [port for port, _ in sinks])
                print(f"    {asdict(r)}", file=sys.stderr, flush=True)
                runs.append(r)
    finally:
        for _, proc in sinks:
            stop_process(proc, 10.0)
    ratio = print_report(plans, runs)
    left = queued_count(full)
    problems = [] if left == opts.queued else [f"full spool has {left} queued, not {opts.queued}"]
    return finish_report(
        "queue-scale",
        opts,
        runs,
        problems,
        filesystem=kind,
        plans=plans,
        ratio_full_over_empty=ratio,
    )


if __name__ == "__main__":
    run_main(main)
