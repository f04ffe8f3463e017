"""The CLI's side of the admin API: calls, errors in plain words, tables on a terminal, JSON otherwise."""

from __future__ import annotations

import json
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

    def show_members(self, *, as_json: bool) -> None:
        body = self._call("GET", "/members")
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        Console().print(members_table(body["members"]))

    def post(self, path: str, *, as_json: bool) -> None:
        body = self._call("POST", path)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        elif "members" in body:
            Console().print(members_table(body["members"]))
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
        "recent_error",
    ]
    for column in columns:
        table.add_column(
            column.replace("_", " "),
            justify="right" if column not in ("pool", "member", "state", "recent_error") else "left",
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
            m["recent_error"][:60],
        )
    return table
