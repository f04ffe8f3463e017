"""Where postmux's CPU goes per message under bench/throughput's load: py-spy samples, summed by area.

    .venv/bin/python bench/profile_hotpath.py [--messages 10000] [--size 1500] [--rate 250] [--top 25]

`postmux serve` runs under `py-spy record --format raw` --gil (collapsed stacks of the thread holding the
GIL only: in one Python process that is the serial work that bounds throughput, and it leaves out the
spool thread's fsync waits and idle threads, which py-spy's idle detection lets through)
behind three smtp-sinks, and smtp-source injects --messages over 20 sessions.
Each sample is put in one area by the innermost postmux or library frame that names it (ingress SMTP,
spool, delivery, event log, metrics, balancing, scheduling, the event loop itself); the table gives the
area's share of samples and the CPU ms a message that share stands for (postmux's CPU time from /proc).
Then the top functions by self time and by inclusive time. `--stacks FILE` keeps the collapsed stacks
(speedscope.app and flamegraph.pl read them).
py-spy must be installed (`.venv/bin/pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from throughput import (
    REPO,
    BenchError,
    Options,
    cpu_seconds,
    ensure_tools,
    inject,
    pick_base_dir,
    run_main,
    start_sinks,
    stop_process,
    wait_delivered,
    wait_ready,
    write_config,
)

PY_SPY = REPO / ".venv" / "bin" / "py-spy"
POSTMUX = REPO / ".venv" / "bin" / "postmux"
# (area, substrings of a frame "function (file:line)"); the innermost frame that matches decides.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spool (sqlite writer thread, store/settle/lease)", ("postmux/spool/",)),
    ("event log (JSON lines)", ("postmux/events/log.py",)),
    ("metrics (prometheus counters)", ("postmux/events/metrics.py", "prometheus_client")),
    ("event bus / event objects", ("postmux/events/",)),
    ("delivery (aiosmtplib client, transport)", ("postmux/delivery/", "aiosmtplib")),
    ("balancing (pool.pick)", ("postmux/balancing/",)),
    ("scheduling (dispatcher, router)", ("postmux/scheduling/",)),
    ("acceptor (Received header, routing)", ("postmux/ingress/acceptor.py", "postmux/headers.py")),
    ("ingress SMTP (aiosmtpd session, parsing)", ("aiosmtpd", "postmux/ingress/smtp.py")),
    ("HTTP (/metrics scrapes)", ("uvicorn", "starlette", "fastapi", "postmux/ingress/http.py")),
    ("logging (structlog)", ("structlog",)),
    ("asyncio / uvloop (event loop, transports, tasks)", ("asyncio", "uvloop")),
)


def area_of(frames: list[str]) -> str:
    """The innermost frame that names a postmux area or library wins; asyncio/uvloop only when none does
    (a socket write under aiosmtpd is ingress, not the event loop)."""
    for specific in (AREAS[:-1], AREAS[-1:]):
        for frame in reversed(frames):  # innermost first
            for area, needles in specific:
                if any(n in frame for n in needles):
                    return area
    return "other"


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def report(stacks: list[tuple[list[str], int]], cpu_ms_per_msg: float, top: int) -> None:
    total = sum(n for _, n in stacks) or 1
    areas: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        areas[area_of(frames)] += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"\n{total} samples; postmux CPU {cpu_ms_per_msg:.2f} ms a message\n")
    print("| area | share of samples | CPU ms/msg |\n|---|---:|---:|")
    for area, n in areas.most_common():
        print(f"| {area} | {100 * n / total:.1f}% | {cpu_ms_per_msg * n / total:.3f} |")
    print(f"\ntop {top} functions by self time\n")
    for frame, n in self_time.most_common(top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print(f"\ntop {top} functions by inclusive time\n")
    for frame, n in inclusive.most_common(top):
        print(f"{100 * n / total:5.1f}%  {frame}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--stacks", type=Path, help="keep the collapsed stacks in this file")
    a = p.parse_args(argv)
    if not PY_SPY.exists():
        raise BenchError(f"{PY_SPY} missing: .venv/bin/pip install py-spy")
    tools = ensure_tools()
    base, _ = pick_base_dir()
    workdir = Path(tempfile.mkdtemp(prefix="postmux-profile-", dir=base))
    sinks = start_sinks(tools[1], 3)
    raw = workdir / "stacks.txt"
    try:
        config = write_config(workdir, True, [port for port, _ in sinks])
        log_path = workdir / "postmux.log"
        cmd = [str(PY_SPY), "record", "--format", "raw", "-o", str(raw), "-r", str(a.rate)]
        cmd += ["--threads", "--gil"]
        cmd += ["--", str(POSTMUX), "serve", "-c", str(config)]
        with log_path.open("wb") as log:
            spy = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL, cwd=workdir)
        try:
            smtp_port, http_port = wait_ready(spy, log_path)
            opts = Options(a.messages, a.messages, a.sessions, a.size, 1, 600.0, False)
            start = time.monotonic()
            inject(tools[0], smtp_port, opts, a.messages)
            wait_delivered(spy, http_port, a.messages, start, 600.0)
            server = int(subprocess.check_output(["pgrep", "-P", str(spy.pid)], text=True).split()[0])
            cpu_ms = 1000 * cpu_seconds(server) / a.messages
            subprocess.run(["kill", "-TERM", str(server)], check=True, timeout=10)  # postmux, by its PID
            spy.wait(timeout=120)
        finally:
            if spy.poll() is None:
                stop_process(spy, 30.0)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no profile; see {log_path}")
        report(parse_raw(raw), cpu_ms, a.top)
        if a.stacks:
            shutil.copy(raw, a.stacks)
    finally:
        for _, proc in sinks:
            stop_process(proc, 10.0)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
