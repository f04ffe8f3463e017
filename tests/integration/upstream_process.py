"""An upstream (postmux.testing.Upstream) in a process of its own, for tests that measure the memory of the
process that delivers: the 20 MB the upstream takes in must not count there.

It prints its port, then waits for its standard input to end; then it prints `<octets> <sha256>` for each
message it received, and exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from postmux.testing import Upstream


async def main() -> None:
    async with Upstream("far") as up:
        print(up.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for received in up.received:
            print(len(received.data), hashlib.sha256(received.data).hexdigest(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
