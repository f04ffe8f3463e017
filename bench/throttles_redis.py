"""Per-call cost of the throttles on Redis against memory, and of a synchronous against an async client.

    .venv/bin/python bench/throttles_redis.py [--url redis://127.0.0.1:6379/0] [--calls 5000] [--rounds 5]

The gate asks the throttles without awaiting (scheduling/throttles.py), so a Redis call blocks the event
loop for its round trip. Figures, in µs per call, median of --rounds rounds of --calls calls each:

- **memory**: `MemoryThrottles`, the single-node default;
- **redis sync**: `RedisThrottles` on redis-py's synchronous client (what postmux uses): one EVALSHA;
- **redis async**: the same script awaited on redis-py's asyncio client, one call after another: what
  an awaiting gate would pay per call (the loop is free meanwhile, but the decision is no sooner);
- **admit + start**: what one attempt on a rate-limited lane costs the loop: `Lane.admission` (suspended,
  leases_held, rate take=0) then `Lane.start` (lease, rate) and `Lane.finish` (release): 6 calls.

Keys go under a random prefix, deleted at the end. Loopback only; the server is shared with whatever
else runs on the machine, so compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable

import redis
import redis.asyncio

from postmux.scheduling.redis_throttles import _RATE, RedisThrottles
from postmux.scheduling.shaping import Lane, Limits
from postmux.scheduling.throttles import MemoryThrottles, Throttles


def per_call_us(call: Callable[[int], object], calls: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(calls):
            call(i)
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


def rate_probe(throttles: Throttles) -> Callable[[int], object]:
    return lambda i: throttles.rate(f"lane{i % 50}", 1000.0, 10, time.time(), take=0)


def attempt(throttles: Throttles) -> Callable[[int], object]:
    lanes = [
        Lane("p", f"m{n}", "dest", Limits(5, rate=1e6, burst=10), connections=5.0, rate=1e6)
        for n in range(10)
    ]
    for lane in lanes:
        lane.throttles = throttles

    def one(i: int) -> object:
        lane, now = lanes[i % 10], time.time()
        lane.admission(now)
        lane.start(now)
        lane.finish(now)
        return None

    return one


async def async_rate_us(url: str, prefix: str, calls: int, rounds: int) -> float:
    client = redis.asyncio.Redis.from_url(url)
    script = client.register_script(_RATE)
    samples = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(calls):
                await script(keys=[f"{prefix}rate:lane{i % 50}"], args=["", repr(0.001), 10, 0])
            samples.append((time.perf_counter() - started) / calls * 1e6)
    finally:
        await client.aclose()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    prefix = f"postmux-bench:{os.urandom(4).hex()}:"
    shared = RedisThrottles.from_url(args.url, prefix, timeout_s=1.0)
    memory = MemoryThrottles()
    try:
        rows = [
            ("rate take=0: memory", per_call_us(rate_probe(memory), args.calls, args.rounds)),
            ("rate take=0: redis sync", per_call_us(rate_probe(shared), args.calls, args.rounds)),
            (
                "rate take=0: redis async",
                asyncio.run(async_rate_us(args.url, prefix, args.calls, args.rounds)),
            ),
            ("admit + start + finish: memory", per_call_us(attempt(memory), args.calls, args.rounds)),
            ("admit + start + finish: redis sync", per_call_us(attempt(shared), args.calls, args.rounds)),
        ]
        assert not shared.fallen_back, "Redis did not answer: the figures would be the fallback's"
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        shared.close()
    print(f"| call | µs per call (median of {args.rounds} x {args.calls}) |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    print(f"\nload average before: {os.getloadavg()[0]:.2f}; nproc {os.cpu_count()}")


if __name__ == "__main__":
    main()
