"""One-click unsubscribe tokens and fields (postmux.unsubscribe), and the [unsubscribe] config's errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmux.config import ConfigError, settings_from_dict
from postmux.unsubscribe import BadToken, Claim, fields, has_list_unsubscribe, issue, verify

SECRET = b"s" * 32
OTHER = b"o" * 32
POOLS = [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]}]
CLAIMS = st.builds(
    Claim,
    recipient=st.emails(),
    sender_domain=st.from_regex(r"[a-z]{1,10}\.test", fullmatch=True),
    queue_id=st.from_regex(r"[0-9a-f]{20}", fullmatch=True),
    message_id=st.text(max_size=40),
    issued=st.integers(0, 2**33),
)


@given(CLAIMS)
def test_a_token_gives_back_its_claim_and_is_url_safe(claim: Claim) -> None:
    token = issue(claim, SECRET)
    assert verify(token, (SECRET,), claim.issued, 0) == claim
    assert all(c.isalnum() or c in "-_." for c in token)


@given(CLAIMS, st.data())
def test_any_change_to_a_token_is_refused(claim: Claim, data: st.DataObject) -> None:
    token = issue(claim, SECRET)
    at = data.draw(st.integers(0, len(token) - 1))
    new = data.draw(st.sampled_from("AQZaqz09-_.").filter(lambda c: c != token[at]))
    altered = token[:at] + new + token[at + 1 :]
    with pytest.raises(BadToken):
        verify(altered, (SECRET,), claim.issued, 0)


def test_no_other_spelling_of_the_last_character_passes() -> None:
    # The MAC's last base64 character has unused bits: decoding would take several spellings of it.
    token = issue(Claim("alice@dest.test", "news.test", "q1", "", 1000), SECRET)
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
        if c != token[-1]:
            with pytest.raises(BadToken):
                verify(token[:-1] + c, (SECRET,), 1000, 0)


def test_a_token_made_with_another_secret_or_a_rewritten_claim_is_refused() -> None:
    claim = Claim("alice@dest.test", "news.test", "q1", "m@x", 1000)
    with pytest.raises(BadToken, match="does not match"):
        verify(issue(claim, OTHER), (SECRET,), 1000, 0)
    # The recipient swapped in the readable part, the signature kept: forged.
    body, mac = issue(claim, SECRET).split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["r"] = "mallory@dest.test"
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + mac
    with pytest.raises(BadToken, match="does not match"):
        verify(forged, (SECRET,), 1000, 0)
    for junk in ("", "x", "a.b.c", "é.é", "a" * 3000 + ".b"):
        with pytest.raises(BadToken):
            verify(junk, (SECRET,), 1000, 0)


def test_an_earlier_secret_still_honoured_and_an_old_token_expires() -> None:
    claim = Claim("alice@dest.test", "news.test", "q1", "", 1000)
    token = issue(claim, OTHER)
    assert verify(token, (SECRET, OTHER), 1000, 0) == claim  # rotated: the old mail's links still work
    assert verify(token, (OTHER,), 1000 + 86400, 86400) == claim
    with pytest.raises(BadToken, match="expired"):
        verify(token, (OTHER,), 1001 + 86400, 86400)


def test_the_fields_carry_the_https_uri_then_the_mailto_each_on_its_line() -> None:
    out = fields("https://u.example.com/unsubscribe/", "unsub@example.com", "TOK.EN")
    assert out == (
        b"List-Unsubscribe: <https://u.example.com/unsubscribe/TOK.EN>,\r\n"
        b" <mailto:unsub@example.com?subject=unsubscribe%20TOK.EN>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    assert fields("https://u.test/", "", "T") == (
        b"List-Unsubscribe: <https://u.test/T>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    assert has_list_unsubscribe(b"From: a@b\r\nlist-unsubscribe: <mailto:x@y>\r\n\r\n")
    assert not has_list_unsubscribe(b"From: a@b\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")


@given(
    st.emails(),
    st.from_regex(r"[a-z0-9]{1,63}(\.[a-z0-9]{1,63}){0,3}", fullmatch=True),
    st.text(max_size=128),
    st.integers(0, 170),
    st.booleans(),
)
def test_the_fields_never_make_a_line_over_998_octets(
    rcpt: str, domain: str, message_id: str, url_pad: int, mailto: bool
) -> None:
    url = "https://u.example.com/" + "p" * url_pad + "/"  # up to the 200 characters config allows
    token = issue(Claim(rcpt, domain, "18c1f2a9b3c40a1b2c3d4", message_id, 2**31), SECRET)
    out = fields(url, "u" * 64 + "@" + "d" * 180 + ".example" if mailto else "", token)
    assert out is not None  # the largest address, domain and Message-ID still fit
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert f"<{url}{token}>".encode() in out


def test_a_uri_that_cannot_fit_on_a_line_gives_no_fields() -> None:
    assert fields("https://u.test/", "", "t" * 996) is None
    long = fields("https://u.test/", "a@b.test", "t" * 960)
    assert long is not None and b"<mailto:a@b.test?subject=unsubscribe>" in long  # its token left out


def problems(tmp_path: Path, **entry: Any) -> dict[str, str]:
    secret = tmp_path / "unsub.key"
    secret.write_bytes(SECRET)
    table = {"url": "https://u.example.com/unsubscribe", "secret_file": str(secret), "pools": ["default"]}
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"pool": POOLS, "unsubscribe": {**table, **entry}}, "postmux.toml")
    return dict(caught.value.problems)


def test_config_errors_name_the_key_and_why(tmp_path: Path) -> None:
    assert "https:// URL" in problems(tmp_path, url="http://u.example.com/")["unsubscribe.url"]
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    assert "holds 4 bytes; at least 32" in problems(tmp_path, secret_file=str(short))["unsubscribe"]
    assert "cannot be read" in problems(tmp_path, secret_file=str(tmp_path / "nope"))["unsubscribe"]
    assert "did you mean 'default'" in problems(tmp_path, pools=["defualt"])["unsubscribe.pools[0]"]
    assert "name the pools or sender_domains" in problems(tmp_path, pools=[])["unsubscribe"]
    assert "plain ASCII address" in problems(tmp_path, mailto="a b@x")["unsubscribe.mailto"]
    assert "at most 200" in problems(tmp_path, url="https://u.test/" + "p" * 190)["unsubscribe.url"]


def test_a_good_table_loads_its_secrets_and_ends_the_url_with_a_slash(tmp_path: Path) -> None:
    secret, old = tmp_path / "unsub.key", tmp_path / "old.key"
    secret.write_bytes(SECRET + b"\n")
    old.write_bytes(OTHER)
    settings = settings_from_dict(
        {
            "pool": POOLS,
            "unsubscribe": {
                "url": "https://u.example.com/unsubscribe",
                "secret_file": str(secret),
                "previous_secret_files": [str(old)],
                "sender_domains": ["*.example.com"],
            },
        }
    )
    assert settings.unsubscribe is not None
    assert settings.unsubscribe.url == "https://u.example.com/unsubscribe/"
    assert settings.unsubscribe.secrets == (SECRET, OTHER)
    assert SECRET.decode() not in repr(settings.unsubscribe)
