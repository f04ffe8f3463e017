"""The CLI's side of the admin API: calls, errors in plain words, tables on a terminal, JSON otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

EXIT_FAILED = 1


class AdminClient:
    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def _call(self, method: str, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = f"{self.base_url}/api/v1{path}"
        try:
            response = httpx.request(method, url, headers=headers, timeout=10.0)
        except httpx.HTTPError as e:
            typer.echo(f"postmux is not answering at {self.base_url}: {e}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {"error": response.text[:200]}
        if response.status_code >= 400:
            typer.echo(f"{method} {url}: {response.status_code}: {body.get('error', '')}", err=True)
            for problem in body.get("problems", []):
                typer.echo(f"  {problem['key']}: {problem['reason']}", err=True)
            raise typer.Exit(EXIT_FAILED)
        return body

    def show(self, path: str, *, as_json: bool) -> None:
        """GET a listing (/members, /shaping) and print it as its table, or as JSON."""
        body = self._call("GET", path)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        key, table = _TABLES[path]
        Console().print(table(body[key]))

    def post(self, path: str, *, as_json: bool) -> None:
        body = self._call("POST", path)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        elif "members" in body:
            Console().print(members_table(body["members"]))
        elif "lanes" in body:
            if body["lanes"]:
                Console().print(shaping_table(body["lanes"]))
            else:
                typer.echo("no lane of that member was suspended")
        else:
            for change in body.get("changes", []) or ["no change"]:
                typer.echo(change)
            for key in body.get("needs_restart", []):
                typer.echo(f"{key}: changed in the file, takes effect at the next restart")


def members_table(members: list[dict[str, Any]]) -> Table:
    table = Table(title="members")
    columns = [
        "pool",
        "member",
        "state",
        "weight",
        "connections",
        "in_flight",
        "ewma_latency_ms",
        "tls",
        "recent_error",
    ]
    for column in columns:
        table.add_column(
            column.replace("_", " "),
            justify="right" if column not in ("pool", "member", "state", "tls", "recent_error") else "left",
        )
    for m in members:
        weight = (
            f"{m['effective_weight']:g}/{m['weight']}"
            if m["effective_weight"] != m["weight"]
            else str(m["weight"])
        )
        table.add_row(
            m["pool"],
            m["member"],
            m["state"],
            weight,
            f"{m['connections']}/{m['max_connections']}",
            str(m["in_flight"]),
            f"{m['ewma_latency_ms']:.1f}",
            _tls_cell(m),
            m["recent_error"][:60],
        )
    return table


def _tls_cell(m: dict[str, Any]) -> str:
    """The mode, and what the last connection used: "verify TLSv1.3", "opportunistic none", "none"."""
    mode, used = m.get("tls_mode", ""), m.get("tls", "")
    return f"{mode} {used.split()[0]}" if used and mode != "none" else mode


def _per_min(now: float | None, ceiling: float | None) -> str:
    if now is None and ceiling is None:
        return "-"
    words = "-" if now is None else f"{now:g}"
    return words if now == ceiling else f"{words}/{'-' if ceiling is None else f'{ceiling:g}'}"


def shaping_table(lanes: list[dict[str, Any]]) -> Table:
    table = Table(title="shaping: member x destination (now/configured)")
    for column in (
        "pool",
        "member",
        "destination",
        "state",
        "connections",
        "rate/min",
        "warm-up",
        "last change",
    ):
        table.add_column(column, justify="right" if column in ("connections", "rate/min") else "left")
    for lane in lanes:
        state = lane["state"]
        if lane["suspended_for_s"]:
            state += f" {lane['suspended_for_s']:.0f}s"
        warm = lane.get("warmup")
        change = lane["last_change"] or ""
        if change:
            change = f"{lane['last_change_age_s']:.0f}s ago: {change}"
        table.add_row(
            lane["pool"],
            lane["member"],
            lane["destination"],
            state,
            f"{lane['in_flight']} of {lane['connections']}/{lane['max_connections']}",
            _per_min(lane["rate_per_min"], lane["max_rate_per_min"]),
            f"{warm['sent_today']}/{warm['cap_today'] if warm['cap_today'] is not None else '-'}"
            if warm
            else "",
            change[:80],
        )
    return table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def webhooks_table(endpoints: list[dict[str, Any]]) -> Table:
    table = Table(title="webhooks")
    for column in ("endpoint", "backlog", "oldest pending", "last success", "last error", "next try"):
        table.add_column(column, justify="right" if column == "backlog" else "left")
    for e in endpoints:
        error = e["last_error"]
        if error:
            error = f"{_age(e['last_error_age_s'])}: {error}"[:80]
            if e["failures_in_a_row"]:
                error += f" ({e['failures_in_a_row']} in a row)"
        oldest = e["oldest_pending_age_s"]
        table.add_row(
            e["endpoint"] + ("" if e["configured"] else " (not configured)"),
            str(e["backlog"]),
            "-" if oldest is None else f"{oldest:.1f}s",
            _age(e["last_success_age_s"]),
            error or "-",
            "-" if e["next_try_in_s"] is None else f"in {e['next_try_in_s']:.1f}s",
        )
    return table


_TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], Table]]] = {
    "/members": ("members", members_table),
    "/shaping": ("lanes", shaping_table),
    "/webhooks": ("webhooks", webhooks_table),
}
