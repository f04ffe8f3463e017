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
from tests.support import StartUpstream, make_settings, send_many, wait_until, zoned_node


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


async def test_top_shows_the_nodes_zone_each_members_and_where_the_picks_go(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    settings, ups = await zoned_node(tmp_path, upstream, http={"admin_token": TOKEN})
    args = ["top", "--once", "--url", "", "--token", TOKEN]
    async with App(settings) as app:
        args[3] = f"http://127.0.0.1:{app.http_port}"
        await send_many(app.smtp_port, [f"m{i}" for i in range(6)])
        await wait_until(lambda: sum(len(u.received) for u in ups.values()) == 6)
        local = await asyncio.to_thread(CliRunner().invoke, cli, args, env={"COLUMNS": "220"})
        app.control.set_draining("a2", True)  # zone a is half healthy now, under local_threshold 0.7
        spilling = await asyncio.to_thread(CliRunner().invoke, cli, args, env={"COLUMNS": "220"})
    assert local.exit_code == 0 and spilling.exit_code == 0, local.output + spilling.output
    out = local.stdout
    assert out.splitlines()[0].startswith("postmux top  node-a  zone a  ")
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    assert {r[1]: r[2] for r in cells if len(r) == len(top.MEMBER_COLUMNS)} == {
        "a1": "a",
        "a2": "a",
        "b1": "b",
    }
    zone_rows = [r for r in cells if len(r) == 6 and r[2] in ("a *", "b")]
    # The attempts of the last 60 s are estimated from two minute slots: six, or a little less when the
    # six fell in the minute before and that minute is sliding out of the window.
    attempts = [float(zone_rows[0].pop(4)), float(zone_rows[1].pop(4))]
    assert 5.5 <= attempts[0] <= 6 and attempts[1] == 0
    assert zone_rows == [  # all six went to zone a: the node's own, healthy
        ["default", "all in the zone (zone 100% healthy, threshold 70%)", "a *", "2/2", "100%"],
        ["", "", "b", "1/1", "0%"],
    ]
    assert "spilling 29% of picks to other zones (zone 50% healthy, threshold 70%)" in spilling.stdout
    assert "1/2" in spilling.stdout


def test_without_zones_top_shows_no_zone_table_and_says_no_zone() -> None:
    snapshot = quiet_snapshot()
    snapshot["members"] = [
        {
            "pool": "p",
            "member": "m1",
            "zone": "",
            "state": "up",
            "connections": 0,
            "max_connections": 10,
            "in_flight": 0,
            "ewma_latency_ms": 0.0,
            "ejected_for_s": 0.0,
        }
    ]
    console = Console(file=io.StringIO(), width=200)
    console.print(top.frame(snapshot))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.splitlines()[0].startswith("postmux top  2027")  # neither name nor zone: nothing said
    assert "zones (" not in out
    assert "│ m1 " in out and "│ -  " in out  # the member's zone column: none


def quiet_snapshot() -> dict[str, Any]:
    return {
        "now": 1_800_000_000.0,
        "node": {"name": "", "zone": None},
        "members": [],
        "pools": [],
        "series": {k: [0] for k in ("t", "accepted", "delivered", "deferred", "bounced", "p50_ms", "p99_ms")},
        "queue": {"destinations": [], "recipients": 0, "oldest_age_s": 0.0},
    }


def test_the_live_view_ends_quietly_on_ctrl_c() -> None:
    snapshot = quiet_snapshot()
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
