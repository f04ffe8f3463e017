"""The CLI's side of the admin API: calls, errors in plain words, tables on a terminal, JSON otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

EXIT_FAILED = 1
# `postmux doctor`: 0 nothing fails, 1 a check or requirement fails, 2 the domain could not be examined.
EXIT_UNEXAMINED = 2


class AdminClient:
    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
        content: bytes | None = None,
    ) -> dict[str, Any]:
        response = self._request(method, path, params=params, payload=payload, content=content)
        url = f"{self.base_url}/api/v1{path}"
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

    def get(self, path: str) -> dict[str, Any]:
        """GET an admin route's JSON; a refusal or no answer exits with the error said (as every verb)."""
        return self._call("GET", path)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if content is not None:
            headers["Content-Type"] = "text/csv"
        url = f"{self.base_url}/api/v1{path}"
        try:
            return httpx.request(
                method, url, headers=headers, params=params, json=payload, content=content, timeout=60.0
            )
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            typer.echo(f"postmux is not answering at {self.base_url}: {e}", err=True)
            raise typer.Exit(EXIT_FAILED) from None

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

    def drop_webhook_records(self, endpoint: str, *, as_json: bool) -> None:
        body = self._call("DELETE", f"/webhooks/{quote(endpoint, safe='')}/records")
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        else:
            typer.echo(f"{body['dropped']} records of {body['endpoint']} dropped")

    def doctor(self, domain: str, *, as_json: bool) -> int:
        """GET the doctor's report of a domain and print it; the exit code (print_doctor)."""
        try:
            body = self._call("GET", f"/doctor/{quote(domain, safe='')}")
        except typer.Exit:
            raise typer.Exit(EXIT_UNEXAMINED) from None
        return print_doctor(body, as_json=as_json)

    # -- the queue -------------------------------------------------------------------------------------

    def queue_summary(self, params: dict[str, str], *, as_json: bool) -> None:
        body = self._call("GET", "/queue", params=params)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        elif not body["destinations"]:
            typer.echo("the queue is empty" + (" (of what the selector chooses)" if params else ""))
        else:
            Console().print(queue_table(body))

    def queue_list(self, params: dict[str, str], *, as_json: bool) -> None:
        body = self._call("GET", "/queue/messages", params=params)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        if body["messages"]:
            Console().print(messages_table(body["messages"]))
        else:
            typer.echo("no message in the queue matches")
        if body["next_after"]:
            typer.echo(f"more: add --after {body['next_after']}", err=True)

    def queue_show(self, message_id: str, *, as_json: bool) -> None:
        body = self._call("GET", f"/queue/messages/{quote(message_id, safe='')}")
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        console = Console()
        for key in ("id", "message_id", "sender", "client_ip", "size", "smtputf8", "tags", "metadata"):
            if body.get(key) not in (None, {}, ""):
                console.print(f"{key}: {body[key]}", highlight=False, markup=False)
        console.print(f"age: {age(body['age_s'])}", highlight=False)
        console.print(fields_table("headers", body["headers"]))
        console.print(recipients_table(body["recipients"]))
        console.print(attempts_table(body["attempts"]))

    def queue_verb(self, verb: str, body: dict[str, Any], *, as_json: bool) -> None:
        answer = self._call("POST", f"/queue/{verb}", payload=body)
        if as_json:
            typer.echo(json.dumps(answer, indent=2))
        else:
            for change in answer["changes"]:
                typer.echo(change)

    # -- the suppression list ----------------------------------------------------------------------------

    def suppression_list(self, params: dict[str, str], *, as_json: bool) -> None:
        body = self._call("GET", "/suppressions", params=params)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        else:
            Console().print(suppressions_table(body["suppressions"]))

    def suppression_add(self, payload: dict[str, Any], *, as_json: bool) -> None:
        body = self._call("POST", "/suppressions", payload=payload)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
        else:
            e = body["suppression"]
            typer.echo(f"suppressed {e['address']} ({e['scope']}, {e['source']}): {e['reason']}")

    def suppression_remove(self, address: str, scope: str, *, as_json: bool) -> None:
        body = self._call("DELETE", f"/suppressions/{quote(address, safe='@*')}", params={"scope": scope})
        typer.echo(json.dumps(body, indent=2) if as_json else f"removed {address} ({scope})")

    def suppression_import(self, data: bytes, *, as_json: bool) -> None:
        body = self._call("POST", "/suppressions.csv", content=data)
        typer.echo(json.dumps(body, indent=2) if as_json else f"imported {body['imported']} entries")

    def suppression_export(self, params: dict[str, str]) -> str:
        response = self._request("GET", "/suppressions.csv", params=params)
        if response.status_code >= 400:
            typer.echo(f"GET /suppressions.csv: {response.status_code}: {response.text[:200]}", err=True)
            raise typer.Exit(EXIT_FAILED)
        return response.text


