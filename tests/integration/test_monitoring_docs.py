"""docs/monitoring: the Prometheus alert rules pass promtool (check and their own unit tests), and every
postmux metric the rules and the Grafana dashboard name is one a running node serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from postmux.app import App
from tests.support import StartUpstream, make_settings, send, wait_until

MONITORING = Path(__file__).parents[2] / "docs" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool: apt-get install prometheus (.ci/run does)"
)


@needs_promtool
@pytest.mark.parametrize("command", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]])
def test_the_alert_rules_pass_promtool(command: list[str]) -> None:
    assert PROMTOOL is not None
    run = subprocess.run([PROMTOOL, *command], cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    found += re.findall(r"expr: (.+(?:\n {10}.+)*)", (MONITORING / "alerts.yml").read_text())
    return found


async def test_every_metric_the_dashboard_and_the_alerts_name_is_served(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a = await upstream("a")
    pool = {"name": "default", "members": [{"name": "a", "address": a.address}]}
    async with App(make_settings(tmp_path, [pool])) as app:
        await send(app.smtp_port, "one")
        await wait_until(lambda: len(a.received) == 1)
        app.node_gauges.every_s = 0
        await app.node_gauges.refresh_queue()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            text = (await client.get("/metrics")).text
    served = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    # Families with no sample yet (a labelled counter before its first count) are served by name too.
    for f in text_string_to_metric_families(text):
        served |= {f.name, f"{f.name}_total"} if f.type == "counter" else {f.name}
    named = {n for e in exprs() for n in re.findall(r"\b((?:postmux|process)_[a-z_]+)", e)}
    assert len(named) >= 15
    assert sorted(named - served) == []
