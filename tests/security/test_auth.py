"""SMTP AUTH (RFC 4954): PLAIN and LOGIN against scrypt hashes; relay only for trusted or logged-in ones."""

from __future__ import annotations

import base64
import ssl
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postmux.cli import app as cli
from postmux.envelope import Envelope
from postmux.passwords import hash_password, verify_password
from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import Upstream, wait_until

# Cheap hashes keep the tests fast; the cost is read from the hash, so the code path is the real one.
USERS = [{"name": "billing", "password_hash": hash_password("s3cret", n=2**10)}]
UNTRUSTED = ["192.0.2.0/24"]  # the test client (127.0.0.1) is not in it: it may relay only after AUTH
INVALID = "535 5.7.8 Authentication credentials invalid"


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_passwd_prints_a_hash_of_the_password_read_from_stdin() -> None:
    result = CliRunner().invoke(cli, ["passwd"], input="correct horse\n")
    assert result.exit_code == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("$scrypt$n=32768,r=8,p=1$")
    assert verify_password(b"correct horse", encoded) and not verify_password(b"wrong", encoded)
    # The password is never an argument (it would show in `ps` and shell history).
    assert CliRunner().invoke(cli, ["passwd", "correct horse"]).exit_code == 2


async def test_auth_is_not_offered_or_accepted_in_clear_by_default(gateway: StartGateway) -> None:
    app = await gateway(users=USERS)
    client = await RawClient.connect(app.smtp_port)
    assert "AUTH" not in await client.cmd("EHLO client.test")
    reply = await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret')}")
    assert reply == "538 5.7.11 Encryption required for requested authentication mechanism"
    await client.close()


