"""STARTTLS on ingress (RFC 3207): offered, optionally required, immune to plaintext injection."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from postmux.config import ConfigError
from tests.security.client import RawClient
from tests.security.conftest import StartGateway, stored
from tests.support import Upstream, make_settings, wait_until


async def test_starttls_is_offered_and_the_client_must_ehlo_again(
    gateway: StartGateway, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    app = await gateway(tls=tls_files)
    client = await RawClient.connect(app.smtp_port)
    assert "250-STARTTLS" in await client.cmd("EHLO client.test")
    assert await client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    await client.start_tls(client_tls)
    # RFC 3207 4.2: all knowledge from before TLS is discarded, the EHLO included.
    assert await client.cmd("MAIL FROM:<app@example.com>") == "503 5.5.1 Error: send HELO first"
    ehlo = await client.cmd("EHLO client.test")
    assert "STARTTLS" not in ehlo
    assert await client.cmd("STARTTLS") == "503 5.5.1 TLS already active"
    assert (await client.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    assert (await client.cmd("RCPT TO:<user@dest.test>")).startswith("250")
    await client.cmd("DATA")
    assert (await client.cmd(b"X-Test-Id: tls\r\n\r\nsecret\r\n.\r\n")).startswith("250 2.0.0")
    await client.close()
    up: Upstream = app.upstream  # type: ignore[attr-defined]
    await wait_until(lambda: len(up.received) == 1)
    assert b"with ESMTPS id" in up.received[0].data  # RFC 3848


async def test_plaintext_pipelined_behind_starttls_is_discarded(
    gateway: StartGateway, tls_files: dict[str, str], client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    """CVE-2011-0411: commands sent in clear in the same packet as STARTTLS must not run inside TLS."""
    app = await gateway(tls=tls_files)
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    await client.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@dest.test>\r\n")
    assert await client.reply() == "220 2.0.0 Ready to start TLS"
    await client.start_tls(client_tls)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    assert await client.cmd("RCPT TO:<user@dest.test>") == "503 5.5.1 Error: need MAIL command"
    assert await client.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
    await client.close()
    assert stored(tmp_path) == 0


async def test_required_tls_refuses_mail_before_starttls(
    gateway: StartGateway, tls_files: dict[str, str], client_tls: ssl.SSLContext
) -> None:
    app = await gateway(tls={**tls_files, "required": True})
    client = await RawClient.connect(app.smtp_port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("MAIL FROM:<app@example.com>") == "530 5.7.0 Must issue a STARTTLS command first"
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    await client.cmd("STARTTLS")
    await client.start_tls(client_tls)
    await client.ehlo_mail_rcpt()
    await client.close()


def test_missing_certificate_file_is_a_config_error(tmp_path: Path, tls_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(
            tmp_path,
            [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:1"}]}],
            smtp={"tls": {**tls_files, "cert_file": str(tmp_path / "nope.pem")}},
        )
    assert caught.value.problems == [
        ("smtp.tls.cert_file", f"'{tmp_path / 'nope.pem'}' is not a readable file")
    ]


@pytest.mark.parametrize("fault", ["not PEM", "another key"])
def test_a_certificate_and_key_that_do_not_load_are_a_config_error_naming_both(
    tmp_path: Path, tls_files: dict[str, str], fault: str
) -> None:
    """Loaded at check-config as the listener loads them: garbage passed the check, then `serve` refused
    with an OpenSSL code naming no file."""
    bad = tmp_path / "bad.pem"
    if fault == "not PEM":
        bad.write_text("garbage\n")
        files = {"cert_file": str(bad), "key_file": str(bad)}
    else:  # a key that is not the certificate's
        subprocess.run(
            ["openssl", "genrsa", "-out", str(bad), "2048"], check=True, capture_output=True, timeout=60
        )
        files = {**tls_files, "key_file": str(bad)}
    with pytest.raises(ConfigError) as caught:
        make_settings(
            tmp_path,
            [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:1"}]}],
            smtp={"tls": files},
        )
    [(key, reason)] = caught.value.problems
    assert key == "smtp.tls" and files["cert_file"] in reason and files["key_file"] in reason, reason
