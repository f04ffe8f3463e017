"""HTTP submission throughput beside SMTP's, in the same run: the same postmux, sinks, sizes and machine.

    .venv/bin/python bench/http_submit.py [--messages N] [--clients C] [--size BYTES] [--repeat R]

Three modes, each on a fresh postmux (its own spool) in front of the same three `smtp-sink` upstreams:

- `smtp`: Postfix's smtp-source, C sessions, one message per transaction (as bench/throughput.py);
- `http-1`: C HTTP/1.1 clients (httpx, kept-alive connections), one message per POST /api/v1/messages;
- `http-batch-100`: the same clients, 100 messages per POST /api/v1/messages/batch.

Every message is the same raw text of --size octets to one recipient. Accepted msgs/s is N over the time
until the last answer (every one a 250 or a 202, so durably spooled); end-to-end msgs/s is N over the time
until /metrics counts N deliveries. The HTTP clients run in this process, on the same cores as postmux
(as smtp-source does): their CPU is part of what is measured. Modes alternate (A B C A B C ...) and the
table shows medians. The result also goes to bench/out/http_submit-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from throughput import (
    SINK_COUNT,
    BenchError,
    RunResult,
    cpu_seconds,
    delivery_results,
    ensure_tools,
    finish_report,
    peak_rss_mb,
    pick_base_dir,
    received_total,
    run_main,
    running_postmux,
    scrape,
    start_sinks,
    stop_process,
    wait_delivered,
    write_config,
)

from postmux.passwords import hash_password

MODES = ("smtp", "http-1", "http-batch-100")
BATCH = 100
API_KEY = "bench-" + "k" * 26


@dataclass(frozen=True)
class Options:
    messages: int
    clients: int
    size: int
    repeat: int
    delivery_timeout_s: float


def raw_message(size: int) -> str:
    head = "From: bench@example.com\nTo: user@dest.test\nSubject: bench\n\n"
    line = "x" * 70 + "\n"
    return head + line * max(1, (size - len(head)) // len(line))


def with_api_key(config: Path) -> None:
    # A cheaper scrypt than the default: it is paid once (the key is remembered), but keeps start-up short.
    key_hash = hash_password(API_KEY, n=2**12)
    config.write_text(
        config.read_text()
        + f'\n[api]\nmax_batch = {BATCH}\n\n[[api_key]]\nname = "bench"\nhash = "{key_hash}"\n'
    )


async def post_all(http_port: int, opts: Options, per_request: int) -> float:
    """Submit opts.messages over opts.clients kept-alive connections; seconds until the last 202.

    A few lines of HTTP/1.1 over asyncio streams, not httpx: a Python client costs more CPU per request
    than the server (httpx's per-request machinery, profiled), and it shares the cores with postmux; the
    SMTP side's client is smtp-source, in C. The request bytes are made once and sent as they are.
    """
    content = raw_message(opts.size)
    one = {
        "envelope_sender": "bench@example.com",
        "recipients": [{"email": "user@dest.test"}],
        "content": content,
    }
    path, body = (
        ("/api/v1/messages", one)
        if per_request == 1
        else ("/api/v1/messages/batch", {"messages": [one] * per_request})
    )
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    todo = iter(range(opts.messages // per_request))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        try:
            for _ in todo:
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                answer = await reader.readexactly(length)
                if not status.startswith(b"HTTP/1.1 202"):
                    raise BenchError(f"POST {path}: {status.decode().strip()} {answer[:200]!r}")
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(opts.clients)))
    return time.monotonic() - start


async def warm(http_port: int) -> None:
    """The key's first check (scrypt) before the clock starts: it is remembered after."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
        await http.post("/api/v1/messages", json={}, headers={"Authorization": f"Bearer {API_KEY}"})


def inject_smtp(source: str, port: int, opts: Options) -> float:
    from throughput import Options as SmtpOptions
    from throughput import inject

    smtp = SmtpOptions(
        opts.messages, opts.messages, opts.clients, opts.size, 1, opts.delivery_timeout_s, False
    )
    return inject(source, port, smtp, opts.messages)


def run_mode(mode: str, opts: Options, tools: tuple[str, str], sinks: list[int]) -> RunResult:
    base, _ = pick_base_dir()
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix=f"postmux-bench-{mode}-", dir=base))
    try:
        config = write_config(workdir, True, sinks)
        with_api_key(config)
        with running_postmux(config, workdir / "postmux.log") as (proc, smtp_port, http_port):
            asyncio.run(warm(http_port))
            start = time.monotonic()
            if mode == "smtp":
                accepted_s = inject_smtp(tools[0], smtp_port, opts)
            else:
                accepted_s = asyncio.run(post_all(http_port, opts, 1 if mode == "http-1" else BATCH))
            end_to_end_s, _ = wait_delivered(proc, http_port, opts.messages, start, opts.delivery_timeout_s)
            time.sleep(0.5)
            text = scrape(http_port)
            rss, cpu_s = peak_rss_mb(proc.pid), cpu_seconds(proc.pid)
        return RunResult(
            mode=mode,
            messages=opts.messages,
            accepted_s=accepted_s,
            end_to_end_s=end_to_end_s,
            peak_rss_mb=rss,
            cpu_ms_per_msg=1000.0 * cpu_s / opts.messages,
            load_before=load,
            received=received_total(text),
            delivered=int(delivery_results(text).get("delivered", 0.0)),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000, help="messages per run, a multiple of 100")
    p.add_argument("--clients", type=int, default=20, help="SMTP sessions / HTTP connections (default 20)")
    p.add_argument("--size", type=int, default=1500, help="message size in bytes (default 1500)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the three modes; medians reported")
    p.add_argument("--delivery-timeout", type=float, default=600.0, help="seconds per run (default 600)")
    a = p.parse_args(argv)
    if a.messages < BATCH or a.messages % BATCH or min(a.clients, a.size, a.repeat) < 1:
        p.error(f"--messages must be a multiple of {BATCH}; --clients, --size, --repeat at least 1")
    return Options(a.messages, a.clients, a.size, a.repeat, a.delivery_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = ensure_tools()
    sinks = start_sinks(tools[1], SINK_COUNT)
    runs: list[RunResult] = []
    try:
        for i in range(opts.repeat):
            for mode in MODES:
                print(
                    f"[{i + 1}/{opts.repeat}] {mode}: {opts.messages} messages ...",
                    file=sys.stderr,
                    flush=True,
                )
                r = run_mode(mode, opts, tools, [port for port, _ in sinks])
                print(
                    f"    accepted {r.accepted_rate:.0f} msg/s, end to end {r.end_to_end_rate:.0f} msg/s,"
                    f" postmux CPU {r.cpu_ms_per_msg:.2f} ms/msg (load before {r.load_before:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(r)
    finally:
        for _, proc in sinks:
            stop_process(proc, 10.0)
    print(f"\n{'medians of ' + str(opts.repeat) if opts.repeat > 1 else 'one run'} per mode, {opts.size} B\n")
    print("| mode | messages | accepted msgs/s | end-to-end msgs/s | postmux CPU ms/msg | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        row = summary[mode] = {
            "accepted_msgs_per_s": statistics.median(r.accepted_rate for r in mine),
            "end_to_end_msgs_per_s": statistics.median(r.end_to_end_rate for r in mine),
            "cpu_ms_per_msg": statistics.median(r.cpu_ms_per_msg for r in mine),
            "peak_rss_mb": statistics.median(r.peak_rss_mb for r in mine),
        }
        rates = f"{row['accepted_msgs_per_s']:.0f} | {row['end_to_end_msgs_per_s']:.0f}"
        print(
            f"| {mode} | {opts.messages} | {rates} | {row['cpu_ms_per_msg']:.2f} | {row['peak_rss_mb']:.1f} |"
        )
    problems = [
        f"{r.mode}: received {r.received}, delivered {r.delivered} of {r.messages}"
        for r in runs
        if r.received != r.messages or r.delivered != r.messages
    ]
    return finish_report(
        "http_submit",
        opts,
        runs,
        problems,
        summary=summary,
    )


if __name__ == "__main__":
    run_main(main)
