"""Live control: the admin API and its token, drain and enable, reload (SIGHUP's path), hung members."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
from rich.console import Console
from typer.testing import CliRunner

from postmux.admin.client import shaping_table
from postmux.app import App
from postmux.cli import app as cli
from postmux.config import load_config
from tests.support import StartUpstream, delay, make_settings, send, send_many, toml_head, wait_until

TOKEN = "t0ken-for-the-tests-only"


def write_config(
    path: Path, tmp_path: Path, members: list[tuple[str, str, int]], policy: str = "weighted"
) -> None:
    rows = ",\n".join(
        f'  {{ name = "{name}", address = "{address}", weight = {weight}, max_connections = 20 }}'
        for name, address, weight in members
    )
    path.write_text(
        toml_head(tmp_path, token=TOKEN)
        + f"""[[pool]]
name = "default"
policy = "{policy}"
members = [
{rows}
]
"""
    )


def admin(app: App, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}/api/v1", headers=headers)


async def test_admin_api_needs_its_token(tmp_path: Path, upstream: StartUpstream) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        async with admin(app, token=None) as client:
            response = await client.get("/members")
            assert response.status_code == 401 and "token" in response.json()["error"]
        async with admin(app, token="wrong-token-wrong-token") as client:
            assert (await client.get("/members")).status_code == 401
        async with admin(app) as client:
            response = await client.get("/members")
            assert response.status_code == 200
            [row] = response.json()["members"]
            assert row["member"] == "a" and row["state"] == "up" and row["weight"] == 1
            assert (await client.post("/members/nobody/drain")).json() == {
                "error": "no member named 'nobody'"
            }
    settings = make_settings(
        tmp_path / "x", [{"name": "default", "members": [{"name": "a", "address": a.address}]}]
    )
    async with App(settings) as app, admin(app) as client:
        response = await client.get("/members")
        assert response.status_code == 403 and "admin_token" in response.json()["error"]


async def test_drain_finishes_work_in_flight_and_enable_brings_the_member_back(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b", delay(0.4))
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)], policy="round_robin")
    async with App(load_config(cfg), config_path=cfg) as app, admin(app) as client:
        await send_many(app.smtp_port, [f"f{i}" for i in range(6)], concurrency=6)
        await wait_until(lambda: app.pools["default"].member("b").in_flight > 0)
        response = await client.post("/members/b/drain")
        assert response.status_code == 200 and response.json()["members"][0]["state"] == "draining"
        in_flight = app.pools["default"].member("b").in_flight
        await wait_until(lambda: len(a.received) + len(b.received) == 6, timeout=5)
        assert len(b.received) == in_flight  # what b had in flight, it finished; nothing new after
        await send_many(app.smtp_port, [f"d{i}" for i in range(10)], concurrency=2)
        await wait_until(lambda: len(a.received) == 6 - in_flight + 10)
        assert len(b.received) == in_flight
        assert (await client.post("/members/b/enable")).json()["members"][0]["state"] == "up"
        await send_many(app.smtp_port, [f"e{i}" for i in range(10)], concurrency=1)
        await wait_until(lambda: len(a.received) + len(b.received) == 26, timeout=10)
        assert sum(r.test_id.startswith("e") for r in b.received) >= 3


async def test_reload_with_new_weights_changes_the_shares(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app, admin(app) as client:
        await send_many(app.smtp_port, [f"x{i}" for i in range(40)], concurrency=4)
        await wait_until(lambda: len(a.received) + len(b.received) == 40)
        assert len(a.received) == len(b.received) == 20
        transport = app.transports[("default", "a")]
        write_config(cfg, tmp_path, [("a", a.address, 4), ("b", b.address, 1)])
        response = await client.post("/reload")
        assert app.transports[("default", "a")] is transport  # a new weight keeps the open connections
        assert response.status_code == 200, response.text
        assert response.json()["changes"] == ["default/a: weight 1 -> 4"]
        await send_many(app.smtp_port, [f"y{i}" for i in range(100)], concurrency=4)
        await wait_until(lambda: len(a.received) + len(b.received) == 140)
    assert sum(r.test_id.startswith("y") for r in a.received) == 80


async def test_reload_with_a_broken_file_changes_nothing(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app, admin(app) as client:
        before = (await client.get("/members")).json()
        cfg.write_text(cfg.read_text().replace("weight = 1, max_connections = 20 }", "weight = -5 }", 1))
        response = await client.post("/reload")
        assert response.status_code == 400
        body = response.json()
        assert body["problems"] == [
            {"key": "pool[0].members[0].weight", "reason": "Input should be greater than or equal to 0"}
        ]
        assert (await client.get("/members")).json() == before
        await send_many(app.smtp_port, [f"z{i}" for i in range(10)], concurrency=2)
        await wait_until(lambda: len(a.received) + len(b.received) == 10)
        assert len(a.received) == len(b.received) == 5


async def test_reload_adds_and_removes_members(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b, c = await upstream("a"), await upstream("b"), await upstream("c")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        write_config(cfg, tmp_path, [("a", a.address, 1), ("c", c.address, 1)])
        result = await app.reload()
        assert result.ok and sorted(result.changes) == ["default/b: removed", "default/c: added"]
        await send_many(app.smtp_port, [f"r{i}" for i in range(20)], concurrency=2)
        await wait_until(lambda: len(a.received) + len(c.received) == 20)
        assert b.received == [] and len(c.received) == 10
        states = {row["member"]: row["state"] for row in app.control.members()}
        assert states == {"a": "up", "c": "up"}  # b had nothing in flight: gone at once


async def test_hung_member_is_left_after_the_data_timeout(tmp_path: Path, upstream: StartUpstream) -> None:
    hung, good = await upstream("hung", delay(30)), await upstream("good")
    pools = [
        {
            "name": "default",
            "policy": "round_robin",
            "members": [{"name": "hung", "address": hung.address}, {"name": "good", "address": good.address}],
        }
    ]
    settings = make_settings(tmp_path, pools, delivery={"data_timeout": "500ms"})
    async with App(settings) as app:
        started = asyncio.get_running_loop().time()
        await send(app.smtp_port, "h1")
        await send(app.smtp_port, "h2")
        await wait_until(lambda: len(good.received) == 2, timeout=5)
        assert asyncio.get_running_loop().time() - started < 3
    assert hung.received == []


async def test_cli_members_drain_enable_reload(tmp_path: Path, upstream: StartUpstream) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        url = ["--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]

        def run(*args: str) -> tuple[int, str, str]:
            result = CliRunner().invoke(cli, [*args, *url, "--json"])
            return result.exit_code, result.stdout, result.stderr

        code, out, _ = await asyncio.to_thread(run, "members")
        assert code == 0 and '"member": "a"' in out
        code, out, _ = await asyncio.to_thread(run, "drain", "a")
        assert code == 0 and '"state": "draining"' in out
        code, out, _ = await asyncio.to_thread(run, "enable", "a")
        assert code == 0 and '"state": "up"' in out
        code, _, err = await asyncio.to_thread(run, "drain", "zz")
        assert code == 1 and "no member named 'zz'" in err
        code, out, _ = await asyncio.to_thread(run, "reload")
        assert code == 0 and '"ok": true' in out
        await send(app.smtp_port, "lane")
        await wait_until(lambda: len(a.received) == 1)
        code, out, _ = await asyncio.to_thread(run, "shaping")
        assert code == 0
        lanes = json.loads(out)["lanes"]
    assert [(x["member"], x["destination"], x["state"], x["delivered"]) for x in lanes] == [
        ("a", "dest.test", "open", 1)
    ]
    console = Console(width=200, file=io.StringIO())
    console.print(shaping_table([{**lanes[0], "suspended_for_s": 42.0, "state": "suspended"}]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "dest.test" in text and "suspended 42s" in text and "0 of 20/20" in text


async def test_reload_says_smtp_changes_need_a_restart(tmp_path: Path, upstream: StartUpstream) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        cfg.write_text(cfg.read_text().replace('hostname = "postmux.test"', 'hostname = "renamed.test"'))
        result = app.control.reload()
    assert result.ok and result.needs_restart == ["smtp.hostname"]
