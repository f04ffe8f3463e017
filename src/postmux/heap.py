"""The garbage collector, set for a server whose heap is mostly built once at start (issue 12).

CPython's cyclic collector runs a young collection every 700 net allocations of container objects and a
full one now and then, and a full one walks every object alive: the settings, the pools, the modules,
~110,000 objects in `postmux serve` after start. Under load at 1.5 KB that was 6 full collections of
~40 ms each in 6,000 messages (each a pause every accept and delivery in flight waits out), and 730 young
ones, ~0.08 ms of the event loop's CPU a message in all (bench/README.md, "A third round").

An ingress worker is the same at its size (~50,000 objects, a full collection of 17 ms, which every
session in flight waits out), and each SMTP session leaves a few hundred objects in reference cycles
(protocol, reader, transport, task) that only the collector frees: at the young threshold of 700 it ran
every session or two, walking the sessions still open each time; at 7,000 a worker spends 1.2% fewer
instructions a message (callgrind, 1.5 KB). So the workers settle their heap too, once serving.

`settle_heap` is called once the process has started: the heap as it is then moves to the permanent
generation (`gc.freeze`, which no collection walks), and young collections run every `young_threshold`
allocations instead. A message's objects are freed by reference counting as it goes; the collector is
for cycles only, and a few thousand more objects waiting for it is a few hundred KB at most.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7000  # CPython's default is 700


def settle_heap(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Freeze what start built and collect the young generation less often; call once, after start."""
    gc.collect()  # what start left as garbage goes first, rather than being frozen for good
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
