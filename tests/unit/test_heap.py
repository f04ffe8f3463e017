"""settle_heap: what `postmux serve` does to the garbage collector once it has started (postmux/heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from postmux.heap import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
def test_what_start_built_is_frozen_and_young_collections_run_ten_times_less_often() -> None:
    built = [{"setting": i} for i in range(1000)]  # containers alive at start, as the settings are
    _, middle, old = gc.get_threshold()
    settle_heap()
    assert gc.get_freeze_count() >= len(built)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
