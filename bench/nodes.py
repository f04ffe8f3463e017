"""1, 2 and 3 postmux nodes on one PostgreSQL spool beside 1 node on SQLite and Postfix, one run (issue 17).

    .venv/bin/python bench/nodes.py [--messages N] [--sessions S] [--sizes 1500] [--rounds R]

Five setups in the same sitting on the same three `smtp-sink -c` upstreams (bench/vs_postfix.py's), taken in
rounds (A B C D E, then again), each round giving ratios of runs a few minutes apart:

- `postfix`: a private Postfix relaying to the first sink (vs_postfix.py's, queue on disk);
- `sqlite-1`: one `postmux serve` on a SQLite spool (vs_postfix.py's postmux: round_robin over the sinks);
- `pg-1`, `pg-2`, `pg-3`: 1, 2 or 3 nodes on one PostgreSQL spool and one Redis for their throttles: a
  database created for the run (postmux_bench_<random> on --dsn's server) and dropped after it, a Redis key
  prefix of the run's own whose keys are deleted after it;
- `pg-1-memory` (only with --setups): 1 node on PostgreSQL with its throttles in its own memory, which tells
  the spool's cost from the Redis throttles'.

Each run injects N messages with `smtp-source` (a new connection per message), spread evenly over the nodes'
SMTP ports as HAProxy would: one smtp-source per node with its share of the S sessions and of the messages.
Per run: end-to-end msgs/s (N over the time from the start of injection until the sinks counted N more),
accepted msgs/s (N over the time until the last smtp-source finished: every message had its 250), and CPU
per message, measured as the growth between the start of the injection and the end of the delivery:

- the system's own processes (postmux nodes with their children; Postfix's master with its children);
- with PostgreSQL, the server's processes (children of the postmaster, found via /proc): the backends
  connected to the run's database, and the server's shared background processes (walwriter, checkpointer,
  background writer, autovacuum), which also work for other users of the server: their figure in the
  runs without PostgreSQL is that noise;
- Redis's CPU (INFO cpu, a server shared with others: the same noise caveat);

and the commit path's footprint: the spools' commits per message (postmux_spool_commits_total summed over
the nodes: group commit at work), WAL bytes per message (pg_current_wal_lsn, server wide), transactions
committed per message in the run's database (pg_stat_database.xact_commit, read after the nodes stopped, so
that every backend has flushed its counters; a SELECT on its own counts as a transaction) and Redis commands
per message (INFO stats, server wide). Besides creating and dropping its own database, the bench only reads
(pg_stat_activity, pg_stat_database, INFO). The result goes to bench/out/nodes-*.json with the machine, the
load averages and every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
from throughput import (
    BenchError,
    Timed,
    cpu_seconds,
    delivery_results,
    finish_report,
    pick_base_dir,
    received_total,
    run_main,
    running_postmux,
    scrape,
    source_command,
    stop_process,
    write_config,
)
from vs_postfix import (
    Sink,
    children_of,
    counting_sinks,
    ensure_postfix,
    postfix_target,
    sink_total,
    tree_cpu_seconds,
    wait_sinks,
)

from postmux.testing import delete_prefix

SERVER_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
SETTLE_S = 1.0  # after the nodes are up, before the measurement starts: their start-up work is done
AFTER_S = 0.5  # after the sinks counted everything: duplicates would show up now
# The server's own processes: they serve every database (and other users of the server), not one run.
PG_BACKGROUND = ("walwriter", "checkpointer", "background writer", "autovacuum launcher", "autovacuum worker")


@dataclass(frozen=True)
class Setup:
    name: str
    title: str
    nodes: int
    backend: str  # "postfix", "sqlite" or "postgresql"
    redis: bool = True  # with PostgreSQL: [throttles] in Redis (False: each node's memory)


SETUPS = (
    Setup("postfix", "Postfix", 1, "postfix"),
    Setup("sqlite-1", "postmux, 1 node, SQLite", 1, "sqlite"),
    Setup("pg-1", "postmux, 1 node, PostgreSQL + Redis", 1, "postgresql"),
    Setup("pg-2", "postmux, 2 nodes, PostgreSQL + Redis", 2, "postgresql"),
    Setup("pg-3", "postmux, 3 nodes, PostgreSQL + Redis", 3, "postgresql"),
    # Not in the default run: the PostgreSQL spool alone, to tell its cost from the Redis throttles'.
    Setup("pg-1-memory", "postmux, 1 node, PostgreSQL, throttles in memory", 1, "postgresql", redis=False),
)
DEFAULT_SETUPS = ("postfix", "sqlite-1", "pg-1", "pg-2", "pg-3")
BASELINES = ("postfix", "sqlite-1")  # the ratios' denominators
COMMITS = re.compile(r"^postmux_spool_commits_total\s+([0-9.eE+-]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Options:
    messages: int
    sessions: int
    sizes: tuple[int, ...]
    rounds: int
    delivery_timeout_s: float
    time_limit_s: float
    dsn: str
    redis_url: str
    workers: int
    lease_ttl_s: float
    keep: bool
    setups: tuple[str, ...] = DEFAULT_SETUPS


@dataclass
class Run(Timed):
    setup: str
    nodes: int
    size: int
    round: int
    messages: int
    accepted_s: float
    end_to_end_s: float
    system_cpu_s: float  # postmux's processes, or Postfix's
    pg_backend_cpu_s: float  # the run database's backends
    pg_background_cpu_s: float  # the server's shared processes
    redis_cpu_s: float
    redis_commands: int
    wal_bytes: int
    xact_commit: int
    xact_rollback: int
    tup_inserted: int
    tup_updated: int
    tup_deleted: int
    spool_commits: int  # transactions the nodes' spools committed (postmux_spool_commits_total)
    load_before: float
    throttle_fallbacks: int  # times a node's Redis call timed out and it went on with its share of limits
    problems: list[str] = field(default_factory=list)

    def per_message_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.messages

    @property
    def total_cpu_s(self) -> float:
        return self.system_cpu_s + self.pg_backend_cpu_s + self.pg_background_cpu_s + self.redis_cpu_s


# -- the shared servers: a database and a key prefix of the run's own, and what they spent ---------------


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))


def pg_query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            return list(await conn.fetch(sql, *args, timeout=30))
        finally:
            await conn.close()

    return asyncio.run(run())


@contextlib.contextmanager
def bench_database(server_dsn: str) -> Iterator[str]:
    """CREATE DATABASE postmux_bench_<random>, yield its name; DROP it (that name only) after."""
    name = f"postmux_bench_{secrets.token_hex(4)}"
    pg_query(server_dsn, f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        # FORCE: a backend the nodes left behind must not keep it.
        pg_query(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def redis_prefix(url: str) -> Iterator[str]:
    """A key prefix of the run's own; every key under it is deleted after (only those)."""
    prefix = f"postmux-bench:{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=10.0)
        try:
            delete_prefix(client, prefix)
        finally:
            client.close()


