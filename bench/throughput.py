"""Throughput of postmux with and without group commit, measured with Postfix's smtp-source and smtp-sink.

    .venv/bin/python bench/throughput.py [--messages N] [--sessions S] [--size BYTES] [--repeat R]

Three `smtp-sink` upstreams stand behind one postmux; `smtp-source` injects N messages over S sessions.
Accepted msgs/s is N over smtp-source's wall time (every message answered 250, so durably spooled);
end-to-end msgs/s is N over the time from the start of injection until /metrics counts N deliveries.
The two modes alternate (A B A B ...) and the table shows medians and the ratio between them, because
the machine is noisy between sittings (see bench/README.md). The result also goes to bench/out/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
POSTMUX = REPO / ".venv" / "bin" / "postmux"
OUT_DIR = REPO / "bench" / "out"
SINK_COUNT = 3
SINK_BACKLOG = "1000"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
MODES = (("group-commit", True), ("no-group-commit", False))
READY_LINE = re.compile(r"postmux: smtp on port (\d+), http on port (\d+)")
DELIVERED = re.compile(r"^postmux_deliveries_total\{([^}]*)\}\s+([0-9.eE+-]+)$", re.MULTILINE)
RECEIVED = re.compile(r"^postmux_messages_received_total\s+([0-9.eE+-]+)$", re.MULTILINE)
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
# (table title, summary key, format): the table, the medians and the ratios all follow this list.
COLUMNS = (
    ("accepted msgs/s", "accepted_msgs_per_s", "{:.0f}"),
    ("end-to-end msgs/s", "end_to_end_msgs_per_s", "{:.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.1f}"),
    ("postmux CPU ms/msg", "cpu_ms_per_msg", "{:.2f}"),
)


class BenchError(Exception):
    """The benchmark could not complete a run; the message says what was seen."""


class Timed:
    """A run's rates: its messages over the time to accept them and over the time to deliver them (the
    mixin of every bench's run: annotations only, so a dataclass keeps its own fields and their order)."""

    messages: int
    accepted_s: float
    end_to_end_s: float

    @property
    def accepted_rate(self) -> float:
        return self.messages / self.accepted_s

    @property
    def end_to_end_rate(self) -> float:
        return self.messages / self.end_to_end_s


@dataclass
class RunResult(Timed):
    mode: str
    messages: int
    accepted_s: float
    end_to_end_s: float
    peak_rss_mb: float
    cpu_ms_per_msg: float
    load_before: float
    received: int
    delivered: int
    other_results: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    messages: int
    messages_no_gc: int
    sessions: int
    size: int
    repeat: int
    delivery_timeout_s: float
    keep: bool


# -- tools and processes ---------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if candidate.exists() else None


def install_postfix() -> None:
    """Install Debian's postfix for its tools, with policy-rc.d keeping the system's Postfix stopped."""
    apt_install("postfix", selections=b"postfix postfix/main_mailer_type select No configuration\n")


