"""The operator's queue verbs, through the CLI against a running node: `queue` (summary), `queue list`,
`queue show`, `flush`, `hold`, `release`, `delete`, `bounce` and `move`, on selectors; a mass action
needs --all; errors in plain words.

A real App with its admin API on loopback, upstreams that defer while a flag is set, and the CLI run as a
user runs it (typer's runner in a thread; its stdout is not a terminal, so every answer is JSON).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from rich.console import Console
from typer.testing import CliRunner

from postmux.admin import top
from postmux.admin.client import attempts_table, fields_table, messages_table, queue_table, recipients_table
from postmux.app import App
from postmux.cli import app as cli
from postmux.config import load_config
from tests.integration.test_control import TOKEN, admin
from tests.support import (
    Behaviour,
    StartUpstream,
    Upstream,
    free_port,
    read_events,
    send,
    toml_head,
    wait_until,
)

DEFER = "451 4.3.0 not now"


def write_config(cfg: Path, tmp_path: Path, a: str, b: str, also: str = "") -> None:
    """Pool default (member a) for mail to dest.test and other.test; pool bulk (member b) takes mail to
    example.com, so the DSNs to app@example.com go to b. Retries wait an hour: deferred mail stays.
    `also`: the address of a second member of pool default, a2."""
    second = f', {{ name = "a2", address = "{also}" }}' if also else ""
    cfg.write_text(
        toml_head(tmp_path, token=TOKEN, retry="1h")
        + f"""[shaping]
provider = [{{ name = "desthost", domains = ["dest.test"] }}]
[[pool]]
name = "default"
members = [{{ name = "a", address = "{a}" }}{second}]
[[pool]]
name = "bulk"
members = [{{ name = "b", address = "{b}" }}]
[[route]]
match = {{ recipient_domain = "example.com" }}
pool = "bulk"
"""
    )


def deferring(flag: list[bool]) -> Behaviour:
    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return DEFER if flag[0] else None

    return behaviour


class Cli:
    """`postmux VERB ...` against the running node; answers (code, parsed JSON or None, stderr)."""

    def __init__(self, app: App) -> None:
        self.url = ["--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]

    async def __call__(self, *args: str) -> tuple[int, Any, str]:
        result = await asyncio.to_thread(CliRunner().invoke, cli, [*args, *self.url])
        out = result.stdout
        parsed = json.loads(out[out.index("{") :]) if "{" in out and result.exit_code == 0 else None
        return result.exit_code, parsed, result.stderr


async def queued(app: App, n: int, state: str = "queued") -> None:
    """Until the spool holds `n` recipients in `state` (the outcome is recorded after its events)."""
    for _ in range(500):
        if (await app.spool.counts())[state] == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the spool never held {n} {state} recipients: {await app.spool.counts()}")


async def started(
    tmp_path: Path, upstream: StartUpstream, flag: list[bool]
) -> tuple[Path, Upstream, Upstream]:
    a, b = await upstream("a", deferring(flag)), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, a.address, b.address)
    return cfg, a, b


def message_id_of(reply: str) -> str:
    """The spool's id from the 250 reply ("2.0.0 Ok: queued as ID")."""
    return reply.split()[-1]


