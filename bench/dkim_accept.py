"""What DKIM signing adds to one SMTP transaction's latency, end to end through a running node.

    .venv/bin/python bench/dkim_accept.py [--messages 400] [--rounds 2]

One App (SQLite spool, fsync on) in this process with one loopback upstream (postmux.testing.Upstream), one
client sending 1.5 KB messages one after another on one connection (MAIL, RCPT, DATA, each waited for): the
time of each transaction, the first 50 left out, with [[dkim]] off and dual signed (RSA-2048 + Ed25519),
alternating. Delivery runs in the same process meanwhile, as it does in a node.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import make_settings

from postmux.app import App
from postmux.dkim import generate_key
from postmux.testing import Upstream

TEXT = (
    b"From: App <app@example.test>\r\nTo: user@dest.test\r\nSubject: bench\r\n\r\n"
    + (b"x" * 74 + b"\r\n") * 18
)


async def transactions(directory: Path, dkim: list[dict[str, Any]], messages: int) -> list[float]:
    up = await Upstream("up").start()
    try:
        pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
        async with App(make_settings(directory, pools, dkim=dkim)) as app:
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=app.smtp_port, local_hostname="client.test", start_tls=False
            )
            await client.connect()
            times = []
            for _ in range(messages):
                started = time.perf_counter()
                await client.sendmail("app@example.test", ["user@dest.test"], TEXT)
                times.append(time.perf_counter() - started)
            await client.quit()
    finally:
        await up.stop()
    return times[50:]


async def main(messages: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for algorithm, file in (("rsa-sha256", "rsa.key"), ("ed25519-sha256", "ed.key")):
            (directory / file).write_bytes(generate_key(algorithm)[0])  # type: ignore[arg-type]
        selectors = [
            {"name": "rsa", "key_file": str(directory / "rsa.key")},
            {"name": "ed", "algorithm": "ed25519-sha256", "key_file": str(directory / "ed.key")},
        ]
        dual = [{"domain": "example.test", "selectors": selectors}]
        for round_ in range(rounds):
            for label, entries in (("off", []), ("dual", dual)):
                run = directory / f"{label}{round_}"
                run.mkdir()
                times = sorted(await transactions(run, entries, messages))
                print(
                    f"{label:5} median {statistics.median(times) * 1000:.2f} ms"
                    f"  p90 {times[int(len(times) * 0.9)] * 1000:.2f} ms"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rounds))
