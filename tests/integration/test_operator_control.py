"""An operator's controls say what they do and keep doing it: reload against what runs, drains that outlive a
restart, suspensions lifted by hand, member names that stay one name, 401s that name their scheme."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from typer.testing import CliRunner

from postmux.app import App
from postmux.cli import app as cli
from postmux.config import load_config
from tests.integration.test_control import TOKEN, admin, write_config
from tests.support import StartUpstream, Upstream, send, send_many, wait_until


def set_key(cfg: Path, old: str, new: str) -> None:
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))


def body(out: str) -> dict[str, Any]:
    """The CLI's JSON answer; the server's own log lines (same process, same stdout) may come before it."""
    start = out.index("{\n") if not out.startswith("{") else 0
    parsed: dict[str, Any] = json.loads(out[start:])
    return parsed


def cli_runner(app: App) -> object:
    url = ["--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]

    async def run(*args: str) -> tuple[int, str, str]:
        result = await asyncio.to_thread(CliRunner().invoke, cli, [*args, *url, "--json"])
        return result.exit_code, result.stdout, result.stderr

    return run


async def test_reload_judges_restart_only_keys_against_what_runs_not_against_the_last_file(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        set_key(cfg, 'hostname = "postmux.test"', 'hostname = "renamed.test"')
        assert app.control.reload().needs_restart == ["smtp.hostname"]
        # Nothing edited since: the file still differs from what runs.
        assert app.control.reload().needs_restart == ["smtp.hostname"]
        set_key(cfg, 'hostname = "renamed.test"', 'hostname = "other.test"')
        assert app.control.reload().needs_restart == ["smtp.hostname"]
        set_key(cfg, 'hostname = "other.test"', 'hostname = "postmux.test"')
        assert app.control.reload().needs_restart == []  # back to what runs: nothing to restart for
        # Every key of a section built once at start counts, not only a chosen few.
        set_key(cfg, "[spool]\n", "[spool]\ngroup_commit = false\n")
        set_key(cfg, f'admin_token = "{TOKEN}"', 'admin_token = "another-token-for-tests"')
        assert sorted(app.control.reload().needs_restart) == ["http.admin_token", "spool.group_commit"]
        assert app.settings.smtp.hostname == "postmux.test" and app.settings.spool.group_commit
        async with admin(app) as client:  # the running admin API keeps the token it started with
            assert (await client.get("/members")).status_code == 200


async def test_the_node_name_and_the_verp_domain_wait_for_a_restart_and_say_so(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """The node's name is in its leases and events from the start; the [verp] domain is the one the SMTP
    listener takes mail for, set at start. Reloaded live, return paths went out at a domain whose DSNs were
    refused as relaying, and a new name was ignored without a word (review2/config.md)."""
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    (tmp_path / "verp.key").write_text("a-secret-of-sixteen-octets-or-more")
    async with App(load_config(cfg), config_path=cfg) as app:
        name = app.node_name
        with cfg.open("a") as f:
            f.write('[node]\nname = "renamed"\n[verp]\ndomain = "bounces.postmux.test"\n')
            f.write(f'secret_file = "{tmp_path / "verp.key"}"\n')
        assert sorted(app.control.reload().needs_restart) == ["node.name", "verp.domain"]
        assert app.settings.verp.domain is None and app.settings.node.name == ""  # as it runs
        await send(app.smtp_port, "m1")
        await wait_until(lambda: len(a.received) == 1)
        assert a.received[0].sender == "app@example.com"  # no return path at a domain not taken
        assert app.node_name == name


async def test_a_drained_member_stays_drained_across_a_restart_until_it_is_enabled(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)], policy="round_robin")
    async with App(load_config(cfg), config_path=cfg) as app, admin(app) as client:
        assert (await client.post("/members/b/drain")).status_code == 200
    assert json.loads((tmp_path / "drained.json").read_text()) == {"drained": ["b"]}

    async with App(load_config(cfg), config_path=cfg) as app, admin(app) as client:
        states = {row["member"]: row["state"] for row in (await client.get("/members")).json()["members"]}
        assert states == {"a": "up", "b": "draining"}
        await send_many(app.smtp_port, [f"d{i}" for i in range(6)], concurrency=2)
        await wait_until(lambda: len(a.received) == 6)
        assert b.received == []
        # A reload that re-adds the member keeps it drained too.
        write_config(cfg, tmp_path, [("a", a.address, 1)], policy="round_robin")
        assert app.control.reload().ok
        write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)], policy="round_robin")
        assert app.control.reload().ok
        assert app.pools["default"].member("b").draining
        assert (await client.post("/members/b/enable")).status_code == 200

    async with App(load_config(cfg), config_path=cfg) as app:
        assert not app.pools["default"].member("b").draining
        await send_many(app.smtp_port, [f"e{i}" for i in range(4)], concurrency=1)
        await wait_until(lambda: len(a.received) + len(b.received) == 10)
        assert len(b.received) == 2


def answering_unusual_rate(flag: list[bool]) -> object:
    """Gmail's way of saying "stay away for a while" (4.7.28), while flag[0] is set."""

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return "421 4.7.28 unusual rate of unsolicited mail" if flag[0] else None

    return behaviour


