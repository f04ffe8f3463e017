"""When deferred work is due again, and when it has waited long enough to expire.

The schedule counts rounds, not attempts: a round tries each usable member of the pool once (RFC 5321
4.5.4.1 asks for a wait before retrying the *same* server; another member is another server), and ends
when the work goes back to the spool to wait. With three members refusing, the first wait is intervals[0]
whether one member or three were tried; counting attempts made it intervals[2].
"""

from __future__ import annotations

import random

from postmux.config import RetrySettings


class RetrySchedule:
    def __init__(self, settings: RetrySettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()

    def interval(self, rounds: int) -> float:
        """The wait after the `rounds`-th round (1-based); the last interval repeats."""
        intervals = self.settings.intervals
        base = intervals[min(max(rounds, 1), len(intervals)) - 1]
        spread = self.settings.jitter
        return base * (1.0 + self._rng.uniform(-spread, spread)) if spread else base

    def next_due(self, rounds: int, created: float, now: float) -> float | None:
        """When to try again, or None when the message has reached max_age and must expire.

        The last retry is brought forward to the expiry time, so a message gets its final try at max_age
        rather than expiring unretried up to one interval early.
        """
        expires = created + self.settings.max_age
        if now >= expires:
            return None
        return min(now + self.interval(rounds), expires)