def apt_install(*packages: str, selections: bytes = b"") -> None:
    """Install Debian packages for the bench's peers, with policy-rc.d keeping their daemons stopped: the
    bench starts its own private instances, never the system's."""
    names = " ".join(packages)
    if os.geteuid() != 0:
        raise BenchError(f"{names} missing; run as root or: apt-get install {names}")
    # A policy-rc.d that already forbids every start (Docker images ship one) is kept as it is.
    ours = not POLICY_RC.exists()
    if not ours and not forbids_starts(POLICY_RC):
        raise BenchError(f"{POLICY_RC} exists already; install {names} by hand (no daemon may start)")
    if ours:
        POLICY_RC.write_text("#!/bin/sh\n# bench: no daemon starts during the install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if selections:
            subprocess.run(["debconf-set-selections"], input=selections, check=False, timeout=60)
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", *packages], check=True, env=env, timeout=900)
    finally:
        if ours:
            POLICY_RC.unlink(missing_ok=True)


def forbids_starts(policy: Path) -> bool:
    """Whether an existing policy-rc.d refuses every action (exit 101, as Debian's invoke-rc.d reads it)."""
    try:
        done = subprocess.run([str(policy), "postfix", "start"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 101


def ensure_tools() -> tuple[str, str]:
    source, sink = find_tool("smtp-source"), find_tool("smtp-sink")
    if source is None or sink is None:
        print("smtp-source/smtp-sink not found: installing Debian's postfix", file=sys.stderr)
        install_postfix()
        source, sink = find_tool("smtp-source"), find_tool("smtp-sink")
    if source is None or sink is None:
        raise BenchError("postfix installed but smtp-source/smtp-sink still not found")
    return source, sink


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"smtp-sink on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"smtp-sink on port {port} not listening after {timeout_s}s")


def start_sinks(sink: str, count: int) -> list[tuple[int, subprocess.Popen[bytes]]]:
    sinks: list[tuple[int, subprocess.Popen[bytes]]] = []
    for _ in range(count):
        port = free_port()
        proc = subprocess.Popen([sink, "-u", "nobody", f"127.0.0.1:{port}", SINK_BACKLOG])
        sinks.append((port, proc))
        wait_for_port(port, proc)
    return sinks


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM by PID, wait; SIGKILL by PID only if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"pid {proc.pid} still running {timeout_s}s after SIGTERM: SIGKILL", file=sys.stderr)
        proc.kill()
        return proc.wait(timeout=10)


# -- the spool directory ---------------------------------------------------------------------------------


def fs_type(path: Path) -> str:
    out = subprocess.run(
        ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.split()[-1]


def pick_base_dir() -> tuple[Path, str]:
    """/tmp unless it is tmpfs (not durable: fsync costs nothing there), then the repo's var/bench."""
    for base in (Path(tempfile.gettempdir()), REPO / "var" / "bench"):
        base.mkdir(parents=True, exist_ok=True)
        kind = fs_type(base)
        if kind not in ("tmpfs", "ramfs"):
            return base, kind
    raise BenchError("both /tmp and var/bench are on tmpfs: the spool would not pay for fsync")


# -- one postmux run -------------------------------------------------------------------------------------


def write_config(
    workdir: Path,
    group_commit: bool,
    sink_ports: Sequence[int],
    workers: int = 0,
    spool: str = "",
    extra: str = "",
) -> Path:
    """postmux.toml in workdir: round_robin over the sinks. `spool`: more [spool] lines (another backend);
    `extra`: more tables after the pool (bench/nodes.py's [node] and [throttles])."""
    members = ",\n".join(
        f'  {{ name = "sink-{i}", address = "127.0.0.1:{port}", max_connections = 20 }}'
        for i, port in enumerate(sink_ports, 1)
    )
    text = f"""\
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.bench.test"
workers = {workers}

[http]
listen = "127.0.0.1:0"

[spool]
path = "{workdir / "spool.db"}"
group_commit = {"true" if group_commit else "false"}
{spool}
[events]
log = "{workdir / "events.jsonl"}"

[[pool]]
name = "default"
policy = "round_robin"
members = [
{members},
]
{extra}"""
    path = workdir / "postmux.toml"
    path.write_text(text)
    return path


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> tuple[int, int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        m = READY_LINE.search(log_path.read_text(errors="replace"))
        if m:
            return int(m.group(1)), int(m.group(2))
        if proc.poll() is not None:
            raise BenchError(f"postmux exited with {proc.returncode} before listening; see {log_path}")
        time.sleep(0.05)
    raise BenchError(f"postmux not listening after {STARTUP_TIMEOUT_S}s; see {log_path}")


@contextmanager
def running_postmux(config: Path, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(POSTMUX), "serve", "-c", str(config)], stderr=log, cwd=config.parent)
    try:
        smtp_port, http_port = wait_ready(proc, log_path)
        yield proc, smtp_port, http_port
    finally:
        code = stop_process(proc, STOP_TIMEOUT_S)
        if code != 0:
            print(f"postmux exited with {code} after SIGTERM; see {log_path}", file=sys.stderr)


def source_command(source: str, port: int, sessions: int, messages: int, size: int) -> list[str]:
    """smtp-source: `messages` in all (not per session) over `sessions`, a new connection per message."""
    load = ["-s", str(sessions), "-m", str(messages), "-l", str(size)]
    return [source, *load, "-f", "bench@example.com", "-t", "user@dest.test", f"127.0.0.1:{port}"]


def inject(source: str, port: int, opts: Options, messages: int) -> float:
    cmd = source_command(source, port, opts.sessions, messages, opts.size)
    timeout_s = max(120.0, messages / 20.0)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish {messages} messages in {timeout_s:.0f}s") from None
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise BenchError(
            f"smtp-source exited {done.returncode} (a message was refused): {done.stderr.strip()}"
        )
    return elapsed


def scrape(http_port: int) -> str:
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def delivery_results(text: str) -> dict[str, float]:
    """Sum of postmux_deliveries_total over pools and members, per result."""
    totals: dict[str, float] = {}
    for labels, value in DELIVERED.findall(text):
        m = re.search(r'result="([^"]*)"', labels)
        result = m.group(1) if m else "?"
        totals[result] = totals.get(result, 0.0) + float(value)
    return totals


def received_total(text: str) -> int:
    m = RECEIVED.search(text)
    return int(float(m.group(1))) if m else 0


def wait_delivered(
    proc: subprocess.Popen[bytes], http_port: int, target: int, start: float, timeout_s: float
) -> tuple[float, str]:
    """Poll /metrics until `target` deliveries; return (seconds since start, last scrape)."""
    deadline = start + timeout_s
    text = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"postmux exited with {proc.returncode} while delivering")
        text = scrape(http_port)
        if delivery_results(text).get("delivered", 0.0) >= target:
            return time.monotonic() - start, text
        time.sleep(0.05)
    seen = delivery_results(text)
    raise BenchError(f"{timeout_s:.0f}s after injection started, deliveries were {seen} of {target}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (threads included), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(
    mode: str, group_commit: bool, messages: int, opts: Options, tools: tuple[str, str], sinks: list[int]
) -> RunResult:
    base, _ = pick_base_dir()
    load = os.getloadavg()[0]  # other work on the machine skews the figures: keep a note of it
    workdir = Path(tempfile.mkdtemp(prefix=f"postmux-bench-{mode}-", dir=base))
    try:
        config = write_config(workdir, group_commit, sinks)
        with running_postmux(config, workdir / "postmux.log") as (proc, smtp_port, http_port):
            start = time.monotonic()
            accepted_s = inject(tools[0], smtp_port, opts, messages)
            end_to_end_s, text = wait_delivered(proc, http_port, messages, start, opts.delivery_timeout_s)
            time.sleep(0.5)  # let stragglers (duplicates, deferrals) show before the final scrape
            text = scrape(http_port)
            rss = peak_rss_mb(proc.pid)
            cpu_s = cpu_seconds(proc.pid)
        results = delivery_results(text)
        return RunResult(
            mode=mode,
            messages=messages,
            accepted_s=accepted_s,
            end_to_end_s=end_to_end_s,
            peak_rss_mb=rss,
            cpu_ms_per_msg=1000.0 * cpu_s / messages,
            load_before=load,
            received=received_total(text),
            delivered=int(results.pop("delivered", 0.0)),
            other_results=results,
        )
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------------------------


def check_result(r: RunResult) -> list[str]:
    problems = []
    if r.received != r.messages:
        problems.append(f"{r.mode}: received_total {r.received} != {r.messages} injected")
    if r.delivered != r.messages:
        problems.append(f"{r.mode}: delivered {r.delivered} != {r.messages} injected")
    if any(v for v in r.other_results.values()):
        problems.append(f"{r.mode}: other delivery results {r.other_results}")
    return problems


def summarize(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode, _ in MODES:
        mine = [r for r in runs if r.mode == mode]
        out[mode] = {
            "messages": mine[0].messages,
            "accepted_msgs_per_s": statistics.median(r.accepted_rate for r in mine),
            "end_to_end_msgs_per_s": statistics.median(r.end_to_end_rate for r in mine),
            "peak_rss_mb": statistics.median(r.peak_rss_mb for r in mine),
            "cpu_ms_per_msg": statistics.median(r.cpu_ms_per_msg for r in mine),
        }
    return out


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    a, b = summary[MODES[0][0]], summary[MODES[1][0]]
    return {key: a[key] / b[key] for _, key, _ in COLUMNS}


def print_table(summary: dict[str, dict[str, float]], ratio: dict[str, float], repeat: int) -> None:
    """A Markdown table, ready to paste into bench/README.md."""
    print(f"\n{'medians of ' + str(repeat) if repeat > 1 else 'one run'} per mode\n")
    print("| mode | messages | " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for mode, row in summary.items():
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        print(f"| {mode} | {int(row['messages'])} | " + " | ".join(cells) + " |")
    cells = [f"{ratio[key]:.2f}" for _, key, _ in COLUMNS]
    print("| ratio group-commit / no-group-commit | | " + " | ".join(cells) + " |")


def machine() -> dict[str, str | int]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count() or 0, "cpu": model, "postmux_python": postmux_python()}


def postmux_python() -> str:
    """The interpreter `postmux serve` runs on (its venv's base), which moves every figure: an unoptimized
    build from source ran postmux's Python 8-20% slower than Debian's (bench/README.md, "A seventh round")."""
    shebang = POSTMUX.read_text().splitlines()[0].removeprefix("#!").strip()
    line = "import sys, os; print(sys.version.split()[0], os.path.realpath(sys._base_executable))"
    done = subprocess.run([shebang, "-c", line], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or f"? ({done.stderr.strip()[:200]})"


def write_json(payload: dict[str, object], name: str = "throughput") -> Path:
    """Every bench's full result: bench/out/NAME-<timestamp>.json (git ignores bench/out)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def finish_report(name: str, opts: Any, runs: Sequence[Any], problems: list[str], **fields: object) -> int:
    """Every bench's ending: its problems on stderr, its JSON written (the date, the machine, the options,
    `fields`, the runs with their rates, the problems) and named, and its exit code (1 if any problem)."""
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    payload: dict[str, object] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "options": asdict(opts),
        **fields,
        "runs": [_run_record(r) for r in runs],
        "problems": problems,
    }
    print(f"\nwrote {write_json(payload, name)}")
    return 1 if problems else 0


def _run_record(run: Any) -> dict[str, object]:
    """A run as a JSON object, with its rates when it has them (properties, which asdict leaves out)."""
    record: dict[str, object] = asdict(run)
    for name, prop in (
        ("accepted_msgs_per_s", "accepted_rate"),
        ("end_to_end_msgs_per_s", "end_to_end_rate"),
    ):
        if hasattr(run, prop):
            record[name] = getattr(run, prop)
    return record


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="messages per run (default 20000)")
    p.add_argument(
        "--messages-no-gc",
        type=int,
        default=None,
        help="messages for the no-group-commit runs (default: --messages); rates stay comparable",
    )
    p.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions (default 20)")
    p.add_argument("--size", type=int, default=1500, help="message size in bytes (default 1500)")
    p.add_argument("--repeat", type=int, default=1, help="A B pairs; medians reported (default 1)")
    p.add_argument("--delivery-timeout", type=float, default=600.0, help="seconds per run (default 600)")
    p.add_argument("--keep", action="store_true", help="keep each run's spool, config and logs")
    a = p.parse_args(argv)
    if min(a.messages, a.sessions, a.size, a.repeat) < 1:
        p.error("--messages, --sessions, --size and --repeat must be at least 1")
    return Options(
        messages=a.messages,
        messages_no_gc=a.messages_no_gc or a.messages,
        sessions=a.sessions,
        size=a.size,
        repeat=a.repeat,
        delivery_timeout_s=a.delivery_timeout,
        keep=a.keep,
    )


def run_all(opts: Options, tools: tuple[str, str], sink_ports: list[int]) -> list[RunResult]:
    runs: list[RunResult] = []
    for i in range(opts.repeat):
        for mode, group_commit in MODES:
            n = opts.messages if group_commit else opts.messages_no_gc
            print(f"[{i + 1}/{opts.repeat}] {mode}: {n} messages ...", file=sys.stderr, flush=True)
            r = run_mode(mode, group_commit, n, opts, tools, sink_ports)
            print(
                f"    accepted {r.accepted_rate:.0f} msg/s in {r.accepted_s:.1f}s,"
                f" end to end {r.end_to_end_rate:.0f} msg/s in {r.end_to_end_s:.1f}s,"
                f" peak RSS {r.peak_rss_mb:.1f} MB, postmux CPU {r.cpu_ms_per_msg:.2f} ms/msg"
                f" (1-min load before: {r.load_before:.2f})",
                file=sys.stderr,
                flush=True,
            )
            runs.append(r)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = ensure_tools()
    base, kind = pick_base_dir()
    print(f"spool under {base} (filesystem {kind}); synchronous=FULL is set by postmux", file=sys.stderr)
    sinks = start_sinks(tools[1], SINK_COUNT)
    try:
        runs = run_all(opts, tools, [port for port, _ in sinks])
    finally:
        for _, proc in sinks:
            stop_process(proc, 10.0)
    summary = summarize(runs)
    ratio = ratios(summary)
    print_table(summary, ratio, opts.repeat)
    problems = [p for r in runs for p in check_result(r)]
    return finish_report(
        "throughput",
        opts,
        runs,
        problems,
        spool_filesystem=kind,
        summary=summary,
        ratio_group_commit_over_no_group_commit=ratio,
    )


def run_main(main: Callable[[], int]) -> NoReturn:
    """Every bench's entry point: its exit code, or 1 with one line (not a traceback) when a run failed."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
