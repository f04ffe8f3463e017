"""DKIM signatures made at accept verify, as an aiosmtpd upstream received the mail, with an implementation
other than dkimpy: Perl's Mail::DKIM (Debian's libmail-dkim-perl), asking a DNS server on loopback for the
keys `postmux dkim genkey` printed.

Debian 12's Mail::DKIM (1.20230212) predates Ed25519 (RFC 8463): it reports those signatures as
"unsupported algorithm". Where it does, the Ed25519 signature is checked by dkimpy's verifier instead (not
independent of the signer's header code, but of its body hash and of OpenSSL's signature); a newer
Mail::DKIM is held to "pass" for both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest
from typer.testing import CliRunner

from postmux.app import App
from postmux.cli import app as cli
from postmux.config import ConfigError, load_config
from postmux.dkim import generate_key
from tests.dns_server import LoopbackDns
from tests.support import StartUpstream, make_settings, raw_transaction, wait_until

VERIFY = Path(__file__).resolve().parents[1] / "dkim_verify.pl"
DOMAIN = "example.test"

pytestmark = pytest.mark.skipif(
    shutil.which("perl") is None
    or subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True).returncode != 0,
    reason="Perl's Mail::DKIM is not installed (apt-get install libmail-dkim-perl; .ci/run does)",
)


class Keys:
    """Two selectors made by `postmux dkim genkey`, and the zone that publishes their records."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.records: dict[str, str] = {}
        zone = []
        for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
            result = CliRunner().invoke(
                cli, ["dkim", "genkey", DOMAIN, selector, "--algorithm", algorithm, "--out", str(directory)]
            )
            assert result.exit_code == 0, result.output
            line = next(x for x in result.stdout.splitlines() if "._domainkey." in x)
            zone.append(line.replace(" IN TXT ", " 300 IN TXT "))
            self.records[selector] = "".join(line.split(" IN TXT ", 1)[1].split('"')[1::2])
        self.zone = "\n".join(zone)

    def dkim(self, **entry: Any) -> list[dict[str, Any]]:
        return [
            {
                "domain": DOMAIN,
                "selectors": [
                    {"name": "rsa1", "key_file": str(self.dir / f"{DOMAIN}.rsa1.key")},
                    {
                        "name": "ed1",
                        "algorithm": "ed25519-sha256",
                        "key_file": str(self.dir / f"{DOMAIN}.ed1.key"),
                    },
                ],
                **entry,
            }
        ]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim"))


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[LoopbackDns]:
    with LoopbackDns(keys.zone) as server:
        yield server


def mail_dkim(text: bytes, dns: LoopbackDns) -> dict[str, str]:
    """Mail::DKIM's result per selector: {"rsa1": "pass", ...}."""
    port = dns.address.rsplit(":", 1)[1]
    out = subprocess.run(["perl", str(VERIFY), port], input=text, capture_output=True, timeout=30, check=True)
    results = {}
    for line in out.stdout.decode().splitlines():
        result, _domain, selector, _algorithm, *detail = line.split(" ", 4)
        results[selector] = result if result == "pass" else f"{result} {' '.join(detail)}"
    return results


def assert_verified(text: bytes, dns: LoopbackDns, keys: Keys) -> None:
    results = mail_dkim(text, dns)
    assert results["rsa1"] == "pass", results
    if results["ed1"] != "pass":
        assert "unsupported algorithm" in results["ed1"], results
        records = {f"{s}._domainkey.{DOMAIN}.": r.encode() for s, r in keys.records.items()}
        # dkimpy's parser drops a `From :` line (RFC 5322 4.5) as mbox "From "; relaxed canonicalization
        # removes white space before a colon (RFC 6376 3.4.2), so closing it up changes no hash.
        end = text.find(b"\r\n\r\n")
        text = re.sub(rb"(?m)^([\x21-\x39\x3b-\x7e]+)[ \t]+:", rb"\1:", text[:end]) + text[end:]
        signatures = dkim.DKIM(text)
        at = [i for i, (n, _) in enumerate(signatures.headers) if n.lower() == b"dkim-signature"]
        ed = next(i for i in range(len(at)) if b"ed25519" in signatures.headers[at[i]][1])
        assert signatures.verify(ed, dnsfunc=lambda name, timeout=5: records[name.decode()])


