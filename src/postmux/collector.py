"""The cyclic garbage collector set for a long-running server process, once it has started.

Everything made while starting (modules, settings, the app's objects: 50,000 tracked objects in an ingress
worker, 100,000 in the main process) lives as long as the process. CPython's full collection walks all of
it each time it runs: 17 ms in a worker and 40-50 ms in the main process on the bench machine (issue 12),
a stall every session or message in flight waits out, and one of the largest in accept p99. gc.freeze()
puts it out of the collector's sight: a full collection then walks only what was made since.

Each SMTP session leaves a few hundred objects in reference cycles (protocol, reader, transport, task) that
only the collector frees; at CPython's young-generation threshold of 700 it ran every session or two,
walking the sessions still open each time. At 7,000: -1.2% of a worker's instructions a message
(callgrind, 1.5 KB), for a few MB more between collections at most.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 7000


def settle_after_start() -> None:
    """Call once the process has started: collect, freeze what survives, collect the young less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
