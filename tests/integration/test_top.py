"""`postmux top`: one frame (--once) from a running node's admin API, and the live loop ends on Ctrl-C."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.testing import CliRunner

from postmux.admin import top
from postmux.app import App
from postmux.cli import app as cli
from tests.integration.test_control import TOKEN
from tests.support import StartUpstream, make_settings, send_many, wait_until


async def test_top_once_prints_members_redundancy_throughput_and_queue(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b")
    pool = {"name": "default", "members": [{"name": n.name, "address": n.address} for n in (a, b)]}
    async with App(make_settings(tmp_path, [pool], http={"admin_token": TOKEN})) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(6)])
        await wait_until(lambda: len(a.received) + len(b.received) == 6)
        app.control.set_draining("b", True)
        args = ["top", "--once", "--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]
        result = await asyncio.to_thread(CliRunner().invoke, cli, args, env={"COLUMNS": "200"})
        refused = await asyncio.to_thread(
            CliRunner().invoke, cli, [*args[:-1], "wrong-token-for-top-000"], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "postmux top" in out
    lines = {line.split("│")[2].strip(): line for line in out.splitlines() if line.count("│") > 4}
    assert "draining" in lines["b"] and "up" in lines["a"]
    assert "redundancy" in out
    assert "1/2" in out  # one member of two up
    assert "queue: 0 recipients" in out
    minutes = [
        line.split("│") for line in out.splitlines() if line.count("│") == 8 and ":" in line.split("│")[1]
    ]
    assert len(minutes) == top.MINUTES_SHOWN
    # accepted and delivered in the last minutes (the six may straddle a minute's end)
    assert [sum(int(row[i]) for row in minutes) for i in (2, 3)] == [6, 6]
    assert refused.exit_code == 1
    assert "401" in refused.stderr


def test_the_live_view_ends_quietly_on_ctrl_c() -> None:
    snapshot: dict[str, Any] = {
        "now": 1_800_000_000.0,
        "members": [],
        "pools": [],
        "series": {k: [0] for k in ("t", "accepted", "delivered", "deferred", "bounced", "p50_ms", "p99_ms")},
        "queue": {"destinations": [], "recipients": 0, "oldest_age_s": 0.0},
    }
    calls = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return snapshot

    console = Console(file=io.StringIO(), width=120)
    top.run(fetch, 0.01, False, console)  # returns: no traceback, no exit code but 0
    assert len(calls) == 3
    assert "postmux top" in console.file.getvalue()  # type: ignore[attr-defined]
