"""DMARC alignment at accept on a running `postmux serve` ([dmarc]): over real SMTP, warn takes misaligned
mail and tags its Reception events; refuse answers 550 5.7.26 with the reason at the end of DATA (through
an ingress worker process) and the HTTP API 422, storing nothing; aligned mail (by the DKIM signing domain,
or by the MAIL FROM domain in relaxed mode) passes both untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from postmux.dkim import generate_key
from postmux.passwords import hash_password
from tests.e2e.test_serve import Serve
from tests.e2e.test_serve import serve as serve  # the fixture
from tests.support import StartUpstream, read_events, wait_until

API_KEY = "dmarc-" + "k" * 26

# (name, MAIL FROM, From:, aligned?) against a [[dkim]] entry for example.test.
CASES = [
    ("by-dkim", "bounces@esp.test", "News <news@example.test>", True),
    ("by-dkim-relaxed", "bounces@esp.test", "news@mail.example.test", True),
    ("by-mail-from", "bounces@spf.test", "news@mail.spf.test", True),
    ("misaligned", "app@example.test", "CEO <ceo@bank.test>", False),
    ("no-from", "app@example.test", "", False),
]


def config(tmp_path: Path, member: str, alignment: str, workers: int) -> Path:
    pem, _ = generate_key("rsa-sha256")
    key = tmp_path / f"dkim-{alignment}.key"
    key.write_bytes(pem)
    cfg = tmp_path / f"postmux-{alignment}.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.test"
workers = {workers}
[http]
listen = "127.0.0.1:0"
[spool]
path = "{tmp_path / f"spool-{alignment}.db"}"
[events]
log = "{tmp_path / f"events-{alignment}.jsonl"}"
[[pool]]
name = "default"
members = [{{ name = "a", address = "{member}" }}]
[[dkim]]
domain = "example.test"
subdomains = true  # mail.example.test is signed d=example.test: relaxed alignment
selectors = [{{ name = "s1", key_file = "{key}" }}]
[dmarc]
alignment = "{alignment}"
[[api_key]]
name = "app"
hash = "{hash_password(API_KEY, n=16)}"
"""
    )
    return cfg


def text(name: str, author: str) -> bytes:
    head = f"From: {author}\r\n" if author else ""
    return (
        f"{head}To: user@dest.test\r\nSubject: {name}\r\nX-Test-Id: {name}\r\nMessage-ID: <{name}@test>\r\n"
        "\r\nhello\r\n"
    ).encode()


async def submit(port: int, name: str, sender: str, author: str) -> tuple[int, str]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.test", start_tls=False)
    await client.connect()
    try:
        response = await client.sendmail(sender, ["user@dest.test"], text(name, author))
        return 250, response[1]
    except aiosmtplib.SMTPDataError as e:
        return e.code, e.message
    finally:
        client.close()


@pytest.mark.slow
async def test_warn_takes_misaligned_mail_and_tags_its_reception(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    up = await upstream("up")
    node = await serve(config(tmp_path, up.address, "warn", workers=0)).launch()
    port = await node.started()
    for name, sender, author, _ in CASES:
        code, reply = await submit(port, name, sender, author)
        assert code == 250, (name, reply)
    await wait_until(lambda: len(up.received) == len(CASES), timeout=20)
    log = tmp_path / "events-warn.jsonl"
    await wait_until(lambda: len([e for e in read_events(log) if e["type"] == "Reception"]) == len(CASES))
    tags = {e["message_id"]: e["tags"] for e in read_events(log) if e["type"] == "Reception"}
    for name, _, _, ok in CASES:
        assert ("dmarc" not in tags[f"{name}@test"]) == ok, (name, tags[f"{name}@test"])
    assert tags["misaligned@test"] == {
        "dmarc": "fail",
        "dmarc_reason": "From: domain bank.test aligns with neither a DKIM signature (no [[dkim]] entry signs"
        " it) nor MAIL FROM domain example.test (relaxed) (RFC 7489 3.1)",
    }
    assert (
        tags["no-from@test"]["dmarc_reason"] == "the message has no From: field (RFC 5322 3.6 requires one)"
    )


@pytest.mark.slow
async def test_refuse_answers_550_with_the_reason_and_the_api_422_storing_nothing(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    up = await upstream("up")
    node = await serve(config(tmp_path, up.address, "refuse", workers=1)).launch()
    port = await node.started()
    http_port = int(node.output.split("http on port ", 1)[1].split()[0].rstrip(","))
    answers = {name: await submit(port, name, sender, author) for name, sender, author, _ in CASES}
    for name, _, _, ok in CASES:
        assert (answers[name][0] == 250) == ok, (name, answers[name])
    assert answers["misaligned"] == (
        550,
        "5.7.26 DMARC alignment: From: domain bank.test aligns with neither a DKIM signature (no [[dkim]]"
        " entry signs it) nor MAIL FROM domain example.test (relaxed) (RFC 7489 3.1)",
    )
    assert answers["no-from"] == (
        550,
        "5.7.26 DMARC alignment: the message has no From: field (RFC 5322 3.6 requires one)",
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {API_KEY}"}
    ) as client:
        body = {
            "envelope_sender": "app@example.test",
            "recipients": [{"email": "user@dest.test"}],
            "content": {"from": {"email": "ceo@bank.test"}, "subject": "api", "text_body": "hi\n"},
        }
        refused = await client.post("/api/v1/messages", json=body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "content"
        assert refused.json()["error"].startswith("content: DMARC alignment: From: domain bank.test aligns")
        body["content"]["from"] = {"email": "news@example.test"}  # type: ignore[index]
        assert (await client.post("/api/v1/messages", json=body)).status_code == 202
    aligned = {name for name, _, _, ok in CASES if ok}
    await wait_until(lambda: len(up.received) == len(aligned) + 1, timeout=20)
    assert {r.test_id for r in up.received} == aligned | {""}
    log = tmp_path / "events-refuse.jsonl"
    await wait_until(
        lambda: len([e for e in read_events(log) if e["type"] == "Reception"]) == len(aligned) + 1
    )
    assert all("dmarc" not in e["tags"] for e in read_events(log))