async def send_raw(port: int, data: bytes, *, options: str = "", sender: str = "app@example.test") -> None:
    """One message over a plain socket, its text as given (tests.support.raw_transaction), taken."""
    answer = await raw_transaction(port, data, sender=sender, options=options)
    assert answer.startswith("250"), answer


HEAD = (
    b"From: App <app@example.test>\r\nTo: user@dest.test\r\nSubject:  a  test\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n"
    b"X-Postmux-Tag: campaign=dkim\r\n"
)

CASES = {
    "plain": (HEAD + b"\r\nhello  world\t \r\n\r\n\r\n", "", {}),
    "eight_bit": (
        HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe, J\xc3\xb6rg\r\n",
        " BODY=8BITMIME",
        {},
    ),
    "smtputf8": (
        "From: Jörg <jörg@example.test>\r\nTo: user@dest.test\r\nSubject: Grüße\r\n\r\nGrüße\r\n".encode(),
        " SMTPUTF8 BODY=8BITMIME",
        {},
    ),
    "dot_lines": (HEAD + b"\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n", "", {}),
    "long_lines": (HEAD + b"\r\n" + b"word " * 500 + b"\r\nshort\r\n", "", {}),
    "bare_lf_repaired": (
        HEAD.replace(b"\r\n", b"\n") + b"\nline one\nline two \n.dot\r\n",  # CRLF before the end
        "",
        {"line_endings": "normalize"},
    ),
    # RFC 5322 4.5 obs-optional `Subject :` is signed as Subject, as verifiers read it.
    "obs_subject": (HEAD.replace(b"Subject:", b"Subject \t:") + b"\r\nhello\r\n", "", {}),
    "tail_in_a_file": (
        HEAD + b"\r\n" + (b"x" * 70 + b"  \r\n") * 3000 + b".last\r\n",
        "",
        {"spill_bytes": 4096},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_dual_signed_mail_verifies_as_the_upstream_received_it(
    case: str, tmp_path: Path, upstream: StartUpstream, keys: Keys, dns: LoopbackDns
) -> None:
    text, options, smtp = CASES[case]
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    settings = make_settings(tmp_path, pools, dkim=keys.dkim(), smtp=smtp)
    sender = "jörg@example.test" if "SMTPUTF8" in options else "app@example.test"
    async with App(settings) as app:
        await send_raw(app.smtp_port, text, options=options, sender=sender)
        await wait_until(lambda: len(up.received) == 1)
    data = up.received[0].data
    assert data.count(b"DKIM-Signature:") == 2
    assert b"X-Postmux-Tag" not in data
    assert_verified(data, dns, keys)


@pytest.mark.parametrize(
    "text",
    [
        HEAD.replace(b"From: App", b"From :App") + b"\r\nhello\r\n",
        HEAD + b"From\t:ceo@bank.example\r\n\r\nhello\r\n",
        b"from :ceo@bank.example\r\n" + HEAD + b"\r\nhello\r\n",
    ],
    ids=["alone", "after_from", "before_from"],
)
async def test_a_from_field_with_white_space_before_its_colon_is_refused(
    text: bytes, tmp_path: Path, upstream: StartUpstream, keys: Keys
) -> None:
    # RFC 5322 4.5 `From :`: Mail::DKIM reads a From field, OpenDKIM none (a permerror when it is the only
    # one), dkimpy drops it as an mbox line: signed, it failed at receivers; and next to a real From: it
    # was a second author the DMARC check did not see. Refused, nothing stored.
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, dkim=keys.dkim())) as app:
        answer = await raw_transaction(app.smtp_port, text)
        assert answer.startswith("550 5.6.0") and "RFC 5322 4.5" in answer, answer
        await send_raw(app.smtp_port, CASES["plain"][0])  # the node goes on taking mail
        await wait_until(lambda: len(up.received) == 1)
    assert b"From :" not in up.received[0].data


async def test_a_changed_body_fails_so_the_check_can_fail(
    tmp_path: Path, upstream: StartUpstream, keys: Keys, dns: LoopbackDns
) -> None:
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, dkim=keys.dkim())) as app:
        await send_raw(app.smtp_port, CASES["plain"][0])
        await wait_until(lambda: len(up.received) == 1)
    tampered = up.received[0].data.replace(b"hello", b"jello")
    assert mail_dkim(tampered, dns)["rsa1"].startswith("fail")


