from __future__ import annotations

import json
from pathlib import Path

import pytest

from postmux.demo import run_demo


async def test_demo_delivers_everything_on_all_three_members(tmp_path: Path) -> None:
    try:
        await run_demo(300, tmp_path)
    except SystemExit as e:  # run_demo exits 1 when an accepted message reached no upstream
        pytest.fail(f"the demo lost mail (exit {e.code})")

    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines() if line]
    delivered_by = {r["member"] for r in records if r["type"] == "Delivery"}
    assert delivered_by == {"fast", "slow", "flaky"}
    assert sum(r["type"] == "Reception" for r in records) == 300
