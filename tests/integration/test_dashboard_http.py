"""The dashboard's doors over plain HTTP (the browser tests drive the page): the sign-in form sets an
HttpOnly, SameSite=Strict cookie that is not the token; without it no data; changes want the header a
cross-site form cannot send; the admin API's own bearer check is unchanged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from postmux.app import App
from tests.support import StartUpstream, make_settings, send, wait_until, zoned_node

TOKEN = "dashboard-http-token-000"


async def test_sign_in_sets_a_strict_httponly_cookie_that_is_not_the_token_and_opens_the_data(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a = await upstream("a")
    pool = {"name": "default", "members": [{"name": "a", "address": a.address}]}
    async with App(make_settings(tmp_path, [pool], http={"admin_token": TOKEN})) as app:
        await send(app.smtp_port, "one")
        await wait_until(lambda: len(a.received) == 1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as web:
            form = await web.get("/")
            assert form.status_code == 200 and 'name="token"' in form.text.replace(
                "name=token", 'name="token"'
            )
            assert (await web.get("/dashboard/state")).status_code == 401
            assert (await web.get("/dashboard/stream")).status_code == 401
            wrong = await web.post("/login", data={"token": "nope-nope-nope-nope"})
            assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
            signed = await web.post("/login", data={"token": TOKEN})
            assert signed.status_code == 303 and signed.headers["location"] == "/"
            cookie = signed.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
            assert TOKEN not in cookie
            state = (await web.get("/dashboard/state")).json()
            assert [m["member"] for m in state["members"]] == ["a"]
            assert sum(state["series"]["delivered"]) == 1
            assert [e["type"] for e in state["events"]][:2] == ["Reception", "Delivery"]
            # A change without the dashboard's header is refused (a cross-site form cannot add it).
            bare = await web.post("/dashboard/api/v1/members/a/drain")
            assert bare.status_code == 403
            drained = await web.post(
                "/dashboard/api/v1/members/a/drain", headers={"X-Postmux-Dashboard": "1"}
            )
            assert drained.json()["members"][0]["state"] == "draining"
            # Only admin routes: dot segments (sent as they are; httpx would resolve them) go nowhere else.
            session = web.cookies["postmux_session"]
            reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
            writer.write(
                b"GET /dashboard/api/v1/../../healthz HTTP/1.1\r\nHost: postmux\r\nConnection: close\r\n"
                + f"Cookie: postmux_session={session}\r\n\r\n".encode()
            )
            raw = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert raw.startswith(b"HTTP/1.1 404"), raw[:200]
            # The admin API itself still wants its bearer token, cookie or not.
            assert (await web.get("/api/v1/members")).status_code == 401
            await web.post("/logout")
            assert (await web.get("/dashboard/state")).status_code == 401
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            snapshot = (await api.get("/api/v1/dashboard")).json()
    assert snapshot["members"][0]["state"] == "draining"
    assert snapshot["events"] == []  # the page alone gets the events
    assert json.dumps(snapshot)  # plain JSON


async def test_no_admin_token_no_dashboard(tmp_path: Path, upstream: StartUpstream) -> None:
    a = await upstream("a")
    pool = {"name": "default", "members": [{"name": "a", "address": a.address}]}
    async with (
        App(make_settings(tmp_path, [pool])) as app,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as web,
    ):
        page = await web.get("/")
        assert page.status_code == 403 and "admin_token" in page.text
        assert (await web.post("/login", data={"token": ""})).status_code == 403
        assert (await web.get("/dashboard/state")).status_code == 401


async def test_the_snapshot_carries_the_nodes_zone_each_members_and_each_pools_zones(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    settings, ups = await zoned_node(tmp_path, upstream, http={"admin_token": TOKEN})
    async with App(settings) as app, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as web:
        for i in range(4):
            await send(app.smtp_port, f"z{i}")
        await wait_until(lambda: sum(len(u.received) for u in ups.values()) == 4)
        await web.post("/login", data={"token": TOKEN})
        local = (await web.get("/dashboard/state")).json()
        await web.post("/dashboard/api/v1/members/a1/drain", headers={"X-Postmux-Dashboard": "1"})
        spilling = (await web.get("/dashboard/state")).json()
    assert local["node"] == {"name": "node-a", "zone": "a"}
    assert {m["member"]: m["zone"] for m in local["members"]} == {"a1": "a", "a2": "a", "b1": "b"}
    assert sum(m["attempts_last_min"] for m in local["members"] if m["zone"] == "a") > 3.5
    (zoned,) = local["pools"]
    assert zoned["zone_routing"] == {
        "state": "local",
        "local_share": 1.0,
        "local_health": 1.0,
        "local_threshold": 0.7,
    }
    # All four went to zone a, the node's own (the attempts are a sliding minute's estimate: see history.py).
    assert [(z["zone"], z["local"], z["up"], z["members"], z["share"]) for z in zoned["zones"]] == [
        ("a", True, 2, 2, 1.0),
        ("b", False, 1, 1, 0.0),
    ]
    # One of zone a's two members drained: half its capacity, under local_threshold 0.7, so the zone keeps
    # 0.5 / 0.7 of the picks and spills the rest to zone b.
    routing = spilling["pools"][0]["zone_routing"]
    assert (routing["state"], routing["local_health"], routing["local_share"]) == ("spilling", 0.5, 0.7143)
    assert [(z["zone"], z["up"]) for z in spilling["pools"][0]["zones"]] == [("a", 1), ("b", 1)]
