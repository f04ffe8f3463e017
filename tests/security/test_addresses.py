"""Address hygiene: paths that ask for relay tricks or break RFC 5321's limits are refused at MAIL or RCPT."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored

LONG_LOCAL = "l" * 65
LONG_DOMAIN = ".".join(["d" * 63] * 4) + ".test"  # 261 octets


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        ("<@a.test,@b.test:user@dest.test>", "553 5.1.3 <user@dest.test>: source routes"),
        ("<user%other.test@dest.test>", "553 5.1.3 <user%other.test@dest.test>: percent-hack routing"),
        ("<other.test!user>", "553 5.1.3 <other.test!user>: bang paths"),
        ("<other.test!user@dest.test>", "553 5.1.3 <other.test!user@dest.test>: bang paths"),
        ("<postmaster>", "553 5.1.3 <postmaster>: a recipient address needs a domain"),
        (f"<{LONG_LOCAL}@dest.test>", "553 5.1.3 Local part longer than 64 octets (RFC 5321 4.5.3.1.1)"),
        (f"<u@{LONG_DOMAIN}>", "553 5.1.3 Domain longer than 255 octets (RFC 5321 4.5.3.1.2)"),
    ],
    ids=["source-route", "percent-hack", "bang", "bang-at", "no-domain", "long-local", "long-domain"],
)
async def test_recipient_is_refused(gateway: StartGateway, tmp_path: Path, rcpt: str, expected: str) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd(f"RCPT TO:{rcpt}")).startswith(expected)
    # Nothing was added: DATA has no recipient to go to.
    assert (await client.cmd("DATA")).startswith("503 5.5.1")
    await client.close()
    assert stored(tmp_path) == 0


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("<@a.test:app@example.com>", "553 5.1.7 <app@example.com>: source routes"),
        (f"<{LONG_LOCAL}@example.com>", "553 5.1.7 Local part longer than 64 octets"),
        (f"<app@{LONG_DOMAIN}>", "553 5.1.7 Domain longer than 255 octets"),
    ],
    ids=["source-route", "long-local", "long-domain"],
)
async def test_sender_is_refused(gateway: StartGateway, sender: str, expected: str) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd(f"MAIL FROM:{sender}")).startswith(expected)
    assert (await client.cmd("RCPT TO:<u@dest.test>")).startswith("503 5.5.1")
    await client.close()


async def test_limits_themselves_and_the_null_sender_are_accepted(gateway: StartGateway) -> None:
    app = await gateway()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<>")).startswith("250")
    domain = ".".join(["d" * 63] * 3) + "." + "e" * 58 + ".test"
    assert len(domain) == 255
    assert (await client.cmd(f"RCPT TO:<{'l' * 64}@{domain}>")).startswith("250")
    await client.close()