async def test_auth_plain_inside_tls_lets_an_untrusted_client_relay(
    gateway: StartGateway, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    app = await gateway(users=USERS, tls=tls_files, trusted_networks=UNTRUSTED)
    seen: list[Envelope] = []
    accept = app.acceptor.accept

    async def spy(envelope: Envelope) -> str:
        seen.append(envelope)
        return await accept(envelope)

    app.acceptor.accept = spy  # type: ignore[method-assign]
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.cmd("STARTTLS")
    await client.start_tls(client_tls)
    assert "250-AUTH LOGIN PLAIN" in await client.cmd("EHLO client.test")
    assert (
        await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret')}") == "235 2.7.0 Authentication successful"
    )
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    await client.cmd("DATA")
    assert (await client.cmd(b"X-Test-Id: authed\r\n\r\nhi\r\n.\r\n")).startswith("250 2.0.0")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    assert b"with ESMTPSA id" in up.received[0].data  # RFC 3848
    assert [e.auth_user for e in seen] == ["billing"]


async def test_auth_login_when_clear_text_is_allowed(gateway: StartGateway) -> None:
    app = await gateway(users=USERS, auth_require_tls=False, trusted_networks=UNTRUSTED)
    client = await RawClient.connect(app.smtp_port)
    assert "250-AUTH LOGIN PLAIN" in await client.cmd("EHLO client.test")
    assert await client.cmd("AUTH LOGIN") == "334 " + b64("User Name\0")
    assert await client.cmd(b64("billing")) == "334 " + b64("Password\0")
    assert await client.cmd(b64("s3cret")) == "235 2.7.0 Authentication successful"
    assert await client.cmd("AUTH LOGIN") == "503 5.5.1 Already authenticated"
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    await client.close()


async def test_auth_in_the_middle_of_a_transaction_is_refused(gateway: StartGateway) -> None:
    """RFC 4954 4: an AUTH during a mail transaction MUST be rejected with a 503; after RSET it may come."""
    app = await gateway(users=USERS, auth_require_tls=False, trusted_networks=UNTRUSTED)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert await client.cmd("AUTH PLAIN " + plain("billing", "s3cret")) == (
        "503 5.5.1 Error: MAIL transaction in progress"
    )
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("554 5.7.1")  # still not logged in
    assert (await client.cmd("RSET")).startswith("250")
    reply = await client.cmd("AUTH PLAIN " + plain("billing", "s3cret"))
    assert reply == "235 2.7.0 Authentication successful"
    await client.close()


async def test_wrong_password_is_refused_after_the_delay_and_relay_stays_closed(
    gateway: StartGateway, tmp_path: Path
) -> None:
    app = await gateway(
        users=USERS, auth_require_tls=False, trusted_networks=UNTRUSTED, auth_failure_delay=0.3
    )
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    started = time.monotonic()
    assert await client.cmd(f"AUTH PLAIN {plain('billing', 'guess')}") == INVALID
    assert time.monotonic() - started >= 0.3
    await client.cmd("MAIL FROM:<app@example.com>")
    assert await client.cmd("RCPT TO:<user@dest.test>") == "554 5.7.1 <user@dest.test>: Relay access denied"
    await client.close()
    assert stored(tmp_path) == 0


async def test_plain_with_the_user_itself_as_authorization_identity_logs_in(gateway: StartGateway) -> None:
    """RFC 4616 2: an authzid the client may act as (here: the authcid itself) is fine."""
    app = await gateway(users=USERS, auth_require_tls=False, trusted_networks=UNTRUSTED)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("AUTH PLAIN") == "334 "  # and the same exchange with the response asked for
    assert await client.cmd(plain("billing", "s3cret", authzid="billing")) == (
        "235 2.7.0 Authentication successful"
    )
    await client.cmd("MAIL FROM:<app@example.com>")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    await client.close()


@pytest.mark.parametrize("authzid", ["postmaster", "billing2", "Billing", "billing\u00a0"])
async def test_plain_with_another_authorization_identity_fails_as_a_wrong_password_does(
    gateway: StartGateway, tmp_path: Path, authzid: str
) -> None:
    """RFC 4616 2: "If the authorization identity (authzid) is provided and the client is not permitted
    to act as it, the server MUST fail the exchange." postmux lets no user act as another; it logged the
    client in as the authcid whatever the authzid said. Now: 535 after the delay, and it counts."""
    app = await gateway(
        users=USERS,
        auth_require_tls=False,
        trusted_networks=UNTRUSTED,
        auth_failure_delay=0.3,
        max_auth_failures=2,
    )
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    started = time.monotonic()
    assert await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret', authzid=authzid)}") == INVALID
    assert time.monotonic() - started >= 0.3
    await client.cmd("MAIL FROM:<app@example.com>")
    assert await client.cmd("RCPT TO:<user@dest.test>") == "554 5.7.1 <user@dest.test>: Relay access denied"
    assert (await client.cmd("RSET")).startswith("250")
    # The same in the exchange's second step; and it is the connection's second failure (max 2).
    assert await client.cmd("AUTH PLAIN") == "334 "
    assert await client.cmd(plain("billing", "s3cret", authzid=authzid)) == INVALID
    assert await client.reply() == "421 4.7.0 postmux.test Error: too many failed authentications"
    assert await client.closed()
    await client.close()
    assert stored(tmp_path) == 0


async def test_a_refused_authorization_identity_counts_against_the_address_budget(
    gateway: StartGateway,
) -> None:
    app = await gateway(
        users=USERS, auth_require_tls=False, auth_failure_delay=0, max_auth_failures_per_address=1
    )
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret', authzid='root')}") == INVALID
    await client.close()
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    reply = await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret')}")
    assert reply == (
        "421 4.7.0 postmux.test Error: too many failed authentications from your address, try again later"
    )
    await client.close()


async def test_unknown_user_gets_the_same_answer(gateway: StartGateway) -> None:
    app = await gateway(users=USERS, auth_require_tls=False, auth_failure_delay=0)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd(f"AUTH PLAIN {plain('nobody', 's3cret')}") == INVALID
    await client.close()


async def test_repeated_failures_close_the_connection(gateway: StartGateway) -> None:
    app = await gateway(users=USERS, auth_require_tls=False, auth_failure_delay=0, max_auth_failures=2)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd(f"AUTH PLAIN {plain('billing', 'one')}") == INVALID
    assert await client.cmd(f"AUTH PLAIN {plain('billing', 'two')}") == INVALID
    assert await client.reply() == "421 4.7.0 postmux.test Error: too many failed authentications"
    assert await client.closed()
    await client.close()


async def test_malformed_exchange_gets_one_reply(gateway: StartGateway) -> None:
    app = await gateway(users=USERS, auth_require_tls=False, auth_failure_delay=0)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("AUTH PLAIN !!!") == "501 5.5.2 Can't decode base64"
    assert await client.cmd("AUTH PLAIN") == "334 "
    assert await client.cmd("*") == "501 5.7.0 Auth aborted"
    assert await client.cmd("NOOP") == "250 2.0.0 OK"  # no second, stray reply to the aborted exchange
    await client.close()


@pytest.mark.parametrize("require_tls", [False, True])
async def test_without_users_auth_is_not_offered(gateway: StartGateway, require_tls: bool) -> None:
    app = await gateway(auth_require_tls=require_tls)
    client = await RawClient.connect(app.smtp_port)
    assert "AUTH" not in await client.cmd("EHLO client.test")
    reply = await client.cmd(f"AUTH PLAIN {plain('billing', 's3cret')}")
    assert reply == "503 5.5.1 Error: authentication not enabled"  # not 538: no TLS would help
    await client.close()
