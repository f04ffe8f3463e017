"""What the live dashboard costs: the browser's own update time at 10,000 events a minute, and postmux's
throughput with a dashboard open against none, in one run.

    .venv/bin/python bench/dashboard.py [--events-per-min 10000] [--paced-s 30] [--messages 2000] [--repeat 2]

One `postmux serve` process (its own process, so its CPU is what the dashboard costs) in front of two
loopback upstreams (postmux.testing.Upstream, in this process); Debian's chromium through Playwright.

1. Update time: the page open, mail sent at a steady pace so the node emits `--events-per-min` events
   (a Reception and a Delivery per recipient: half as many messages), for `--paced-s` seconds. The page
   times each update with performance.now() around its DOM work (window.postmux.timings); the table shows
   the count, median, p99 and max of those timings.
2. Throughput: `--messages` messages as fast as 16 sessions send them, timed from the first send until
   /metrics counts them all delivered; alternately with no page open and with the page open (A B A B),
   medians compared.

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from postmux.testing import CHROMIUM, CHROMIUM_ARGS, Upstream  # noqa: E402

POSTMUX = REPO / ".venv" / "bin" / "postmux"
TOKEN = "bench-dashboard-token-0123"
READY = re.compile(rb"postmux: smtp on port (\d+), http on port (\d+)")
DELIVERED = re.compile(r'^postmux_deliveries_total\{[^}]*result="delivered"[^}]*\}\s+([0-9.eE+-]+)$', re.M)
MESSAGE = (
    b"From: bench@example.com\r\nTo: user@dest.test\r\nSubject: dashboard bench\r\n"
    b"Message-ID: <%d@bench.test>\r\n\r\n" + b"x" * 1000 + b"\r\n"
)


def config(tmp: Path, ups: list[Upstream]) -> Path:
    members = ", ".join(
        f'{{ name = "{u.name}", address = "{u.address}", max_connections = 20 }}' for u in ups
    )
    path = tmp / "postmux.toml"
    path.write_text(
        f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "bench.test"
[http]
listen = "127.0.0.1:0"
admin_token = "{TOKEN}"
[spool]
path = "{tmp / "spool.db"}"
[events]
log = "{tmp / "events.jsonl"}"
[[pool]]
name = "default"
policy = "round_robin"
members = [{members}]
"""
    )
    return path