@dataclass(frozen=True)
class ServerSnapshot:
    backends: dict[int, float]  # pid -> CPU seconds, the run database's backends
    background: dict[int, float]  # pid -> CPU seconds, the server's shared processes
    wal_position: int  # bytes of WAL the server has written since it was made
    redis_cpu_s: float
    redis_commands: int  # commands Redis processed (all its clients)


class Servers:
    """Reads what PostgreSQL and Redis spent: CPU per process from /proc, the WAL position, Redis's INFO.
    Queries go to the server's maintenance database (--dsn), never to the run's: they cost it nothing."""

    def __init__(self, dsn: str, redis_url: str) -> None:
        self.dsn = dsn
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=10.0)
        try:
            self.redis.ping()
        except redis.exceptions.RedisError as e:
            raise BenchError(
                f"Redis at {redis_url} does not answer ({e}); give another with --redis"
            ) from None
        self.postmaster = self._postmaster()

    def _postmaster(self) -> int:
        """The postmaster is the parent of every server process: of the checkpointer, which lives as long."""
        try:
            rows = pg_query(self.dsn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
        except (OSError, asyncpg.PostgresError) as e:
            raise BenchError(
                f"PostgreSQL at --dsn does not answer ({e}); the bench needs a local server"
            ) from None
        pid = rows[0]["pid"] if rows else 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        raise BenchError(f"PostgreSQL's checkpointer ({pid}) not in /proc: is the server on this machine?")

    def snapshot(self, database: str | None) -> ServerSnapshot:
        rows = pg_query(
            self.dsn,
            "SELECT pid, datname, backend_type, pg_current_wal_lsn() - '0/0'::pg_lsn AS wal"
            " FROM pg_stat_activity",
        )
        children = set(children_of(self.postmaster))
        backends: dict[int, float] = {}
        background: dict[int, float] = {}
        for row in rows:
            if row["pid"] not in children:
                continue  # gone, or not the server's process
            if (
                database is not None
                and row["datname"] == database
                and row["backend_type"] == "client backend"
            ):
                with contextlib.suppress(OSError):
                    backends[row["pid"]] = cpu_seconds(row["pid"])
            elif row["backend_type"] in PG_BACKGROUND:
                with contextlib.suppress(OSError):
                    background[row["pid"]] = cpu_seconds(row["pid"])
        cpu, stats = self.redis.info("cpu"), self.redis.info("stats")
        redis_cpu = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        commands = int(stats["total_commands_processed"])
        return ServerSnapshot(backends, background, int(rows[0]["wal"]), redis_cpu, commands)

    def database_counters(self, database: str) -> dict[str, int]:
        rows = pg_query(
            self.dsn,
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted"
            " FROM pg_stat_database WHERE datname = $1",
            database,
        )
        return {k: int(v) for k, v in rows[0].items()} if rows else {}

    def close(self) -> None:
        self.redis.close()


def grown(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two snapshots by the processes alive at the second (a process started in between
    counts whole; one that ended in between is lost: the nodes' connections live as long as the nodes)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# -- the systems under test ------------------------------------------------------------------------------


@dataclass
class Running:
    """A setup while it runs: where to send, its processes' CPU so far, and its checks."""

    ports: list[int]
    cpu_s: Callable[[], float]
    check: Callable[[int], list[str]]
    spool_commits: Callable[[], int] = lambda: 0


@contextlib.contextmanager
def postfix_running(workdir: Path, sinks: Sequence[Sink]) -> Iterator[Running]:
    with postfix_target(workdir, sinks) as target:
        yield Running([target.port], target.cpu_s, target.check)


def node_config(
    node_dir: Path, sinks: Sequence[Sink], opts: Options, index: int, database: str | None, prefix: str | None
) -> Path:
    ports = [s.port for s in sinks]
    if database is None:
        return write_config(node_dir, True, ports, opts.workers)
    spool = (
        'backend = "postgresql"\n'
        f'dsn = "{with_database(opts.dsn, database)}"\n'
        f'node_id = "bench-node-{index}"\n'
        f'lease_ttl = "{opts.lease_ttl_s}s"\n'
    )
    extra = f'\n[node]\nname = "bench-node-{index}"\n'
    if prefix is not None:
        extra += f'\n[throttles]\nbackend = "redis"\nurl = "{opts.redis_url}"\nprefix = "{prefix}"\n'
    return write_config(node_dir, True, ports, opts.workers, spool=spool, extra=extra)


@contextlib.contextmanager
def postmux_running(
    workdir: Path,
    sinks: Sequence[Sink],
    opts: Options,
    nodes: int,
    database: str | None,
    prefix: str | None,
) -> Iterator[Running]:
    """`nodes` postmux serve processes, started one after another (the first creates the schema)."""
    with contextlib.ExitStack() as stack:
        started: list[tuple[int, int, int]] = []  # (pid, smtp port, http port)
        for i in range(1, nodes + 1):
            node_dir = workdir / f"node-{i}"
            node_dir.mkdir()
            config = node_config(node_dir, sinks, opts, i, database, prefix)
            proc, smtp_port, http_port = stack.enter_context(
                running_postmux(config, node_dir / "postmux.log")
            )
            started.append((proc.pid, smtp_port, http_port))

        def check(expected: int) -> list[str]:
            """Summed over the nodes: on one spool a node delivers what another accepted."""
            texts = [scrape(http) for _, _, http in started]
            received = sum(received_total(t) for t in texts)
            results: dict[str, float] = {}
            for t in texts:
                for result, n in delivery_results(t).items():
                    results[result] = results.get(result, 0.0) + n
            problems = []
            if received != expected:
                problems.append(f"postmux received {received} != {expected}")
            delivered = int(results.pop("delivered", 0.0))
            if delivered != expected:
                problems.append(f"postmux delivered {delivered} != {expected}")
            if any(results.values()):
                problems.append(f"postmux other delivery results {results}")
            return problems

        def commits() -> int:
            found = (COMMITS.search(scrape(http)) for _, _, http in started)
            return sum(int(float(m.group(1))) for m in found if m)

        yield Running(
            [smtp for _, smtp, _ in started],
            lambda: sum(tree_cpu_seconds(pid) for pid, _, _ in started),
            check,
            commits,
        )


# -- load ------------------------------------------------------------------------------------------------


def shares(total: int, parts: int) -> list[int]:
    """`total` in `parts` as even as whole numbers go (the first ones take the remainder)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def inject_spread(source: str, ports: Sequence[int], opts: Options, size: int) -> float:
    """One smtp-source per port, with its share of the sessions and messages in proportion (so they end
    together), all at once: the load HAProxy would spread over the nodes. Seconds until the last ends."""
    sessions = shares(max(opts.sessions, len(ports)), len(ports))
    messages = [opts.messages * s // sum(sessions) for s in sessions]
    messages[0] += opts.messages - sum(messages)
    timeout_s = max(120.0, opts.messages / 20.0)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            source_command(source, port, s, m, size), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for port, s, m in zip(ports, sessions, messages, strict=True)
    ]
    try:
        errors = []
        for port, proc in zip(ports, procs, strict=True):
            _, err = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
            if proc.returncode != 0:
                why = err.decode(errors="replace").strip()
                errors.append(
                    f"smtp-source to port {port} exited {proc.returncode} (a message was refused): {why}"
                )
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish {opts.messages} messages in {timeout_s:.0f}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop_process(proc, 5.0)
    if errors:
        raise BenchError("; ".join(errors))
    return time.monotonic() - start


# -- one run ---------------------------------------------------------------------------------------------


def run_once(
    setup: Setup, size: int, round_: int, opts: Options, source: str, sinks: Sequence[Sink], servers: Servers
) -> Run:
    base, _ = pick_base_dir()
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix=f"nodes-{setup.name}-", dir=base))
    try:
        with contextlib.ExitStack() as stack:
            database = prefix = None
            if setup.backend == "postgresql":
                database = stack.enter_context(bench_database(opts.dsn))
            if setup.backend == "postgresql" and setup.redis:
                prefix = stack.enter_context(redis_prefix(opts.redis_url))
            if setup.backend == "postfix":
                running = postfix_running(workdir, sinks)
            else:
                running = postmux_running(workdir, sinks, opts, setup.nodes, database, prefix)
            with running as target:
                time.sleep(SETTLE_S)
                counters_before = servers.database_counters(database) if database else {}
                before, cpu_before = servers.snapshot(database), target.cpu_s()
                commits_before = target.spool_commits()
                sinks_before = sink_total(sinks)
                start = time.monotonic()
                accepted_s = inject_spread(source, target.ports, opts, size)
                end_to_end_s = wait_sinks(sinks, sinks_before + opts.messages, start, opts.delivery_timeout_s)
                time.sleep(AFTER_S)
                after, cpu_after = servers.snapshot(database), target.cpu_s()
                commits = target.spool_commits() - commits_before
                problems = target.check(opts.messages)
            # Read once the nodes stopped: a backend flushes its counters when it ends.
            counters = servers.database_counters(database) if database else {}
        extra = sink_total(sinks) - sinks_before - opts.messages
        logs = (p.read_text(errors="replace") for p in workdir.glob("node-*/postmux.log"))
        fallbacks = sum(text.count("throttles fell back") for text in logs)
        if extra:
            problems.append(f"{setup.name}: the sinks got {extra} more messages than were sent (duplicates)")
        delta = {k: counters[k] - counters_before.get(k, 0) for k in counters}
        return Run(
            setup=setup.name,
            nodes=setup.nodes,
            size=size,
            round=round_,
            messages=opts.messages,
            accepted_s=accepted_s,
            end_to_end_s=end_to_end_s,
            system_cpu_s=cpu_after - cpu_before,
            pg_backend_cpu_s=grown(before.backends, after.backends),
            pg_background_cpu_s=grown(before.background, after.background),
            redis_cpu_s=after.redis_cpu_s - before.redis_cpu_s,
            # minus the two INFO calls of the snapshot before
            redis_commands=after.redis_commands - before.redis_commands - 2,
            wal_bytes=after.wal_position - before.wal_position,
            xact_commit=delta.get("xact_commit", 0),
            xact_rollback=delta.get("xact_rollback", 0),
            tup_inserted=delta.get("tup_inserted", 0),
            tup_updated=delta.get("tup_updated", 0),
            tup_deleted=delta.get("tup_deleted", 0),
            spool_commits=commits,
            load_before=load,
            throttle_fallbacks=fallbacks,
            problems=problems,
        )
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------------------------

# (title, value of a run, format): the table shows each column's median over the rounds.
COLUMNS: tuple[tuple[str, Callable[[Run], float], str], ...] = (
    ("end-to-end msgs/s", lambda r: r.end_to_end_rate, "{:.0f}"),
    ("accepted msgs/s", lambda r: r.accepted_rate, "{:.0f}"),
    ("CPU ms/msg: postmux or Postfix", lambda r: r.per_message_ms(r.system_cpu_s), "{:.2f}"),
    ("PostgreSQL backends", lambda r: r.per_message_ms(r.pg_backend_cpu_s), "{:.2f}"),
    ("PostgreSQL background (shared)", lambda r: r.per_message_ms(r.pg_background_cpu_s), "{:.2f}"),
    ("Redis (shared)", lambda r: r.per_message_ms(r.redis_cpu_s), "{:.2f}"),
    ("total", lambda r: r.per_message_ms(r.total_cpu_s), "{:.2f}"),
    ("WAL bytes/msg (server)", lambda r: r.wal_bytes / r.messages, "{:.0f}"),
    ("spool commits/msg", lambda r: r.spool_commits / r.messages, "{:.3f}"),
    ("xacts/msg", lambda r: r.xact_commit / r.messages, "{:.2f}"),
    ("Redis commands/msg (server, inside scripts too)", lambda r: r.redis_commands / r.messages, "{:.1f}"),
)


def find(runs: Sequence[Run], setup: str, size: int, round_: int) -> Run | None:
    return next((r for r in runs if (r.setup, r.size, r.round) == (setup, size, round_)), None)


def ratios(runs: Sequence[Run], setup: str, baseline: str, size: int) -> list[float]:
    """End-to-end msgs/s of `setup` over `baseline`'s, per round in which both ran."""
    out = []
    for r in (r for r in runs if r.setup == setup and r.size == size):
        b = find(runs, baseline, size, r.round)
        if b is not None:
            out.append(r.end_to_end_rate / b.end_to_end_rate)
    return out


def summarize(runs: Sequence[Run], size: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for setup in SETUPS:
        mine = [r for r in runs if r.setup == setup.name and r.size == size]
        if not mine:
            continue
        row = {title: statistics.median(get(r) for r in mine) for title, get, _ in COLUMNS}
        for baseline in BASELINES:
            rs = ratios(runs, setup.name, baseline, size)
            row[f"/ {baseline}"] = statistics.median(rs) if rs else float("nan")
        row["rounds"] = len(mine)
        out[setup.name] = row
    return out


def print_tables(runs: Sequence[Run], sizes: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Markdown, ready for bench/README.md: medians over the rounds, then end-to-end msgs/s per round."""
    summaries = {}
    for size in sizes:
        summary = summarize(runs, size)
        summaries[str(size)] = summary
        rounds = sorted({r.round for r in runs if r.size == size})
        print(f"\n### {size} B messages, medians of {len(rounds)} round(s)\n")
        heads = [COLUMNS[0][0], "/ Postfix", "/ 1 SQLite node"] + [t for t, _, _ in COLUMNS[1:]]
        print("| setup | " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * len(heads))
        for name, row in summary.items():
            cells = [
                COLUMNS[0][2].format(row[COLUMNS[0][0]]),
                f"{row['/ postfix']:.2f}",
                f"{row['/ sqlite-1']:.2f}",
            ]
            cells += [fmt.format(row[t]) for t, _, fmt in COLUMNS[1:]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("\n| setup | " + " | ".join(f"round {n}: e2e msgs/s (load before)" for n in rounds) + " |")
        print("|---|" + "---:|" * len(rounds))
        for setup in (s for s in SETUPS if s.name in summary):
            found = [find(runs, setup.name, size, n) for n in rounds]
            cells = [f"{r.end_to_end_rate:.0f} ({r.load_before:.2f})" if r else "-" for r in found]
            print(f"| {setup.name} | " + " | ".join(cells) + " |")
    return summaries


def report(run: Run) -> str:
    return (
        f"    end to end {run.end_to_end_rate:.0f}/s, accepted {run.accepted_rate:.0f}/s, CPU ms/msg"
        f" {run.per_message_ms(run.system_cpu_s):.2f}"
        f" + PostgreSQL {run.per_message_ms(run.pg_backend_cpu_s):.2f}"
        f" (+{run.per_message_ms(run.pg_background_cpu_s):.2f} shared) + Redis"
        f" {run.per_message_ms(run.redis_cpu_s):.2f}, WAL {run.wal_bytes / run.messages:.0f} B/msg,"
        f" {run.spool_commits / run.messages:.3f} spool commits/msg,"
        f" {run.xact_commit / run.messages:.2f} xacts/msg, {run.redis_commands / run.messages:.1f} Redis"
        f" commands/msg, load before {run.load_before:.2f}"
        + (f", Redis timed out {run.throttle_fallbacks} times (fell back)" if run.throttle_fallbacks else "")
    )


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=6000, help="smtp-source messages per run (6000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions in all (20)")
    p.add_argument("--sizes", default="1500", help="message sizes in bytes, comma-separated (1500)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the five setups (2)")
    p.add_argument("--delivery-timeout", type=float, default=300.0, help="seconds per run (300)")
    p.add_argument(
        "--time-limit", type=float, default=1800.0, help="no new round starts after this many seconds (1800)"
    )
    p.add_argument(
        "--dsn", default=SERVER_DSN, help=f"the PostgreSQL server, its maintenance database ({SERVER_DSN})"
    )
    p.add_argument("--redis", default=REDIS_URL, help=f"the Redis server ({REDIS_URL})")
    p.add_argument(
        "--workers", type=int, default=0, help="postmux's [smtp] workers (ingress processes) per node"
    )
    p.add_argument(
        "--lease-ttl", type=float, default=60.0, help="[spool] lease_ttl of the nodes, seconds (60)"
    )
    p.add_argument("--keep", action="store_true", help="keep each run's directory (configs, logs)")
    names = ",".join(s.name for s in SETUPS)
    p.add_argument(
        "--setups",
        default=",".join(DEFAULT_SETUPS),
        help=f"which of {names}, comma-separated (all but pg-1-memory)",
    )
    a = p.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
    setups = tuple(s.strip() for s in a.setups.split(",") if s.strip())
    unknown = set(setups) - {s.name for s in SETUPS}
    if unknown or not setups:
        p.error(f"--setups: {', '.join(sorted(unknown)) or 'none given'}; the setups are {names}")
    if min(a.messages, a.sessions, a.rounds, *sizes) < 1 or a.delivery_timeout <= 0 or a.lease_ttl <= 0:
        p.error(
            "--messages, --sessions, --rounds, --sizes, --delivery-timeout and --lease-ttl must be positive"
        )
    return Options(
        a.messages,
        a.sessions,
        sizes,
        a.rounds,
        a.delivery_timeout,
        a.time_limit,
        a.dsn,
        a.redis,
        a.workers,
        a.lease_ttl,
        a.keep,
        setups,
    )


def run_rounds(opts: Options, source: str, sinks: Sequence[Sink], servers: Servers) -> list[Run]:
    runs: list[Run] = []
    started = time.monotonic()
    for size in opts.sizes:
        for round_ in range(1, opts.rounds + 1):
            if time.monotonic() - started > opts.time_limit_s:
                print(f"time limit {opts.time_limit_s:.0f}s reached: no round {round_}", file=sys.stderr)
                return runs
            for setup in (s for s in SETUPS if s.name in opts.setups):
                print(f"[{size} B, round {round_}] {setup.name} ...", file=sys.stderr, flush=True)
                run = run_once(setup, size, round_, opts, source, sinks, servers)
                print(report(run), file=sys.stderr, flush=True)
                runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    source, sink_tool = ensure_postfix()
    base, kind = pick_base_dir()
    print(f"queues and node directories under {base} (filesystem {kind})", file=sys.stderr)
    loads = {"start": os.getloadavg()}
    servers = Servers(opts.dsn, opts.redis_url)
    sinkdir = Path(tempfile.mkdtemp(prefix="nodes-sinks-", dir=base))
    try:
        settings = pg_query(
            opts.dsn,
            "SELECT name, setting FROM pg_settings WHERE name IN"
            " ('server_version', 'synchronous_commit', 'fsync', 'wal_sync_method', 'commit_delay')",
        )
        with counting_sinks(sink_tool, sinkdir) as sinks:
            runs = run_rounds(opts, source, sinks, servers)
    finally:
        servers.close()
        shutil.rmtree(sinkdir, ignore_errors=True)
    loads["end"] = os.getloadavg()
    summaries = print_tables(runs, opts.sizes)
    print(f"\nload average (1, 5, 15 min) at the start {loads['start']}, at the end {loads['end']}")
    problems = [p for r in runs for p in r.problems]
    return finish_report(
        "nodes",
        opts,
        runs,
        problems,
        load_average=loads,
        filesystem=kind,
        postgresql={row["name"]: row["setting"] for row in settings},
        summary=summaries,
    )


if __name__ == "__main__":
    run_main(main)
