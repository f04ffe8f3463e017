"""One ingress worker's CPU a message, alone: its main process a stub that answers every accept at once.

    .venv/bin/python bench/worker_cpu.py [--size 1500] [--messages 4000] [--sessions 20]
                                         [--callgrind OUT] [--py-spy OUT]

`IngressWorkers` starts one real worker (`postmux.ingress.workers`, the same process `[smtp] workers`
starts) whose acceptor answers with a queue id at once, so nothing but the worker's own work is measured:
the SMTP dialogue on aiosmtpd, DATA and its checks, the hand-off frame. smtp-source sends --warm messages,
then --messages, over --sessions connections; the worker's user and system CPU over the second batch is
printed per message (from /proc).

--callgrind OUT runs the worker under `valgrind --tool=callgrind` with instrumentation off until the warm
batch is done, then counts the second batch and dumps it to OUT.1: the instructions a message, repeatable
to 0.05% on a machine whatever its load (CPU time is not), for A/B of one change (issue 12, bench/README.md
"A third round"). Use a few hundred messages: the worker runs ~50x slower under it. --py-spy OUT samples
the worker during the second batch (raw stacks, py-spy must be installed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from postmux.config import SmtpSettings
from postmux.envelope import Envelope
from postmux.ingress.workers import IngressWorkers
from postmux.logs import configure_logging

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


class AtOnce:
    """The main process's acceptor, minus the spool: a queue id for every message, at once."""

    def __init__(self) -> None:
        self.count = 0

    async def accept(self, envelope: Envelope) -> str:
        self.count += 1
        return f"Q{self.count:08d}"


def inject(port: int, size: int, messages: int, sessions: int) -> None:
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", "bench@example.com", "-t", "user@dest.test", f"127.0.0.1:{port}"]
    subprocess.run(cmd, check=True, timeout=max(120, messages))


async def run(a: argparse.Namespace) -> None:
    settings = SmtpSettings(listen="127.0.0.1:0", hostname="postmux.bench.test", workers=1)
    if a.callgrind:
        # IngressWorkers starts sys.executable: a wrapper that starts it under callgrind instead.
        wrapper = Path(tempfile.mkdtemp(prefix="postmux-cg-")) / "python"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no "
            f'--callgrind-out-file={a.callgrind} {sys.executable} "$@"\n'
        )
        wrapper.chmod(0o755)
        sys.executable = str(wrapper)
    acceptor = AtOnce()
    workers = IngressWorkers(settings, acceptor, 1)
    await workers.start()
    pid, port = workers.pids[0], workers.port
    try:
        await asyncio.to_thread(inject, port, a.size, a.warm, a.sessions)
        if a.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, stdout=subprocess.DEVNULL)
        spy = None
        if a.py_spy:
            py_spy = str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen(
                [py_spy, "record", "--format", "raw", "-r", "500", "-o", a.py_spy, "--pid", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        user0, system0 = cpu_seconds(pid)
        start = time.monotonic()
        await asyncio.to_thread(inject, port, a.size, a.messages, a.sessions)
        elapsed = time.monotonic() - start
        user1, system1 = cpu_seconds(pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if a.callgrind:
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, stdout=subprocess.DEVNULL)
    finally:
        await workers.stop()
    n = a.messages
    user, system = (user1 - user0) * 1000 / n, (system1 - system0) * 1000 / n
    print(
        f"{n} msgs of {a.size} B over {a.sessions} sessions: {n / elapsed:.0f} msgs/s; worker user {user:.3f}"
        f" sys {system:.3f} total {user + system:.3f} ms/msg; accepted {acceptor.count}"
    )
    if a.callgrind:
        totals = [
            line for line in Path(f"{a.callgrind}.1").read_text().splitlines() if line.startswith("totals:")
        ]
        if totals:
            print(f"  callgrind: {int(totals[0].split()[1]) // n:,} instructions a message")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--messages", type=int, default=4000)
    p.add_argument("--warm", type=int, default=200)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--callgrind", default="")
    p.add_argument("--py-spy", default="")
    a = p.parse_args()
    configure_logging()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(a))
    else:
        uvloop.run(run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