def _plain(*cells: str) -> list[Text]:
    """Table cells as they are, never read as Rich markup: they hold text from outside (a Subject, an
    address, a receiver's reply naming "[mx1.example.net]", a blocklist's TXT), which markup would drop
    ("[ticket #123]") or fail on with a traceback ("[/urgent]": a closing tag that matches none)."""
    return [Text(cell) for cell in cells]


def suppressions_table(entries: list[dict[str, Any]]) -> Table:
    table = Table(title="suppressions")
    for column in ("address", "scope", "source", "reason", "created", "expires"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            *_plain(
                e["address"],
                e["scope"],
                e["source"],
                e["reason"],
                _when(e["created"]),
                "never" if e["expires"] is None else _when(e["expires"]),
            )
        )
    return table


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float) -> str:
    """30s, 5m 10s, 2h 5m, 3d 4h: an age or a wait as a person reads it."""
    s = int(seconds)
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // small_size
            return f"{s // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{s}s"


_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "unchecked": "dim"}


def print_doctor(body: dict[str, Any], *, as_json: bool) -> int:
    """A doctor's report as JSON or as two tables (checks, bulk-sender rules); 0: nothing fails, else 1."""
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        console = Console()
        console.print(doctor_table(f"DNS doctor: {body['domain']}", "check", body["checks"]))
        console.print(
            doctor_table("bulk sender rules (Gmail, Yahoo, 2024)", "requirement", body["bulk_sender"])
        )
        verdict = "nothing fails" if body["ok"] else "something fails: see the fix column"
        console.print(Text(verdict, style="green" if body["ok"] else "bold red"))
    return 0 if body["ok"] else EXIT_FAILED


