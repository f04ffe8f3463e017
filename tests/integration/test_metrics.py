"""GET /metrics serves the Prometheus text named in DESIGN.md, fed by the same events as the log."""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from postmux import __version__
from postmux.app import App
from postmux.events.metrics import Metrics
from postmux.events.types import Event, EventType
from tests.support import StartUpstream, Upstream, always, free_port, make_settings, send_many, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_receptions_deliveries_and_member_state(tmp_path: Path) -> None:
    up = await Upstream("a").start()
    dead = f"127.0.0.1:{free_port()}"
    pool = {
        "name": "default",
        "policy": "round_robin",
        "members": [{"name": "a", "address": up.address}, {"name": "dead", "address": dead}],
        "health": {"consecutive_failures": 1, "base_ejection_time": "1h"},
    }
    async with App(make_settings(tmp_path, [pool])) as app:
        await send_many(
            app.smtp_port, [f"m{i}" for i in range(10)], concurrency=2, to=["u@dest.test", "v@dest.test"]
        )
        await wait_until(lambda: len(up.received) == 10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got[("postmux_messages_received_total", ())] == 10
    assert got[("postmux_recipients_received_total", ())] == 20
    delivered = (("member", "a"), ("pool", "default"), ("result", "delivered"))
    assert got[("postmux_deliveries_total", delivered)] == 20  # per recipient
    assert (
        got[("postmux_deliveries_total", (("member", "dead"), ("pool", "default"), ("result", "deferred")))]
        >= 1
    )
    assert got[("postmux_member_up", (("member", "a"), ("pool", "default"), ("zone", "")))] == 1
    assert got[("postmux_member_up", (("member", "dead"), ("pool", "default"), ("zone", "")))] == 0
    assert ("postmux_member_connections", (("member", "a"), ("pool", "default"))) in got
    assert got[("postmux_delivery_duration_seconds_count", (("member", "a"), ("pool", "default")))] == 10
    assert any(name == "postmux_queue_messages" for name, _ in got)
    assert 1 <= got[("postmux_spool_commits_total", ())] <= 40  # 10 stores and their outcomes, grouped
    # never a message id or a recipient as a label
    assert "m1" not in response.text and "user@dest.test" not in response.text
    await up.stop()


async def test_metrics_an_operator_needs_process_build_queue_by_destination_refusals_and_lanes(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a", always("451 4.3.0 try again later"))  # stopped by the fixture, failed or not
    pool = {"name": "default", "members": [{"name": "a", "address": up.address}]}
    # Deferred once, the recipients wait an hour: the queue count sees all five queued, none leased again
    # for a retry at the moment it is read.
    retry = {"intervals": ["1h"], "max_age": "1d", "jitter": 0}
    async with App(make_settings(tmp_path, [pool], retry=retry)) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(3)], to=["u@dest.test"])
        await send_many(app.smtp_port, ["o1"], to=["u@other.test", "v@other.test"])
        await wait_until(lambda: len(app.control.shaping()) >= 1 and app.spool.commits >= 4)
        # An SMTP refusal (MAIL before EHLO) and an HTTP one (no API key).
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        await reader.readline()
        writer.write(b"MAIL FROM:<a@example.com>\r\n")
        refused = await reader.readline()
        writer.close()
        await writer.wait_closed()
        app.node_gauges.every_s = 0  # read the queue now, not QUEUE_EVERY_S after the last read
        await app.node_gauges.refresh_queue()
        # The queue counter's next round (every 2 s) counts the five deferred recipients.
        await wait_until(lambda: app._queue_counts.get("queued") == 5, timeout=5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            assert (await client.post("/api/v1/messages", json={})).status_code == 401
            text = (await client.get("/metrics")).text
    got = samples(text)
    assert got[("process_open_fds", ())] > 0
    assert got[("process_resident_memory_bytes", ())] > 0
    assert got[("postmux_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1
    assert refused.startswith(b"503 5.5.1")
    assert got[("postmux_ingress_refusals_total", (("protocol", "smtp"), ("reason", "503 5.5.1")))] == 1
    assert got[("postmux_ingress_refusals_total", (("protocol", "http"), ("reason", "401")))] == 1
    dest = (("destination", "dest.test"), ("pool", "default"))
    assert got[("postmux_queue_destination_recipients", dest)] == 3
    other = (("destination", "other.test"), ("pool", "default"))
    assert got[("postmux_queue_destination_recipients", other)] == 2
    assert got[("postmux_queue_oldest_age_seconds", dest)] >= 0
    assert got[("postmux_queue_recipients", (("state", "queued"),))] == 5
    assert got[("postmux_queue_messages", (("state", "queued"),))] == 5  # the old name, still served
    assert any(name == "postmux_lanes" for name, _ in got)


def test_a_delivered_null_sender_recipient_counts_as_a_dsn_sent() -> None:
    metrics = Metrics()
    metrics(Event(EventType.DELIVERY, sender="", pool="p", member="a"))
    metrics(Event(EventType.DELIVERY, sender="app@example.com", pool="p", member="a"))
    metrics(Event(EventType.BOUNCE, sender="", pool="p", member="a"))
    got = samples(metrics.render().decode())
    assert got[("postmux_dsns_sent_total", (("pool", "p"),))] == 1
