"""Where postmux's CPU goes, process by process and thread by thread, under smtp-source load (issue 12).

    .venv/bin/python bench/cpu_split.py [--size 102400] [--messages 6000] [--workers 2] [--sessions 20]
                                        [--profile-pid-index 0 --profile-out FILE] [--webhook-batch N]

bench/throughput.py's setup (three smtp-sinks, round_robin, spool on disk, group commit), one run. It
prints msgs/s (injection start until postmux's delivered counter reaches N), the spool's commits, how busy
the whole machine was (from /proc/stat: are we CPU-bound?), the main process's peak RSS (VmHWM), and the
user and system CPU ms per message of every thread of postmux and of its ingress workers (from
/proc/PID/task/TID/stat): the main thread (event loop: acceptor, dispatcher, delivery), the spool's writer
thread, each worker. With --profile-out, py-spy
(--gil, raw stacks) samples one of those processes (index 0: the main one) during the run.

--webhook-batch N adds a [[webhook]] endpoint (every message event, N records per request) posting to a
receiver on loopback (a stdlib HTTP server in a process of its own, answering 204), to see what the
outbox (rows committed with each store and settle) and the sender cost; 0 (the default): no webhook, and
postmux writes no outbox row at all.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402  (bench/throughput.py: config, start, scrape)

TICK = os.sysconf("SC_CLK_TCK")
COMMITS = re.compile(r"^postmux_spool_commits_total ([0-9.e+]+)", re.M)
BACKLOG = re.compile(r"^postmux_webhook_backlog\{[^}]*\} ([0-9.e+]+)", re.M)


def threads_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """user and system seconds of each thread of `pid`, by "name:tid"."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}:{tid}"] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident set (VmHWM), in KB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine() -> tuple[int, int]:
    """All CPU ticks and idle ticks (idle + iowait) of the machine so far."""
    values = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return sum(values), values[3] + values[4]


RECEIVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def add_webhook(config: Path, batch: int) -> subprocess.Popen[bytes]:
    """Start the receiver and point a [[webhook]] of `batch` records per request at it."""
    port = tp.free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    tp.wait_for_port(port, receiver)
    wait = '"100ms"' if batch > 1 else '"0s"'
    config.write_text(
        config.read_text()
        + f'\n[[webhook]]\nname = "bench"\nurl = "http://127.0.0.1:{port}/hooks"\nbatch_size = {batch}\n'
        + f"batch_wait = {wait}\n"
    )
    return receiver


def wait_drained(http_port: int, delivered_at: float) -> float:
    """Seconds from the last delivery until the outbox was seen empty (the gauge is counted every 2 s)."""
    while time.monotonic() - delivered_at < 300:
        if sum(map(float, BACKLOG.findall(tp.scrape(http_port)))) == 0:
            return time.monotonic() - delivered_at
        time.sleep(0.2)
    return float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=102_400)
    p.add_argument("--messages", type=int, default=6000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--profile-out", default="")
    p.add_argument("--profile-pid-index", type=int, default=0)
    p.add_argument("--webhook-batch", type=int, default=0)
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postmux-cpu-", dir="/tmp"))
    started = tp.start_sinks("smtp-sink", 3)
    ports, sinks = [port for port, _ in started], [proc for _, proc in started]
    config = tp.write_config(workdir, True, ports, a.workers)
    if a.webhook_batch:
        sinks.append(add_webhook(config, a.webhook_batch))
    try:
        with tp.running_postmux(config, workdir / "postmux.log") as (proc, smtp_port, http_port):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            pids = [proc.pid, *map(int, children)]
            before = {pid: threads_cpu(pid) for pid in pids}
            spy = None
            if a.profile_out:
                py_spy = str(tp.POSTMUX.with_name("py-spy"))
                target = str(pids[a.profile_pid_index])
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--format",
                        "raw",
                        "--gil",
                        "-r",
                        "200",
                        "-o",
                        a.profile_out,
                        "--pid",
                        target,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            busy0, start = machine(), time.monotonic()
            cmd = ["smtp-source", "-s", str(a.sessions), "-m", str(a.messages), "-l", str(a.size)]
            cmd += ["-f", "bench@example.com", "-t", "user@dest.test", f"127.0.0.1:{smtp_port}"]
            subprocess.run(cmd, check=True, timeout=max(120, a.messages / 20))
            while time.monotonic() - start < 300:
                if tp.delivery_results(tp.scrape(http_port)).get("delivered", 0) >= a.messages:
                    break
                time.sleep(0.05)
            elapsed, busy1 = time.monotonic() - start, machine()
            drained_s = wait_drained(http_port, start + elapsed) if a.webhook_batch else 0.0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            after = {pid: threads_cpu(pid) for pid in pids}
            found = COMMITS.search(tp.scrape(http_port))
            peak_kb = peak_rss_kb(proc.pid)
    finally:
        for sink in sinks:
            tp.stop_process(sink, 10)
    busy = 100 * (1 - (busy1[1] - busy0[1]) / max(1, busy1[0] - busy0[0]))
    print(f"{a.messages} msgs of {a.size} B, {a.workers} workers, {a.sessions} sessions: {elapsed:.2f} s")
    print(f"  {a.messages / elapsed:.0f} msgs/s; spool commits {found.group(1) if found else '?'}")
    if a.webhook_batch:
        print(
            f"  webhook: {a.webhook_batch} records a request; outbox empty {drained_s:.1f} s after delivery"
        )
    print(f"  machine busy {busy:.0f}% of its {os.cpu_count()} cores")
    print(f"  main process peak RSS {peak_kb / 1024:.1f} MB")
    total = 0.0
    for pid in pids:
        for thread, (user, system) in after[pid].items():
            user0, system0 = before[pid].get(thread, (0.0, 0.0))
            du, ds = (user - user0) * 1000 / a.messages, (system - system0) * 1000 / a.messages
            total += du + ds
            if du + ds >= 0.01:
                print(f"  pid {pid} {thread:24s} user {du:.3f} sys {ds:.3f} ms/msg")
    print(f"  postmux total {total:.3f} ms/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
