"""STARTTLS toward members (RFC 3207): each `tls` mode against real aiosmtpd upstreams and trustme certs.

A failed requirement is a transient 451 with 4.7.4 (not offered) or 4.7.5 (handshake or certificate), as
Postfix words them; nothing reaches the upstream, and a member that meets it hands the mail to another.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from rich.console import Console

from postmux.admin.client import members_table
from postmux.app import App
from postmux.config import ConfigError
from tests.dns_server import LoopbackDns
from tests.support import StartUpstream, Upstream, make_settings, read_events, send, wait_until


def server_tls(ca: trustme.CA, name: str = "relay.test") -> ssl.SSLContext:
    """A server context with a certificate for `name` issued by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def broken_tls() -> ssl.SSLContext:
    """A server context without a certificate: STARTTLS gets its 220, then every handshake fails."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "members-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def pool(*members: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "default", "members": list(members), "health": {"consecutive_failures": 1000}}]


def events(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == kind]


async def deliver_one(tmp_path: Path, up: Upstream, **member: Any) -> dict[str, Any]:
    """Send one message through a postmux whose one member is `up`; returns its Delivery event."""
    settings = make_settings(tmp_path, pool({"name": "m", "address": up.address, **member}))
    async with App(settings) as app:
        await send(app.smtp_port, "t1")
        await wait_until(lambda: len(up.received) == 1)
        await wait_until(lambda: bool(events(tmp_path, "Delivery")))
        described = app.control.members()[0]
    (delivery,) = events(tmp_path, "Delivery")
    return {"event": delivery, "member": described}


async def defer_one(tmp_path: Path, up: Upstream, **member: Any) -> dict[str, Any]:
    """Send one message that the member cannot deliver; returns its first TransientFailure reply."""
    settings = make_settings(tmp_path, pool({"name": "m", "address": up.address, **member}))
    async with App(settings) as app:
        await send(app.smtp_port, "t1")
        await wait_until(lambda: bool(events(tmp_path, "TransientFailure")))
    assert up.received == []
    response: dict[str, Any] = events(tmp_path, "TransientFailure")[0]["response"]
    return response


# -- opportunistic (the default) -------------------------------------------------------------------


async def test_opportunistic_encrypts_when_offered_without_checking_the_certificate(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    # A certificate from a CA nobody trusts, for another name: "may" encrypts all the same.
    up = await upstream("up", tls=server_tls(trustme.CA(), "elsewhere.test"))
    seen = await deliver_one(tmp_path, up)
    assert up.received[0].tls
    assert seen["event"]["tags"]["tls"].startswith("TLSv1.")
    assert seen["member"]["tls_mode"] == "opportunistic"
    assert seen["member"]["tls"] == seen["event"]["tags"]["tls"]


async def test_opportunistic_delivers_in_plaintext_when_starttls_is_not_offered(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    seen = await deliver_one(tmp_path, up)
    assert not up.received[0].tls
    assert seen["event"]["tags"] == {"tls": "none"}


async def test_opportunistic_falls_back_to_plaintext_when_the_handshake_fails(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up", tls=broken_tls())
    seen = await deliver_one(tmp_path, up)
    assert not up.received[0].tls
    assert seen["event"]["tags"] == {"tls": "none"}
    # Postfix's "may": the failed handshake's connection is dropped and a plaintext one carries the mail.
    assert up.connections == 2
    assert events(tmp_path, "TransientFailure") == []


# -- required --------------------------------------------------------------------------------------


async def test_required_encrypts_without_checking_the_certificate(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up", tls=server_tls(trustme.CA(), "elsewhere.test"))
    seen = await deliver_one(tmp_path, up, tls="required")
    assert up.received[0].tls and seen["event"]["tags"]["tls"].startswith("TLSv1.")


async def test_required_defers_with_4_7_4_when_starttls_is_not_offered(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up")
    response = await defer_one(tmp_path, up, tls="required")
    assert (response["code"], response["enhanced_code"]) == (451, "4.7.4")
    assert response["text"] == f"TLS is required, but {up.address} does not offer STARTTLS"
    assert up.data_commands == 0


async def test_required_defers_with_4_7_5_when_the_handshake_fails(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up", tls=broken_tls())
    response = await defer_one(tmp_path, up, tls="required")
    assert (response["code"], response["enhanced_code"]) == (451, "4.7.5")
    assert response["text"].startswith(f"TLS handshake with {up.address} failed")


async def test_a_member_without_the_required_tls_hands_its_mail_to_one_with_it(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    plain = await upstream("plain")
    secure = await upstream("secure", tls=server_tls(ca))
    members = [
        {"name": "plain", "address": plain.address, "tls": "required"},
        {"name": "secure", "address": secure.address, "tls": "required"},
    ]
    async with App(make_settings(tmp_path, pool(*members))) as app:
        for i in range(6):
            await send(app.smtp_port, f"r{i}")
        await wait_until(lambda: len(secure.received) == 6)
    assert plain.data_commands == 0 and all(r.tls for r in secure.received)
    refused = events(tmp_path, "TransientFailure")
    assert refused and {e["member"] for e in refused} == {"plain"}
    assert {e["response"]["enhanced_code"] for e in refused} == {"4.7.4"}


# -- verify ----------------------------------------------------------------------------------------


async def test_verify_delivers_when_the_chain_and_the_name_check_out(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca, "relay.test"))
    seen = await deliver_one(
        tmp_path, up, tls="verify", tls_ca_file=ca_file(ca, tmp_path), tls_server_name="relay.test"
    )
    assert up.received[0].tls
    assert seen["member"]["tls_mode"] == "verify"


async def test_verify_checks_the_relay_host_when_no_server_name_is_given(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    # The member's address is 127.0.0.1: a certificate for that IP passes, one for a name would not.
    up = await upstream("up", tls=server_tls(ca, "127.0.0.1"))
    await deliver_one(tmp_path, up, tls="verify", tls_ca_file=ca_file(ca, tmp_path))
    assert up.received[0].tls


async def test_verify_refuses_a_certificate_from_an_untrusted_ca(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(trustme.CA(), "relay.test"))
    response = await defer_one(
        tmp_path, up, tls="verify", tls_ca_file=ca_file(ca, tmp_path), tls_server_name="relay.test"
    )
    assert (response["code"], response["enhanced_code"]) == (451, "4.7.5")
    assert response["text"].startswith(f"server certificate not verified ({up.address})")
    assert "unable to get local issuer certificate" in response["text"]


async def test_verify_refuses_a_certificate_for_another_name(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca, "impostor.test"))
    response = await defer_one(
        tmp_path, up, tls="verify", tls_ca_file=ca_file(ca, tmp_path), tls_server_name="relay.test"
    )
    assert (response["code"], response["enhanced_code"]) == (451, "4.7.5")
    assert "Hostname mismatch" in response["text"]


async def test_verify_without_a_ca_file_uses_the_system_cas_and_so_refuses_a_private_ca(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca, "relay.test"))
    response = await defer_one(tmp_path, up, tls="verify", tls_server_name="relay.test")
    assert response["enhanced_code"] == "4.7.5"


# -- none ------------------------------------------------------------------------------------------


async def test_none_never_starts_tls_even_when_offered(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca))
    seen = await deliver_one(tmp_path, up, tls="none")
    assert not up.received[0].tls and seen["event"]["tags"] == {"tls": "none"}


# -- SMTP AUTH toward a relay ----------------------------------------------------------------------


async def test_credentials_log_in_inside_tls(tmp_path: Path, upstream: StartUpstream, ca: trustme.CA) -> None:
    up = await upstream("up", tls=server_tls(ca), users={"postmux": "s3cret"})
    seen = await deliver_one(tmp_path, up, username="postmux", password="s3cret")
    assert up.received[0].tls and up.received[0].user == "postmux"
    assert seen["member"]["tls_mode"] == "required"  # credentials make TLS required by default


async def test_wrong_credentials_defer_with_4_7_8(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca), users={"postmux": "s3cret"})
    response = await defer_one(tmp_path, up, username="postmux", password="wrong")
    assert (response["code"], response["enhanced_code"]) == (451, "4.7.8"), response
    assert response["text"].startswith(f"authentication to {up.address} failed: 535")


async def test_credentials_never_cross_in_clear_when_the_relay_offers_no_tls(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    # This relay would take AUTH in plaintext; postmux must not offer it the password.
    up = await upstream("up", users={"postmux": "s3cret"}, auth_require_tls=False)
    response = await defer_one(tmp_path, up, username="postmux", password="s3cret")
    assert response["enhanced_code"] == "4.7.4"
    assert up.logins == 0


async def test_tls_none_with_credentials_logs_in_in_clear_as_asked(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("up", users={"postmux": "s3cret"}, auth_require_tls=False)
    await deliver_one(tmp_path, up, tls="none", username="postmux", password="s3cret")
    assert not up.received[0].tls and up.received[0].user == "postmux"


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (
            {"username": "u", "password": "p", "tls": "opportunistic"},
            'a member with a username needs tls = "required" or "verify" (or "none" to send the password '
            "in clear on a private network)",
        ),
        ({"username": "u"}, "username and password go together"),
        ({"tls_server_name": "relay.test"}, 'tls_ca_file and tls_server_name apply only with tls = "verify"'),
        (
            {"tls": "verify", "tls_ca_file": "/nonexistent/ca.pem"},
            "'/nonexistent/ca.pem' is not a readable file",
        ),
        ({"tls": "sometimes"}, "Input should be 'none', 'opportunistic', 'required' or 'verify'"),
    ],
)
def test_member_tls_config_errors_name_the_key(tmp_path: Path, member: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(tmp_path, pool({"name": "m", "address": "127.0.0.1:25", **member}))
    assert [reason for _, reason in caught.value.problems] == [problem]


def test_the_password_never_shows_in_a_repr(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, pool({"name": "m", "address": "127.0.0.1:25", "username": "u", "password": "hunter2"})
    )
    assert "hunter2" not in repr(settings)


# -- source members: the MX host's own name --------------------------------------------------------

SOURCES = [
    {"name": "ip2", "kind": "source", "source_address": "127.0.0.2"},
    {"name": "ip3", "kind": "source", "source_address": "127.0.0.3"},
]
ZONE = """
tls.test.      300 IN MX 10 mx.tls.test.
mx.tls.test.   300 IN A 127.0.0.21
"""


@pytest.mark.parametrize(("certified", "delivered"), [("mx.tls.test", True), ("other.tls.test", False)])
async def test_a_source_member_verifies_the_mx_host_name_dns_gave(
    tmp_path: Path, ca: trustme.CA, certified: str, delivered: bool
) -> None:
    mx = await Upstream("mx", host="127.0.0.21", tls=server_tls(ca, certified)).start()
    try:
        with LoopbackDns(ZONE) as dns:
            verify = {"tls": "verify", "tls_ca_file": ca_file(ca, tmp_path)}
            members = [{**m, **verify} for m in SOURCES]
            settings = make_settings(
                tmp_path,
                [{"name": "default", "members": members}],
                dns={"nameservers": [dns.address], "mx_port": mx.port},
            )
            async with App(settings) as app:
                await send(app.smtp_port, "mx1", to=["u@tls.test"])
                kind = "Delivery" if delivered else "TransientFailure"
                await wait_until(lambda: bool(events(tmp_path, kind)))
    finally:
        await mx.stop()
    if delivered:
        assert mx.received[0].tls
    else:
        assert mx.received == []
        response = events(tmp_path, "TransientFailure")[0]["response"]
        assert response["enhanced_code"] == "4.7.5" and "Hostname mismatch" in response["text"]


SHARED = """
b1.test.        300 IN MX 10 mx.good.test.
b2.test.        300 IN MX 10 mx.evil.test.
mx.good.test.   300 IN A 127.0.0.23
mx.evil.test.   300 IN A 127.0.0.23
"""


async def test_verify_never_reuses_a_connection_checked_for_another_mx_name_on_the_same_ip(
    tmp_path: Path, ca: trustme.CA
) -> None:
    # One IP, two MX names, a certificate for one of them. The connection verified for mx.good.test,
    # idle after the first message, must not carry mail for mx.evil.test unchecked.
    mx = await Upstream("mx", host="127.0.0.23", tls=server_tls(ca, "mx.good.test")).start()
    try:
        with LoopbackDns(SHARED) as dns:
            member = {**SOURCES[0], "tls": "verify", "tls_ca_file": ca_file(ca, tmp_path)}
            settings = make_settings(
                tmp_path,
                [{"name": "default", "members": [member]}],
                dns={"nameservers": [dns.address], "mx_port": mx.port},
            )
            async with App(settings) as app:
                await send(app.smtp_port, "good", to=["u@b1.test"])
                await wait_until(lambda: bool(events(tmp_path, "Delivery")))
                await send(app.smtp_port, "evil", to=["u@b2.test"])
                await wait_until(lambda: bool(events(tmp_path, "TransientFailure")))
    finally:
        await mx.stop()
    assert [r.test_id for r in mx.received] == ["good"]
    response = events(tmp_path, "TransientFailure")[0]["response"]
    assert response["enhanced_code"] == "4.7.5" and "mx.evil.test" in response["text"]


async def test_verify_checks_an_address_literal_against_the_certificates_ip_address(
    tmp_path: Path, ca: trustme.CA
) -> None:
    # u@[127.0.0.22]: the host is the IP (RFC 5321 4.1.3), so the certificate must name that IP address,
    # not the text "[127.0.0.22]" (which no certificate can hold).
    mx = await Upstream("mx", host="127.0.0.22", tls=server_tls(ca, "127.0.0.22")).start()
    try:
        verify = {"tls": "verify", "tls_ca_file": ca_file(ca, tmp_path)}
        members = [{**m, **verify} for m in SOURCES]
        settings = make_settings(
            tmp_path, [{"name": "default", "members": members}], dns={"mx_port": mx.port}
        )
        async with App(settings) as app:
            await send(app.smtp_port, "lit", to=["u@[127.0.0.22]"])
            await wait_until(
                lambda: bool(events(tmp_path, "Delivery") or events(tmp_path, "TransientFailure"))
            )
    finally:
        await mx.stop()
    assert events(tmp_path, "TransientFailure") == []
    (delivery,) = events(tmp_path, "Delivery")
    assert delivery["mx_host"] == "[127.0.0.22]" and mx.received[0].tls


# -- operators' view -------------------------------------------------------------------------------


async def test_a_reload_that_changes_tls_replaces_the_members_connections(
    tmp_path: Path, upstream: StartUpstream, ca: trustme.CA
) -> None:
    up = await upstream("up", tls=server_tls(ca))
    async with App(make_settings(tmp_path, pool({"name": "m", "address": up.address, "tls": "none"}))) as app:
        await send(app.smtp_port, "before")
        await wait_until(lambda: len(up.received) == 1)
        changes = app.configure(
            make_settings(tmp_path, pool({"name": "m", "address": up.address, "tls": "required"}))
        )
        assert changes == ["default/m: tls none -> required"]
        await send(app.smtp_port, "after")
        await wait_until(lambda: len(up.received) == 2)
    assert [(r.test_id, r.tls) for r in up.received] == [("before", False), ("after", True)]


def test_the_members_table_shows_the_mode_and_what_the_last_connection_used() -> None:
    row = {
        "pool": "default",
        "member": "m",
        "state": "up",
        "weight": 1,
        "effective_weight": 1,
        "connections": 1,
        "max_connections": 10,
        "in_flight": 0,
        "ewma_latency_ms": 1.0,
        "recent_error": "",
    }
    console = Console(width=200, record=True)
    console.print(members_table([{**row, "tls_mode": "verify", "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384"}]))
    console.print(members_table([{**row, "tls_mode": "opportunistic", "tls": "none"}]))
    console.print(members_table([{**row, "tls_mode": "required", "tls": ""}]))
    text = console.export_text()
    assert "verify TLSv1.3" in text and "opportunistic none" in text and " required " in text