async def start_postmux(cfg: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    proc = subprocess.Popen(
        [str(POSTMUX), "serve", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(proc.stdout.readline)
        found = READY.search(line)
        if found:
            # Keep reading its output so a full pipe never blocks it.
            asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
            return proc, int(found[1]), int(found[2])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("postmux did not start")


async def send(port: int, n: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test", start_tls=False)
    await client.connect()
    try:
        await client.sendmail("bench@example.com", ["user@dest.test"], MESSAGE % n)
        await client.quit()
    finally:
        client.close()


async def delivered(http_port: int) -> int:
    import httpx

    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://127.0.0.1:{http_port}/metrics")).text
    return int(sum(float(v) for v in DELIVERED.findall(text)))


async def paced(smtp_port: int, per_s: float, seconds: float, first: int) -> int:
    """Send `per_s` messages a second for `seconds`; returns how many were sent."""
    sent, start = 0, time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * per_s) - sent
        for _ in range(max(0, due)):
            task = asyncio.create_task(send(smtp_port, first + sent))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*pending, return_exceptions=True)
    return sent


async def burst(smtp_port: int, http_port: int, count: int, first: int) -> float:
    """`count` messages over 16 sessions; seconds from the first send until all are delivered."""
    before = await delivered(http_port)
    start = time.monotonic()
    queue = iter(range(first, first + count))

    async def session() -> None:
        for n in queue:
            await send(smtp_port, n)

    await asyncio.gather(*(session() for _ in range(16)))
    deadline = time.monotonic() + 120
    while await delivered(http_port) - before < count:
        if time.monotonic() > deadline:
            raise SystemExit("deliveries did not finish within 120 s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def cpu_s(pid: int) -> float:
    """The process's user + system CPU time (/proc/PID/stat fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_cpu_s(postmux_pid: int) -> float:
    """CPU time of this process's descendants but postmux: Playwright's driver and chromium's processes."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    mine, total = {os.getpid()}, 0.0
    for _ in range(6):  # chromium's tree is a few levels deep
        mine |= {pid for pid, ppid in parents.items() if ppid in mine and pid != postmux_pid}
    for pid in mine - {os.getpid()}:
        try:
            total += cpu_s(pid)
        except OSError:
            continue
    return total


async def open_page(browser: Any, http_port: int) -> Any:
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{http_port}/")
    if await page.locator("input[name=token]").count():  # signed in once: the cookie is kept
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
    await page.wait_for_function("window.postmux && window.postmux.snapshots >= 1", timeout=15_000)
    return page


def summary(timings: list[float]) -> str:
    ordered = sorted(timings)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"{len(ordered)} updates: median {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms, "
        f"max {ordered[-1]:.1f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="postmux-bench-dashboard-") as tmp_dir:
        tmp = Path(tmp_dir)
        ups = [await Upstream(name).start() for name in ("a", "b")]
        proc, smtp_port, http_port = await start_postmux(config(tmp, ups))
        number = 0
        try:
            async with async_playwright() as p:
                browser = await p.chromium.launch_persistent_context(
                    str(tmp / "profile"), executable_path=CHROMIUM, args=list(CHROMIUM_ARGS)
                )
                page = await open_page(browser, http_port)
                per_s = args.events_per_min / 60 / 2  # a Reception and a Delivery per message
                print(f"paced: {per_s * 60:.0f} messages/min for {args.paced_s:.0f} s with the page open")
                await page.evaluate("window.postmux.timings.length = 0")
                before = await delivered(http_port)
                number += await paced(smtp_port, per_s, args.paced_s, number)
                await asyncio.sleep(2)  # the last ones delivered, the last updates drawn
                rate = (await delivered(http_port) - before) * 2 * 60 / args.paced_s
                print(f"node's events: {rate:.0f}/min (a Reception and a Delivery per message)")
                timings = await page.evaluate("window.postmux.timings")
                shown = await page.evaluate("window.postmux.events.length")
                print(f"update time at {args.events_per_min} events/min: {summary(timings)}; kept {shown}")
                await page.close()
                results: dict[str, list[float]] = {"closed": [], "open": []}
                cpu: dict[str, list[float]] = {"closed": [], "open": []}
                for r in range(args.repeat):
                    for mode in ("closed", "open"):
                        page = await open_page(browser, http_port) if mode == "open" else None
                        cpu_before, browser_before = cpu_s(proc.pid), browser_cpu_s(proc.pid)
                        seconds = await burst(smtp_port, http_port, args.messages, number)
                        cpu_ms = (cpu_s(proc.pid) - cpu_before) * 1000 / args.messages
                        # A closed page's renderer takes its CPU time with it when it exits: 0 then, not less.
                        browser_share = max(0.0, browser_cpu_s(proc.pid) - browser_before) / seconds
                        number += args.messages
                        if page is not None:
                            await page.close()
                        rate = args.messages / seconds
                        results[mode].append(rate)
                        cpu[mode].append(cpu_ms)
                        print(
                            f"round {r + 1}, dashboard {mode}: {rate:.0f} msgs/s end to end, "
                            f"postmux CPU {cpu_ms:.2f} ms/msg, "
                            f"browser CPU {browser_share * 100:.0f}% of a core"
                        )
                closed, opened = (statistics.median(results[m]) for m in ("closed", "open"))
                cpu_closed, cpu_open = (statistics.median(cpu[m]) for m in ("closed", "open"))
                print(
                    f"median end-to-end msgs/s: closed {closed:.0f}, open {opened:.0f} "
                    f"({(opened / closed - 1) * 100:+.1f}%); postmux CPU ms/msg: closed {cpu_closed:.2f}, "
                    f"open {cpu_open:.2f} ({(cpu_open / cpu_closed - 1) * 100:+.1f}%)"
                )
                await browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            for u in ups:
                await u.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events-per-min", type=int, default=10_000)
    parser.add_argument("--paced-s", type=float, default=30.0)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
