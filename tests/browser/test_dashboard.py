"""The dashboard in a real browser: it loads against a node under load, its charts move, a member that
dies turns down within the check interval, a drain click takes a member out, a wrong token sees nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from postmux.app import App
from tests.browser.conftest import TOKEN, load, screenshot_path, sign_in
from tests.support import StartUpstream, Upstream, always, make_settings, send, wait_until

INTERVAL_S, FALL, CHECK_TIMEOUT_S = 0.3, 2, 0.3


def settings(tmp_path: Path, ups: list[Upstream]) -> Any:
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [{"name": u.name, "address": u.address} for u in ups],
        "check": {
            "enabled": True,
            "interval": INTERVAL_S,
            "timeout": CHECK_TIMEOUT_S,
            "rise": 2,
            "fall": FALL,
        },
        # Passive ejection out of the way: the member-down test is about the active checks.
        "health": {"consecutive_failures": 1000},
    }
    return make_settings(tmp_path, [pool], http={"admin_token": TOKEN})


async def js(page: Any, expression: str) -> Any:
    return await page.evaluate(expression)


async def wait_for_snapshots(page: Any, count: int, timeout_s: float = 10.0) -> None:
    await page.wait_for_function(
        f"window.postmux && window.postmux.snapshots >= {count}", timeout=timeout_s * 1000
    )


async def test_the_page_loads_under_load_and_its_charts_move(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    ups = [await upstream(n) for n in ("a", "b")]
    async with App(settings(tmp_path, ups)) as app, load(app) as sent:
        await wait_until(lambda: sent() >= 40, timeout=20)
        page = await browser.new_page()
        await sign_in(page, app)
        await wait_for_snapshots(page, 2)
        assert await page.locator("#members tbody tr").count() == 2
        assert await page.locator('#members tr[data-member="a"]').get_attribute("data-state") == "up"
        assert await page.locator("#pools tbody tr").count() == 1
        await page.screenshot(path=screenshot_path("dashboard-under-load-1"), full_page=True)
        chart = page.locator("#chart-throughput canvas")
        first_pixels = await chart.screenshot()
        first = await js(page, "window.postmux.last.series.delivered.reduce((a, b) => a + b, 0)")
        seen = await js(page, "window.postmux.snapshots")
        await wait_until(lambda: sent() >= 200, timeout=30)
        await wait_for_snapshots(page, seen + 3)
        second = await js(page, "window.postmux.last.series.delivered.reduce((a, b) => a + b, 0)")
        second_pixels = await chart.screenshot()
        await page.screenshot(path=screenshot_path("dashboard-under-load-2"), full_page=True)
        assert first > 0
        assert second > first  # the data moved
        assert second_pixels != first_pixels  # and so did the chart
        assert await page.locator("#events tbody tr").count() > 0
        seqs = await js(page, "window.postmux.events.map((e) => e.seq)")
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
        # A stream that reconnects is sent the node's ring again: the page keeps no event twice (one
        # evaluate: no snapshot comes in between).
        before, after = await js(
            page,
            "(() => { const p = window.postmux, n = p.events.length;"
            " addEvents({...p.last, events: p.events.slice(-50)});"
            " return [n, new Set(p.events.map((e) => e.seq)).size]; })()",
        )
        assert before == after > 0  # as many distinct events as before (the ring may be full: 1,000)
        # The browser's own timing of each update (performance.now around the DOM work): a page that
        # rebuilt everything per event would take seconds. The first update builds the page's tables
        # and charts and compiles its script: on a machine busy with other tests it alone took 142 ms.
        timings = await js(page, "window.postmux.timings")
        assert len(timings) > 1 and max(timings[1:]) < 100, timings


async def test_a_member_that_dies_turns_down_within_the_check_interval(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    ups = [await upstream(n) for n in ("a", "b")]
    async with App(settings(tmp_path, ups)) as app:
        page = await browser.new_page()
        await sign_in(page, app)
        await wait_for_snapshots(page, 1)
        row = page.locator('#members tr[data-member="b"]')
        assert await row.get_attribute("data-state") == "up"
        await ups[1].stop()
        stopped = time.monotonic()
        await page.wait_for_selector(
            '#members tr[data-member="b"][data-state="check-failed"]', timeout=10_000
        )
        took_s = time.monotonic() - stopped
        await page.screenshot(path=screenshot_path("dashboard-member-down"), full_page=True)
        # fall checks an interval apart (+10% jitter), each bounded by its timeout, then one page tick.
        assert took_s <= FALL * INTERVAL_S * 1.1 + CHECK_TIMEOUT_S + app.dashboard.tick_s + 0.5, took_s
        assert "check" in (await row.locator("td.why").inner_text())
        assert await page.locator('#members tr[data-member="a"]').get_attribute("data-state") == "up"


async def test_a_drain_click_takes_the_member_out(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    ups = [await upstream(n) for n in ("a", "b")]
    async with App(settings(tmp_path, ups)) as app:
        page = await browser.new_page()
        await sign_in(page, app)
        await wait_for_snapshots(page, 1)
        await page.click('#members tr[data-member="a"] button[data-act="drain"]')
        await page.wait_for_selector('#members tr[data-member="a"][data-state="draining"]', timeout=5000)
        await page.screenshot(path=screenshot_path("dashboard-drained"), full_page=True)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            members = {m["member"]: m for m in (await api.get("/api/v1/members")).json()["members"]}
        assert members["a"]["state"] == "draining"
        assert members["b"]["state"] == "up"
        # And back: the same row's button now enables it.
        await page.click('#members tr[data-member="a"] button[data-act="enable"]')
        await page.wait_for_selector('#members tr[data-member="a"][data-state="up"]', timeout=5000)


async def test_the_page_shows_the_nodes_zone_each_members_and_where_the_picks_go(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    ups = [await upstream(n) for n in ("a1", "a2", "b1")]
    members = [{"name": u.name, "address": u.address, "zone": u.name[0]} for u in ups]
    pool = {"name": "default", "policy": "round_robin", "members": members}
    zoned = make_settings(tmp_path, [pool], http={"admin_token": TOKEN}, node={"name": "node-a", "zone": "a"})
    async with App(zoned) as app:
        for i in range(4):
            await send(app.smtp_port, f"zone-{i}")
        await wait_until(lambda: sum(len(u.received) for u in ups) == 4)
        page = await browser.new_page()
        await sign_in(page, app)
        await wait_for_snapshots(page, 1)
        assert await page.locator("#node").inner_text() == "node-a · zone a"
        zones = {
            name: await page.locator(f'#members tr[data-member="{name}"] td.zone').inner_text()
            for name in ("a1", "a2", "b1")
        }
        assert zones == {"a1": "a", "a2": "a", "b1": "b"}
        assert await page.locator("#zones-panel").is_visible()
        here = page.locator('#zones tr[data-zone="a"]')
        assert "local" in await here.inner_text()
        assert await here.locator("td.share").inner_text() == "100.0%"  # the four went to zone a
        assert await page.locator('#zones tr[data-zone="b"] td.share').inner_text() == "0.0%"
        routing = page.locator('#zones tr[data-pool="default"] td.routing')
        assert await routing.get_attribute("data-state") == "local"
        assert await routing.inner_text() == "all in the zone (zone 100.0% healthy, threshold 70.0%)"
        await page.screenshot(path=screenshot_path("dashboard-zones-local"), full_page=True)
        # A drain click halves zone a: under local_threshold, it spills 1 - 0.5 / 0.7 of the picks.
        await page.click('#members tr[data-member="a2"] button[data-act="drain"]')
        await page.wait_for_selector('#zones td.routing[data-state="spilling"]', timeout=5000)
        assert await routing.inner_text() == (
            "spilling 28.6% of picks to other zones (zone 50.0% healthy, threshold 70.0%)"
        )
        assert "1 / 2" in await here.inner_text()
        await page.screenshot(path=screenshot_path("dashboard-zones-spilling"), full_page=True)


async def test_a_page_without_zones_keeps_the_zones_panel_hidden(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    async with App(settings(tmp_path, [await upstream("a")])) as app:
        page = await browser.new_page()
        await sign_in(page, app)
        await wait_for_snapshots(page, 1)
        assert not await page.locator("#zones-panel").is_visible()
        assert await page.locator("#node").inner_text() == "no zone"


async def test_a_wrong_token_gets_no_data(tmp_path: Path, upstream: StartUpstream, browser: Any) -> None:
    ups = [await upstream("a")]
    async with App(settings(tmp_path, ups)) as app:
        page = await browser.new_page()
        await sign_in(page, app, token="not-the-token-at-all")
        assert await page.locator("#problem").inner_text() == "wrong token"
        assert await page.locator("#members").count() == 0
        await page.screenshot(path=screenshot_path("dashboard-wrong-token"), full_page=True)
        assert await browser.cookies() == []
        for path in ("/dashboard/state", "/dashboard/stream", "/dashboard/api/v1/members"):
            answer = await page.request.get(f"http://127.0.0.1:{app.http_port}{path}")
            assert answer.status == 401, path
        # A made-up cookie is no better.
        await browser.add_cookies(
            [{"name": "postmux_session", "value": "0" * 64, "url": f"http://127.0.0.1:{app.http_port}"}]
        )
        answer = await page.request.get(f"http://127.0.0.1:{app.http_port}/dashboard/state")
        assert answer.status == 401
        # The token itself as the cookie is not the session either (the cookie holds an HMAC of it).
        await browser.add_cookies(
            [{"name": "postmux_session", "value": TOKEN, "url": f"http://127.0.0.1:{app.http_port}"}]
        )
        answer = await page.request.get(f"http://127.0.0.1:{app.http_port}/dashboard/state")
        assert answer.status == 401


async def test_queue_buttons_filters_and_a_message_history_on_click(
    tmp_path: Path, upstream: StartUpstream, browser: Any
) -> None:
    ups = [await upstream("a", always("451 4.3.0 try again later"))]
    async with App(settings(tmp_path, ups)) as app:
        await send(app.smtp_port, "kept", to=["u@slow.test"])
        await send(app.smtp_port, "other", to=["v@other.test"])
        page = await browser.new_page()
        await sign_in(page, app)
        await page.wait_for_selector('#queue tr[data-domain="slow.test"]', timeout=10_000)
        # Hold what waits for slow.test, from its row; the API confirms it, and other.test is untouched.
        await page.click('#queue tr[data-domain="slow.test"] button[data-queue="hold"]')
        await page.wait_for_function(
            "document.querySelector('#queue-total').textContent.includes('1 recipient held')", timeout=5000
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            held = (await api.get("/api/v1/queue", params={"state": "held"})).json()["destinations"]
        assert [(d["domain"], d["held"]) for d in held] == [("slow.test", 1)]
        row = page.locator('#queue tr[data-domain="slow.test"] td:nth-child(7)')  # the page says so too
        assert await row.inner_text() == "1"
        # Filter the events to one domain, then open a message's history from its id.
        await page.wait_for_selector('#events tr[data-type="TransientFailure"]', timeout=10_000)
        await page.fill("#f-domain", "slow.test")
        recipients = await page.locator("#events tbody td:nth-child(4)").all_inner_texts()
        assert recipients and set(recipients) == {"u@slow.test"}
        await page.select_option("#f-type", "TransientFailure")
        await page.locator("#events tbody a.msg").first.click()
        await page.wait_for_selector("#message-body table", timeout=5000)
        history = await page.locator("#message-body").inner_text()
        await page.screenshot(path=screenshot_path("dashboard-message-history"), full_page=True)
        assert "u@slow.test" in history
        assert "451 4.3.0 try again later" in history  # an attempt the spool kept
        assert "held" in history  # the recipient's state now
