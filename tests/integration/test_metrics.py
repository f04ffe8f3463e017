"""GET /metrics serves the Prometheus text named in DESIGN.md, fed by the same events as the log."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from postmux.app import App
from tests.support import Upstream, free_port, make_settings, send_many, wait_until


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