async def test_mail_from_a_domain_without_an_entry_goes_unsigned(
    tmp_path: Path, upstream: StartUpstream, keys: Keys
) -> None:
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, dkim=keys.dkim())) as app:
        await send_raw(app.smtp_port, CASES["plain"][0].replace(b"app@example.test>", b"app@other.test>"))
        await wait_until(lambda: len(up.received) == 1)
    assert b"DKIM-Signature" not in up.received[0].data


async def test_the_fallback_domain_signs_mail_of_other_domains(
    tmp_path: Path, upstream: StartUpstream, keys: Keys, dns: LoopbackDns
) -> None:
    up = await upstream("up")
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    async with App(make_settings(tmp_path, pools, dkim=keys.dkim(fallback=True))) as app:
        await send_raw(app.smtp_port, CASES["plain"][0].replace(b"app@example.test>", b"app@other.test>"))
        await wait_until(lambda: len(up.received) == 1)
    data = up.received[0].data
    assert b"d=example.test" in data
    assert mail_dkim(data, dns)["rsa1"] == "pass"


async def test_mail_sent_through_the_http_api_is_signed(
    tmp_path: Path, upstream: StartUpstream, keys: Keys, dns: LoopbackDns
) -> None:
    from tests.integration.test_submission_api import SHOP_KEY, message, settings_for

    up = await upstream("up")
    entry = keys.dkim(domain="shop.test")
    async with App(settings_for(tmp_path, up, dkim=entry)) as app:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", headers={"Authorization": f"Bearer {SHOP_KEY}"}
        ) as client:
            response = await client.post("/api/v1/messages", json=message(tags={"campaign": "x"}))
        assert response.status_code == 202, response.text
        await wait_until(lambda: len(up.received) == 1)
    data = up.received[0].data
    assert data.count(b"DKIM-Signature:") == 2 and b"d=shop.test" in data
    zone = keys.zone.replace(f"._domainkey.{DOMAIN}.", "._domainkey.shop.test.")
    with LoopbackDns(zone) as shop_dns:
        assert mail_dkim(data, shop_dns)["rsa1"] == "pass"


async def test_reload_takes_a_rotated_key_and_refuses_a_bad_one(
    tmp_path: Path, upstream: StartUpstream, keys: Keys, dns: LoopbackDns
) -> None:
    up = await upstream("up")
    key = tmp_path / "rotating.key"
    shutil.copy(keys.dir / f"{DOMAIN}.ed1.key", key)  # at first, ed1's key under selector rsa1's name
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        f'[smtp]\nlisten = "127.0.0.1:0"\nhostname = "postmux.test"\n[http]\nlisten = "127.0.0.1:0"\n'
        f'[spool]\npath = "{tmp_path / "spool.db"}"\n[events]\nlog = "{tmp_path / "events.jsonl"}"\n'
        f'[[pool]]\nname = "default"\nmembers = [{{ name = "up", address = "{up.address}" }}]\n'
        f'[[dkim]]\ndomain = "{DOMAIN}"\n'
        f'selectors = [{{ name = "rsa1", algorithm = "rsa-sha256", key_file = "{key}" }}]\n'
    )
    with pytest.raises(ConfigError, match="is not an RSA key"):
        load_config(cfg)
    shutil.copy(keys.dir / f"{DOMAIN}.rsa1.key", key)
    async with App(load_config(cfg), config_path=cfg) as app:
        await send_raw(app.smtp_port, CASES["plain"][0])
        await wait_until(lambda: len(up.received) == 1)
        # Rotation: a new key in the same file (its record not published): taken at reload.
        new_pem, _ = generate_key("rsa-sha256")
        key.write_bytes(new_pem)
        assert (await app.reload()).ok
        await send_raw(app.smtp_port, CASES["plain"][0])
        await wait_until(lambda: len(up.received) == 2)
        # A broken key file: the reload is refused, naming the file, and signing goes on with the last key.
        key.write_bytes(b"garbage")
        refused = await app.reload()
        assert not refused.ok and str(key) in refused.problems[0][1]
        await send_raw(app.smtp_port, CASES["plain"][0])
        await wait_until(lambda: len(up.received) == 3)
    results = [mail_dkim(r.data, dns)["rsa1"] for r in up.received]
    assert results[0] == "pass"
    assert results[1].startswith("fail") and results[2].startswith("fail")  # signed with the rotated key
    assert up.received[1].data.count(b"DKIM-Signature:") == up.received[2].data.count(b"DKIM-Signature:") == 1
