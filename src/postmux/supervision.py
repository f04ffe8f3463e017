"""The node's long-lived loops (dispatch, scan, reap, lease renewal, the throttles' heartbeat, the member
sharing, the queue counter), run so that none can end unseen.

Each loop runs until it is cancelled (a stop). A loop that raises, or returns, has hit a defect; left
alone its task would end with an exception nobody retrieves, and the node would go on accepting mail
(250) while, say, nothing was dispatched any more, and say nothing (review outage.md item 4). So:

- a crash is logged at error level with its traceback, counted (postmux_loop_crashes_total{loop}), and
  the loop is started again after `pause_s`: each of these loops keeps its state on its object, not in
  the coroutine, so a new run carries on where the last pass broke off, and a one-off defect (one bad
  answer, one odd message) costs a second, not the node;
- a loop that crashes `max_crashes` times within `window_s` is a defect that will not go away by itself:
  the node is stopped (`on_fatal`; the App logs it as critical and `postmux serve` drains and exits with
  status 70), so an operator sees a dead service and its supervisor restarts it, rather than a node
  that says 250 and delivers nothing. Work leased in the spool is taken back at the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("postmux.supervision")

Loop = Callable[[], Coroutine[Any, Any, None]]

SLOW_PAUSE_S = 60.0  # between restarts of a loop that is not essential and keeps crashing


class Supervisor:
    def __init__(
        self,
        on_fatal: Callable[[str], None],
        *,
        pause_s: float = 1.0,
        max_crashes: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_fatal = on_fatal
        self.pause_s, self.max_crashes, self.window_s = pause_s, max_crashes, window_s
        self.clock = clock
        self.crashes: dict[str, int] = {}  # by loop, since start: the metric

    def start(self, name: str, loop: Loop, *, essential: bool = True) -> asyncio.Task[None]:
        """`loop` run as the task `name`, started again after each crash (see the module's docstring).

        `essential` False: a loop the mail does not depend on (a webhook sender): one that keeps crashing
        never stops the node, it is started again every SLOW_PAUSE_S instead, each crash logged.
        """
        return asyncio.create_task(self.keep(name, loop, essential=essential), name=name)

    async def keep(self, name: str, loop: Loop, *, essential: bool = True) -> None:
        recent: deque[float] = deque()
        while True:
            try:
                await loop()
            except Exception:
                # The traceback is what a developer needs to fix it; exc_info keeps it in the log line.
                log.error("background loop crashed", loop=name, exc_info=True)
            else:
                log.error("background loop ended by itself", loop=name)
            self.crashes[name] = self.crashes.get(name, 0) + 1
            now = self.clock()
            recent.append(now)
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if len(recent) >= self.max_crashes and not essential:
                log.error(
                    "background loop keeps crashing; restarting it less often", loop=name, in_s=SLOW_PAUSE_S
                )
                await asyncio.sleep(SLOW_PAUSE_S)
                continue
            if len(recent) >= self.max_crashes:
                log.critical(
                    "background loop keeps crashing; stopping the node",
                    loop=name,
                    crashes=len(recent),
                    within_s=self.window_s,
                )
                self.on_fatal(f"the {name} loop crashed {len(recent)} times within {self.window_s:g} s")
                return
            log.warning("background loop restarting", loop=name, in_s=self.pause_s)
            await asyncio.sleep(self.pause_s)
