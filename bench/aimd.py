"""AIMD against a receiver that counts per minute: does postmux settle near what it allows?

One postmux (in this process, on uvloop) with one relay member in front of an aiosmtpd receiver that
accepts at most N messages in any sliding minute and answers `421 4.7.0` beyond that, the way large
mailbox providers push back. A backlog bigger than the run can deliver is queued at the start. postmux is
told nothing about N: only its automatic backoff ([shaping] aimd) may find it.

Every `--sample` seconds the script records deliveries, 421s and the lane's allowed rate, then prints
per-minute figures, writes them to bench/out/aimd-<timestamp>.json and, when matplotlib is installed,
plots the curve to bench/aimd.png. All traffic is on loopback; the run stops by itself after --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from throughput import write_json

from postmux.app import App
from postmux.config import settings_from_dict
from postmux.logs import configure_logging
from postmux.testing import Upstream

REFUSAL = "421 4.7.0 Too many messages this minute, slow down"


class MinuteLimit:
    """The receiver's behaviour (postmux.testing): at most `limit` messages in any `window_s`, 421 beyond."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.accepted: deque[float] = deque()
        self.accepted_at: list[float] = []
        self.refused_at: list[float] = []

    async def __call__(self, upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        now = time.monotonic()
        while self.accepted and self.accepted[0] <= now - self.window_s:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            self.refused_at.append(now)
            return REFUSAL
        self.accepted.append(now)
        self.accepted_at.append(now)
        return None


def settings(workdir: Path, receiver_port: int, aimd_increase: str) -> dict[str, Any]:
    return {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "postmux.bench"},
        "http": {"listen": "127.0.0.1:0"},
        "spool": {"path": str(workdir / "spool.db")},
        "events": {"log": str(workdir / "events.jsonl")},
        "retry": {"intervals": ["30s"], "max_age": "1d", "jitter": 0.2},
        # A relay member stands in for a receiver's MX here, so its lane adapts too.
        "shaping": {"aimd": "all", "aimd_increase": aimd_increase, "min_rate": "1/min"},
        "pool": [
            {
                "name": "default",
                "members": [{"name": "ip1", "address": f"127.0.0.1:{receiver_port}", "max_connections": 5}],
                # The receiver's 421s are shaping's business here; health must not eject the only member.
                "health": {"consecutive_4xx": 1_000_000},
            }
        ],
    }


async def inject(port: int, count: int) -> None:
    data = b"From: bench@example.com\r\nTo: u@dest.test\r\nSubject: aimd\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test", start_tls=False)
    await client.connect()
    try:
        for _ in range(count):  # one connection: the backlog is queued quickly and in order
            await client.sendmail("bench@example.com", ["u@dest.test"], data)
        await client.quit()
    finally:
        client.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    receiver = MinuteLimit(args.limit)
    # SMTPUTF8 off, as aiosmtpd has it by default: the receiver this bench measured before was plain aiosmtpd.
    async with Upstream("receiver", receiver, hostname="receiver.test", smtputf8=False) as upstream:
        samples: list[dict[str, float | None]] = []
        with tempfile.TemporaryDirectory(prefix="postmux-aimd-") as tmp:
            app = App(settings_from_dict(settings(Path(tmp), upstream.port, args.aimd_increase), "<bench>"))
            async with app:
                start = time.monotonic()
                await inject(app.smtp_port, args.backlog)
                deadline = start + args.minutes * 60
                while time.monotonic() < deadline:
                    await asyncio.sleep(args.sample)
                    lane = next(iter(app.dispatcher.shaper.lanes.values()), None)
                    samples.append(
                        {
                            "t_s": round(time.monotonic() - start, 1),
                            "accepted": len(receiver.accepted_at),
                            "refused": len(receiver.refused_at),
                            "rate_per_min": None
                            if lane is None or lane.rate is None
                            else round(lane.rate * 60, 1),
                        }
                    )
    return {"start": start, "samples": samples, "receiver": receiver}


def per_minute(receiver: MinuteLimit, start: float, minutes: int) -> list[dict[str, int]]:
    rows = []
    for m in range(minutes):
        lo, hi = start + 60 * m, start + 60 * (m + 1)
        rows.append(
            {
                "minute": m + 1,
                "delivered": sum(lo <= t < hi for t in receiver.accepted_at),
                "deferred": sum(lo <= t < hi for t in receiver.refused_at),
            }
        )
    return rows


def plot(samples: list[dict[str, float | None]], receiver: MinuteLimit, start: float, limit: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    step = 10.0
    end = max(float(s["t_s"] or 0) for s in samples)
    bins = [i * step for i in range(int(end // step) + 1)]
    delivered = [sum(b <= t - start < b + step for t in receiver.accepted_at) * 60 / step for b in bins]
    refused = [sum(b <= t - start < b + step for t in receiver.refused_at) * 60 / step for b in bins]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([b / 60 for b in bins], delivered, label="delivered (per min, 10 s bins)")
    ax.plot([b / 60 for b in bins], refused, label="421 deferrals (per min, 10 s bins)", alpha=0.7)
    rates = [(float(s["t_s"] or 0) / 60, s["rate_per_min"]) for s in samples if s["rate_per_min"] is not None]
    if rates:
        ax.plot([r[0] for r in rates], [r[1] for r in rates], "--", label="postmux allowed rate (per min)")
    ax.axhline(limit, color="grey", linestyle=":", label=f"receiver's limit ({limit} per sliding minute)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("messages per minute")
    ax.set_ylim(0, limit * 2.5)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("AIMD against a per-minute receiver limit")
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("aimd.png"), dpi=90)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=120, help="the receiver's messages per sliding minute")
    parser.add_argument("--minutes", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--sample", type=float, default=5.0)
    parser.add_argument("--aimd-increase", default="1/min")
    args = parser.parse_args()
    configure_logging(
        logging.WARNING
    )  # the ShapingChanged events are in the curve; keep stdout for the table
    result = uvloop.run(run(args))
    receiver, start = result["receiver"], result["start"]
    rows = per_minute(receiver, start, args.minutes)
    print(f"receiver limit: {args.limit}/min; aimd_increase {args.aimd_increase}; backlog {args.backlog}")
    print("| minute | delivered | 421 deferrals |")
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['minute']} | {row['delivered']} | {row['deferred']} |")
    settled = rows[2:]
    if settled:
        mean = sum(r["delivered"] for r in settled) / len(settled)
        deferred = sum(r["deferred"] for r in settled) / len(settled)
        print(
            f"from minute 3 on: {mean:.0f} delivered/min ({mean / args.limit:.0%} of the limit), "
            f"{deferred:.1f} deferrals/min"
        )
    path = write_json({"args": vars(args), "minutes": rows, "samples": result["samples"]}, "aimd")
    print(f"wrote {path}")
    if plot(result["samples"], receiver, start, args.limit):
        print("plot: bench/aimd.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