async def test_resume_lifts_a_reactions_suspension_and_suspend_sets_one_by_hand(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    pushing_back = [True]
    a, b = await upstream("a", answering_unusual_rate(pushing_back)), await upstream("b")  # type: ignore[arg-type]
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1)], policy="round_robin")
    async with App(load_config(cfg), config_path=cfg) as app:
        run = cli_runner(app)
        await send_many(app.smtp_port, [f"s{i}" for i in range(4)], concurrency=1)
        await wait_until(lambda: len(b.received) == 4)  # a suspended itself away (900 s by default)
        lane = app.dispatcher.shaper.lanes[("default", "a", "dest.test")]
        assert lane.suspended_until > app.clock() + 800
        pushing_back[0] = False

        code, out, _ = await run("resume", "a", "--destination", "dest.test")  # type: ignore[operator]
        assert code == 0, out
        [lifted] = body(out)["lanes"]
        assert lifted["state"] == "open" and lifted["last_change"] == "suspension lifted by operator"
        await send_many(app.smtp_port, [f"r{i}" for i in range(4)], concurrency=1)
        await wait_until(lambda: len(a.received) + len(b.received) == 8)
        assert len(a.received) == 2  # round robin again

        code, out, _ = await run("suspend", "a", "-d", "dest.test", "--for", "10m")  # type: ignore[operator]
        assert code == 0 and body(out)["lanes"][0]["state"] == "suspended", out
        await send_many(app.smtp_port, [f"h{i}" for i in range(4)], concurrency=1)
        await wait_until(lambda: len(b.received) == 10)
        assert len(a.received) == 2
        code, out, _ = await run("resume", "a")  # type: ignore[operator]
        assert code == 0 and [x["destination"] for x in body(out)["lanes"]] == ["dest.test"]
        code, out, _ = await run("resume", "a")  # type: ignore[operator]
        assert code == 0 and body(out)["lanes"] == []  # nothing left to lift

        for verb in (["resume", "nobody"], ["suspend", "nobody", "-d", "dest.test"]):
            code, _, err = await run(*verb)  # type: ignore[operator]
            assert code == 1 and "404: no member named 'nobody'" in err
        code, _, err = await run("suspend", "a", "-d", "dest.test", "--for", "soon")  # type: ignore[operator]
        assert code == 1 and "400: duration: 'soon' is not a duration" in err
        # A destination is the lane mail goes by: gmail.com's is google's; a misspelt provider is no lane.
        code, _, err = await run("suspend", "a", "-d", "gogle")  # type: ignore[operator]
        assert code == 1 and "400: destination: 'gogle' is no provider" in err, err
        code, out, _ = await run("suspend", "a", "-d", "Gmail.com", "--for", "1m")  # type: ignore[operator]
        assert code == 0 and [x["destination"] for x in body(out)["lanes"]] == ["google"], out
        code, out, _ = await run("resume", "a", "-d", "gmail.com")  # type: ignore[operator]
        assert code == 0 and [x["destination"] for x in body(out)["lanes"]] == ["google"], out
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    by_hand = [e["tags"]["change"] for e in events if e["type"] == "ShapingChanged" and e["tags"].get("by")]
    assert by_hand == [
        "suspension lifted by operator",
        "suspended for 600s by operator",
        "suspension lifted by operator",
        "suspended for 60s by operator",
        "suspension lifted by operator",
    ]


async def test_a_member_name_is_one_path_segment_whatever_it_holds(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a, b, edge = await upstream("a"), await upstream("b"), await upstream("edge")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1), ("b", b.address, 1), ("edge/1 ?x#y", edge.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        run = cli_runner(app)
        pool = app.pools["default"]
        pool.member("b").draining = True
        for name in ("b/enable?", "b/enable", "b%2Fenable", "../b/enable", "b/../a/drain"):
            code, _, err = await run("drain", name)  # type: ignore[operator]
            assert code == 1 and f"404: no member named {name!r}" in err, (name, err)
        assert pool.member("b").draining and not pool.member("a").draining
        code, out, _ = await run("drain", "edge/1 ?x#y")  # type: ignore[operator]
        assert code == 0 and body(out)["members"][0]["member"] == "edge/1 ?x#y"
        assert pool.member("edge/1 ?x#y").draining
        await send(app.smtp_port, "still-flows")
        await wait_until(lambda: len(a.received) == 1)


async def test_a_401_names_the_bearer_scheme_in_www_authenticate(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        async with admin(app, token=None) as client:
            response = await client.get("/members")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer realm="postmux"'
        async with admin(app, token="wrong-token-wrong-token") as client:
            response = await client.post("/reload")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer realm="postmux", error="invalid_token"'
        async with admin(app) as client:
            assert "www-authenticate" not in (await client.get("/members")).headers


async def test_an_admin_verb_reaches_the_node_named_by_a_file_with_errors_elsewhere(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Only [http] is needed to reach the node: a file being edited (an error in another table) made
    every verb given -c refuse, reload included; now the errors are said and the node is reached."""
    a = await upstream("a")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    async with App(load_config(cfg), config_path=cfg) as app:
        editing = tmp_path / "editing.toml"
        editing.write_text(
            f'[http]\nlisten = "127.0.0.1:{app.http_port}"\nadmin_token = "{TOKEN}"\n[retry]\nbogus = 1\n'
        )
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["members", "-c", str(editing), "--json"])
        assert result.exit_code == 0, result.output
        assert [m["member"] for m in json.loads(result.stdout)["members"]] == ["a"]
        assert "retry.bogus" in result.stderr and "[http] table to reach the node" in result.stderr
        editing.write_text("[http\n")  # not even [http] can be read: the file's errors, exit 2
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["members", "-c", str(editing)])
        assert result.exit_code == 2 and "(syntax)" in result.stderr