def doctor_table(title: str, first: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in (first, "subject", "status", "found", "fix") if first == "check" else (first, "status"):
        table.add_column(column)
    for column in ("found", "fix") if first != "check" else ():
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, not markup: a fix names [[dkim]], which rich would read as a style.
        cells = [Text(row[first]), *([Text(row["subject"])] if first == "check" else [])]
        cells.append(Text(row["status"], style=_STATUS_STYLE.get(row["status"], "")))
        table.add_row(*cells, Text(row["found"]), Text(row["fix"]))
    return table


def queue_table(body: dict[str, Any]) -> Table:
    n = body["recipients"]
    table = Table(title=f"queue: {n} recipient{'s' if n != 1 else ''}, oldest {age(body['oldest_age_s'])}")
    for column in ("pool", "domain", "destination", "recipients", "queued", "leased", "held", "oldest"):
        table.add_column(column, justify="right" if column in _COUNTS else "left")
    table.add_column("last error", overflow="fold")
    for d in body["destinations"]:
        table.add_row(
            *_plain(
                d["pool"],
                d["domain"],
                d["destination"],
                *(str(d[c]) for c in ("recipients", "queued", "leased", "held")),
                age(d["oldest_age_s"]),
                d["last_error"][:100],
            )
        )
    return table


_COUNTS = ("recipients", "queued", "leased", "held", "oldest")


def messages_table(messages: list[dict[str, Any]]) -> Table:
    table = Table(title="messages")
    for column in ("id", "age", "sender", "recipient", "pool", "state", "tries", "due in", "last member"):
        table.add_column(column, justify="right" if column in ("age", "tries", "due in") else "left")
    table.add_column("last reply", overflow="fold")
    for m in messages:
        for i, r in enumerate(m["recipients"]):
            first = i == 0
            head = (m["id"], age(m["age_s"]), m["sender"] or "<>") if first else ("", "", "")
            table.add_row(*_plain(*head, *_recipient_cells(r, reply_width=80)))
    return table


def _recipient_cells(r: dict[str, Any], reply_width: int | None = None) -> tuple[str, ...]:
    """A recipient's columns, from its address to its last reply (cut to `reply_width`, if given)."""
    due = age(r["due_in_s"]) if r["due_in_s"] is not None else ""
    reply = r["last_reply"] if reply_width is None else r["last_reply"][:reply_width]
    return r["address"], r["pool"], r["state"], str(r["attempts"]), due, r["last_member"], reply


def fields_table(title: str, fields: list[dict[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("name")
    table.add_column("value", overflow="fold")
    for f in fields:
        table.add_row(*_plain(f["name"], f["value"]))
    return table


def recipients_table(recipients: list[dict[str, Any]]) -> Table:
    table = Table(title="recipients")
    for column in ("recipient", "pool", "state", "tries", "due in", "last member"):
        table.add_column(column, justify="right" if column in ("tries", "due in") else "left")
    table.add_column("last reply", overflow="fold")
    for r in recipients:
        table.add_row(*_plain(*_recipient_cells(r)))
    return table


def attempts_table(attempts: list[dict[str, Any]]) -> Table:
    table = Table(title="attempts")
    for column in ("time (UTC)", "recipient", "member"):
        table.add_column(column)
    table.add_column("reply", overflow="fold")
    for a in attempts:
        when = datetime.fromtimestamp(a["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(*_plain(when, a["recipient"], a["member"], a["reply"]))
    return table


def members_table(members: list[dict[str, Any]]) -> Table:
    node = next((m["node"] for m in members if m.get("node")), "")
    table = Table(title=f"members, as node {node} sees them" if node else "members")
    columns = [
        "pool",
        "member",
        "zone",
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
            justify="right"
            if column not in ("pool", "member", "zone", "state", "tls", "recent_error")
            else "left",
        )
    for m in members:
        weight = (
            f"{m['effective_weight']:g}/{m['weight']}"
            if m["effective_weight"] != m["weight"]
            else str(m["weight"])
        )
        state = m["state"]
        if m.get("listed"):  # why it is out: "192.0.2.10 on zen.example: 127.0.0.2 (https://...)"
            state += ": " + "; ".join(m["listed"])
        if m.get("shared_checks", "").startswith("down"):  # what the nodes' checks say: "down 2/3 nodes"
            state += f" ({m['shared_checks']})"
        table.add_row(
            *_plain(
                m["pool"],
                m["member"],
                m.get("zone") or "-",
                state,
                weight,
                f"{m['connections']}/{m['max_connections']}",
                str(m["in_flight"]),
                f"{m['ewma_latency_ms']:.1f}",
                _tls_cell(m),
                m["recent_error"][:60],
            )
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
            *_plain(
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
            *_plain(
                e["endpoint"] + ("" if e["configured"] else " (not configured)"),
                str(e["backlog"]),
                "-" if oldest is None else f"{oldest:.1f}s",
                _age(e["last_success_age_s"]),
                error or "-",
                "-" if e["next_try_in_s"] is None else f"in {e['next_try_in_s']:.1f}s",
            )
        )
    return table


def blocklists_table(checked: list[dict[str, Any]]) -> Table:
    table = Table(title="blocklists")
    for column in ("subject", "zone", "listed", "answers", "why", "checked"):
        table.add_column(column)
    for c in checked:
        table.add_row(
            *_plain(
                c["subject"],
                c["zone"],
                "LISTED" if c["listed"] else "no",
                ", ".join(c["answers"]) or "-",
                c["text"] or "-",
                _age(c["age_s"]),
            )
        )
    return table


_TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], Table]]] = {
    "/members": ("members", members_table),
    "/shaping": ("lanes", shaping_table),
    "/webhooks": ("webhooks", webhooks_table),
    "/blocklists": ("checked", blocklists_table),
}