async def test_summary_list_and_show_tell_what_waits_where_and_every_attempt(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, _, _ = await started(tmp_path, upstream, [True])
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        first = message_id_of(await send(app.smtp_port, "m1", to=["x@dest.test", "y@other.test"]))
        second = message_id_of(await send(app.smtp_port, "m2", "news@example.org", to=["z@dest.test"]))
        await queued(app, 3)

        code, summary, _ = await run("queue")
        assert code == 0
        rows = {(d["pool"], d["domain"]): d for d in summary["destinations"]}
        assert summary["recipients"] == 3 and set(rows) == {
            ("default", "dest.test"),
            ("default", "other.test"),
        }
        dest = rows[("default", "dest.test")]
        assert (dest["recipients"], dest["queued"], dest["held"], dest["destination"]) == (
            2,
            2,
            0,
            "desthost",
        )
        assert dest["last_error"] == DEFER and dest["oldest_age_s"] >= 0

        code, page, _ = await run("queue", "list", "--domain", "dest.test")
        assert code == 0 and page["next_after"] is None
        assert [(m["id"], [r["address"] for r in m["recipients"]]) for m in page["messages"]] == [
            (first, ["x@dest.test"]),
            (second, ["z@dest.test"]),
        ]
        code, page, _ = await run("queue", "list", "--limit", "1")
        assert [m["id"] for m in page["messages"]] == [first] and page["next_after"] == first
        code, page, _ = await run("queue", "list", "--limit", "1", "--after", first)
        assert [m["id"] for m in page["messages"]] == [second] and page["next_after"] is None

        for selector, expected in (
            (["--provider", "desthost"], {first: ["x@dest.test"], second: ["z@dest.test"]}),
            (["--member", "a", "--sender", "news@example.org"], {second: ["z@dest.test"]}),
            (["--member", "b"], {}),
            (["--pool", "bulk"], {}),
            (["--older-than", "1h"], {}),
            (["--state", "held"], {}),
            (["--id", first, "--state", "queued"], {first: ["x@dest.test", "y@other.test"]}),
        ):
            code, page, err = await run("queue", "list", *selector)
            assert code == 0, err
            got = {m["id"]: [r["address"] for r in m["recipients"]] for m in page["messages"]}
            assert got == expected, selector

        code, shown, _ = await run("queue", "show", first)
        assert code == 0
        assert (shown["id"], shown["sender"], shown["client_ip"]) == (first, "app@example.com", "127.0.0.1")
        assert (shown["message_id"], shown["tags"], shown["metadata"]) == ("m1@example.com", {}, {})
        headers = {h["name"]: h["value"] for h in shown["headers"]}
        assert headers["Subject"] == "test m1" and headers["Message-ID"] == "<m1@example.com>"
        assert [(r["address"], r["state"], r["attempts"], r["last_member"]) for r in shown["recipients"]] == [
            ("x@dest.test", "queued", 1, "a"),
            ("y@other.test", "queued", 1, "a"),
        ]
        assert sorted((t["recipient"], t["member"], t["reply"]) for t in shown["attempts"]) == [
            ("x@dest.test", "a", DEFER),
            ("y@other.test", "a", DEFER),
        ]
        assert all(abs(t["at"] - app.clock()) < 60 for t in shown["attempts"])

        # Refusals name what is wrong, with no traceback.
        for args, said in (
            (["queue", "show", "nope"], "404: no message with id 'nope' in the queue"),
            (["queue", "list", "--state", "parked"], "422: state: 'parked' is not one of"),
            (["queue", "list", "--older-than", "soon"], "422: older_than: 'soon' is not a duration"),
            (["queue", "--provider", "nobody"], "422: provider: no provider named 'nobody'"),
            (["queue", "list", "--limit", "0"], "422: limit: a page holds 1 to 1000 messages"),
        ):
            code, _, err = await run(*args)
            assert code == 1 and said in err and "Traceback" not in err, (args, err)


async def test_show_lists_an_attempt_retried_at_once_on_another_member_beside_the_last(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, a2, b = (
        await upstream("a", deferring([True])),
        await upstream("a2", deferring([True])),
        await upstream("b"),
    )
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, a.address, b.address, also=a2.address)
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        mid = message_id_of(await send(app.smtp_port, "twice"))
        await queued(app, 1)
        code, shown, _ = await run("queue", "show", mid)
        assert code == 0
        tried = [(t["recipient"], t["member"], t["reply"]) for t in shown["attempts"]]
        assert sorted(tried) == [("user@dest.test", "a", DEFER), ("user@dest.test", "a2", DEFER)]
        assert shown["recipients"][0]["last_member"] == tried[-1][1]  # the round's last attempt
        assert shown["attempts"][0]["at"] <= shown["attempts"][1]["at"]
        assert app.dispatcher._tries == {}  # handed to the spool with the settlement


async def test_show_keeps_a_delivered_recipients_attempt_while_its_message_waits_for_another(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def other_defers(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return DEFER if any(r.endswith("@other.test") for r in envelope.rcpt_tos) else None

    a, b = await upstream("a", other_defers), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, a.address, b.address)
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        mid = message_id_of(await send(app.smtp_port, "half", to=["x@dest.test", "y@other.test"]))
        await wait_until(lambda: len(a.received) == 1)
        await queued(app, 1)
        code, shown, _ = await run("queue", "show", mid)
        assert code == 0
        assert [(r["address"], r["state"]) for r in shown["recipients"]] == [
            ("x@dest.test", "delivered"),
            ("y@other.test", "queued"),
        ]
        tried = sorted((t["recipient"], t["member"], t["reply"][:3]) for t in shown["attempts"])
        assert tried == [("x@dest.test", "a", "250"), ("y@other.test", "a", "451")]


async def test_hold_keeps_mail_from_flush_and_release_then_flush_deliver_it(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    deferring_now = [True]
    cfg, a, _ = await started(tmp_path, upstream, deferring_now)
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        held = message_id_of(await send(app.smtp_port, "held"))
        await queued(app, 1)
        code, answer, _ = await run("hold", "--id", held)
        assert code == 0 and answer == {"action": "hold", "recipients": 1, "changes": ["1 recipient held"]}
        await queued(app, 1, "held")
        deferring_now[0] = False  # the receiver takes mail again
        code, answer, _ = await run("flush", "--id", held)
        assert code == 0 and answer["recipients"] == 0  # held mail stays held
        code, listing, _ = await run("queue", "list", "--state", "held")
        assert [m["id"] for m in listing["messages"]] == [held]

        code, answer, _ = await run("release", "--id", held)
        assert code == 0 and answer["recipients"] == 1
        await wait_until(lambda: [r.test_id for r in a.received] == ["held"])

        deferring_now[0] = True
        waiting = message_id_of(await send(app.smtp_port, "waiting"))
        await queued(app, 1)
        deferring_now[0] = False
        code, answer, _ = await run("flush", "--domain", "dest.test")
        assert code == 0 and answer == {
            "action": "flush",
            "recipients": 1,
            "changes": ["1 recipient made due now"],
        }
        await wait_until(lambda: [r.test_id for r in a.received] == ["held", "waiting"])
        await queued(app, 0)
        code, _, err = await run("queue", "show", waiting)
        assert code == 1 and "404" in err  # delivered: gone from the queue


async def test_bounce_sends_exactly_one_dsn_with_the_operators_reason(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, a, b = await started(tmp_path, upstream, [True])
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        bounced = message_id_of(
            await send(
                app.smtp_port,
                "bounced",
                to=["x@dest.test", "y@dest.test"],
                headers="X-Postmux-Tag: campaign=spring\r\nX-Postmux-Meta: customer=42\r\n",
            )
        )
        kept = message_id_of(await send(app.smtp_port, "kept", "news@example.org", to=["z@other.test"]))
        await queued(app, 3)
        code, _, err = await run("bounce", "--id", bounced)
        assert code == 2 and "--reason" in err  # the sender is owed a reason
        code, answer, err = await run("bounce", "--id", bounced, "--reason", "spam complaints from the list")
        assert code == 0, err
        assert answer == {"action": "bounce", "recipients": 2, "changes": ["2 recipients bounced"]}
        await wait_until(lambda: len(b.received) == 1)
        await queued(app, 1)  # the other message only: the DSN went, and nothing more will
        [dsn] = b.received
        assert dsn.sender == "" and dsn.recipients == ["app@example.com"]
        text = dsn.data.decode()
        assert "spam complaints from the list" in text and "Status: 5.0.0" in text
        assert (
            "Final-Recipient: rfc822; x@dest.test" in text and "Final-Recipient: rfc822; y@dest.test" in text
        )
        assert "Subject: test bounced" in text  # the original header section, quoted
        code, _, _ = await run("queue", "show", bounced)
        assert code == 1
        code, shown, _ = await run("queue", "show", kept)
        assert code == 0 and shown["recipients"][0]["state"] == "queued"
        assert a.received == []
    events = read_events(tmp_path / "events.jsonl")
    by_operator = [
        (e["recipient"], e["tags"], e["metadata"], e["message_id"]) for e in events if e["type"] == "Bounce"
    ]
    labels = ({"campaign": "spring", "by": "operator"}, {"customer": "42"}, "bounced@example.com")
    assert by_operator == [("x@dest.test", *labels), ("y@dest.test", *labels)]


async def test_delete_is_silent_and_move_gives_mail_to_another_pool_that_exists(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, a, b = await started(tmp_path, upstream, [True])
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        moved = message_id_of(await send(app.smtp_port, "moved", to=["x@dest.test"]))
        deleted = message_id_of(await send(app.smtp_port, "deleted", to=["y@other.test"]))
        await queued(app, 2)
        code, answer, _ = await run("delete", "--domain", "other.test")
        assert code == 0 and answer["recipients"] == 1
        code, _, err = await run("queue", "show", deleted)
        assert code == 1 and f"no message with id '{deleted}'" in err

        code, _, err = await run("move", "--id", moved, "--to", "nowhere")
        assert code == 1 and "422: to: no pool named 'nowhere'" in err
        async with admin(app) as client:  # the API's own answer: JSON naming the field
            response = await client.post("/queue/move", json={"id": moved, "to": "nowhere"})
            assert response.status_code == 422
            assert response.json() == {"error": "to: no pool named 'nowhere'", "field": "to"}
            response = await client.post("/queue/hold", json={"id": moved, "colour": "red"})
            assert response.status_code == 422 and response.json()["field"] == "colour"
            response = await client.post("/queue/hold", content=b"{not json")
            assert response.status_code == 400 and "not JSON" in response.json()["error"]
            response = await client.post("/queue/bounce", json={"id": moved, "reason": " "})
            assert response.status_code == 422 and response.json()["field"] == "reason"
            for field, value in (("reason", "spam \udcfc"), ("domain", "d\udcfc.test")):  # no character
                lone = json.dumps({"id": moved, field: value}).encode()  # ASCII: the surrogate as an escape
                response = await client.post("/queue/bounce", content=lone)
                assert response.status_code == 422 and response.json()["field"] == field, response.text
            response = await client.post("/queue/explode", json={"id": moved})
            assert response.status_code == 404 and "flush, hold, release" in response.json()["error"]
            response = await client.post("/queue/hold", json={"id": moved, "to": "bulk"})
            assert response.status_code == 422 and response.json()["field"] == "to"  # move's, not hold's
        code, answer, _ = await run("move", "--id", moved, "--to", "bulk")
        assert code == 0 and answer["changes"] == ["1 recipient moved to pool bulk"]
        code, answer, _ = await run("flush", "--pool", "bulk")  # its due time was kept: flush it
        assert code == 0 and answer["recipients"] == 1
        await wait_until(lambda: [r.test_id for r in b.received] == ["moved"])
        await queued(app, 0)
        assert a.received == []  # nothing of the deleted message, and no DSN for it
        assert len(b.received) == 1


async def test_a_mass_action_without_a_selector_is_refused_and_all_acts_on_every_message(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, _, _ = await started(tmp_path, upstream, [True])
    async with App(load_config(cfg), config_path=cfg) as app:
        run = Cli(app)
        for i in range(2):
            await send(app.smtp_port, f"m{i}", to=[f"r{i}@dest.test"])
        await queued(app, 2)
        for verb in (
            ["hold"],
            ["release"],
            ["flush"],
            ["delete"],
            ["bounce", "--reason", "x"],
            ["move", "--to", "bulk"],
        ):
            code, _, err = await run(*verb)
            assert code == 1, verb
            assert f"400: {verb[0]} with no selector would act on every message" in err and "all" in err
        await queued(app, 2)  # nothing changed
        code, answer, _ = await run("hold", "--all")
        assert code == 0 and answer["recipients"] == 2
        await queued(app, 2, "held")
        code, answer, _ = await run("delete", "--all")
        assert code == 0 and answer["recipients"] == 2
        await queued(app, 0, "held")


async def test_the_cli_says_in_one_line_when_the_node_is_not_answering_or_refuses_the_token(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, _, _ = await started(tmp_path, upstream, [True])
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["queue"], ["queue", "show", "x"], ["hold", "--all"]):
        result = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--url", nowhere, "--token", TOKEN])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"postmux is not answering at {nowhere}")
        assert "Traceback" not in result.stderr and result.stdout == ""
    async with App(load_config(cfg), config_path=cfg) as app:
        url = f"http://127.0.0.1:{app.http_port}"
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["queue", "--url", url, "--token", "wrong"])
        assert result.exit_code == 1 and "401: missing or wrong bearer token" in result.stderr


def test_the_tables_show_what_the_json_says() -> None:
    """On a terminal the answers are tables: the same fields, as a person reads them."""
    summary = {
        "recipients": 3,
        "oldest_age_s": 7260.0,
        "destinations": [
            {
                "pool": "default",
                "domain": "dest.test",
                "destination": "desthost",
                "recipients": 3,
                "queued": 2,
                "leased": 0,
                "held": 1,
                "oldest_age_s": 7260.0,
                "last_error": DEFER,
            }
        ],
    }
    recipient = {
        "address": "x@dest.test",
        "pool": "default",
        "state": "queued",
        "attempts": 2,
        "due_in_s": 300.0,
        "last_member": "a",
        "last_reply": DEFER,
    }
    attempts = [{"at": 0.0, "recipient": "x@dest.test", "member": "a", "reply": DEFER}]
    messages = [{"id": "m1", "age_s": 90.0, "sender": "", "recipients": [recipient]}]
    out = io.StringIO()
    console = Console(file=out, width=200)
    for table in (
        queue_table(summary),
        messages_table(messages),
        recipients_table([recipient]),
        attempts_table(attempts),
    ):
        console.print(table)
    text = out.getvalue()
    assert "queue: 3 recipients, oldest 2h 1m" in text
    assert "desthost" in text and DEFER in text and "<>" in text and "5m" in text
    assert "1970-01-01 00:00:00" in text


def test_the_tables_show_bracketed_text_as_it_is_not_as_markup() -> None:
    """A Subject, an address or a receiver's reply is text from outside: "[ticket #123]" stays, and
    "[/urgent]" (a closing tag to Rich) neither vanishes nor ends the command with a traceback."""
    subject = "[/urgent] invoice [ticket #123]"
    reply = "451 4.7.1 [mx1.example.net] [bold]try later[/bold]"
    recipient = {
        "address": "[who]@dest.test",
        "pool": "default",
        "state": "queued",
        "attempts": 1,
        "due_in_s": 60.0,
        "last_member": "[a]",
        "last_reply": reply,
    }
    summary = {
        "recipients": 1,
        "oldest_age_s": 60.0,
        "destinations": [
            {
                "pool": "default",
                "domain": "dest.test",
                "destination": "dest.test",
                "recipients": 1,
                "queued": 1,
                "leased": 0,
                "held": 0,
                "oldest_age_s": 60.0,
                "last_error": reply,
            }
        ],
    }
    tables = [
        fields_table("headers", [{"name": "Subject", "value": subject}]),
        messages_table([{"id": "m1", "age_s": 60.0, "sender": "[/x]@a.test", "recipients": [recipient]}]),
        recipients_table([recipient]),
        attempts_table([{"at": 0.0, "recipient": "[who]@dest.test", "member": "[a]", "reply": reply}]),
        queue_table(summary),
        top.queue_table(summary),
    ]

    def shown(*renderables: Any) -> str:
        out = io.StringIO()
        Console(file=out, width=400).print(*renderables)
        return out.getvalue()

    for table in tables[1:]:  # each with a reply in it
        assert "[mx1.example.net] [bold]try later[/bold]" in shown(table)
    text = shown(*tables)
    assert subject in text and "[/x]@a.test" in text and "[who]@dest.test" in text and "[a]" in text


async def test_on_a_terminal_the_summary_is_a_table_and_piped_it_is_json(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    cfg, _, _ = await started(tmp_path, upstream, [True])
    async with App(load_config(cfg), config_path=cfg) as app:
        await send(app.smtp_port, "m1", to=["x@dest.test"])
        await queued(app, 1)
        args = ["queue", "--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]
        on_terminal = await asyncio.to_thread(run_postmux, args, terminal=True)
        piped = await asyncio.to_thread(run_postmux, args, terminal=False)
    assert "queue: 1 recipient," in on_terminal and "dest.test" in on_terminal and DEFER[:20] in on_terminal
    assert json.loads(piped)["destinations"][0]["domain"] == "dest.test"


def run_postmux(args: list[str], *, terminal: bool) -> str:
    """`python -m postmux ARGS` as a process, its stdout a pseudo-terminal or a pipe; what it printed."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "COLUMNS": "160", "TERM": "xterm"}
    command = [sys.executable, "-m", "postmux", *args]
    if not terminal:
        done = subprocess.run(command, capture_output=True, env=env, timeout=60, check=True)
        return done.stdout.decode()
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, env=env)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    finally:
        os.close(leader)
    return out.decode("utf-8", "replace")
