"""postmux.dkim's pure parts: the streamed body hash held to dkimpy's, the choice of signing domain, the h=
list, and the config errors of [[dkim]] (each naming the file and the key)."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from postmux.body import BodyFile
from postmux.cli import app as cli
from postmux.config import ConfigError, settings_from_dict
from postmux.dkim import (
    DkimSigner,
    RelaxedBodyHash,
    author_domain,
    body_hash,
    generate_key,
    header_fields,
    header_list,
    signing_domain,
)

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def dkimpy_body_hash(body: bytes) -> bytes:
    """dkimpy's own relaxed body hash, over the body as delivery sends it: every line end a CRLF, and one
    after the last line (WireText.end), which dkimpy would add only after stripping white space."""
    wire = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return hashlib.sha256(RELAXED.canonicalize_body(wire)).digest()


@given(
    st.lists(
        st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r\n", b"\n", b"\r", b".", b"\xc3\xa9"]), max_size=40
    ),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_the_streamed_body_hash_is_dkimpys_however_the_text_is_cut(
    parts: list[bytes], cuts: list[int]
) -> None:
    body = b"".join(parts)
    hashed = RelaxedBodyHash()
    start = 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        hashed.update(body[start:cut])
        start = cut
    hashed.update(body[start:])
    assert hashed.digest() == dkimpy_body_hash(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"\r\n", b"\r\n\r\n", b"x", b"x  \r\n \r\n\r\n", b"a\tb \r\n\r\nc", b"a\r", b"a\rb\nc\r\n"],
)
def test_edge_bodies_hash_as_dkimpy_hashes_them(body: bytes) -> None:
    hashed = RelaxedBodyHash()
    hashed.update(body)
    assert hashed.digest() == dkimpy_body_hash(body)
    if body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n"):  # what ingress calls clean
        clean = RelaxedBodyHash(clean=True)
        clean.update(body)
        assert clean.digest() == dkimpy_body_hash(body)


def test_a_tail_in_a_file_hashes_as_the_same_text_in_memory(tmp_path: Path) -> None:
    text = b"Subject: x\r\n\r\n" + b"line  with  space \r\n" * 5000 + b"\r\n\r\n"
    cut = 100
    path = tmp_path / "body"
    path.write_bytes(b"other" + text[cut:])
    tail = BodyFile(str(path), 5, len(text) - cut)
    start = text.index(b"\r\n\r\n") + 4
    assert body_hash(text[:cut], start, tail) == body_hash(text, start, None)
    assert body_hash(text, start, None) == dkimpy_body_hash(text[start:])


@dataclass
class Entry:
    domain: str
    subdomains: bool = False
    fallback: bool = False
    headers: tuple[str, ...] = ("From",)
    oversign: tuple[str, ...] = ()
    keys: tuple[Any, ...] = ()


ENTRIES = [Entry("example.com", subdomains=True), Entry("shop.example.com"), Entry("other.org")]


@pytest.mark.parametrize(
    ("author", "chosen"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("shop.example.com", "shop.example.com"),  # its own entry before the parent's
        ("news.example.com", "example.com"),  # the parent allows subdomains
        ("a.b.example.com", "example.com"),
        ("news.other.org", None),  # other.org does not sign for its subdomains
        ("unknown.net", None),
        ("", None),
    ],
)
def test_the_signing_domain_is_the_from_domain_or_a_parent_that_allows_it(
    author: str, chosen: str | None
) -> None:
    entry = signing_domain(author, ENTRIES)
    assert (entry.domain if entry else None) == chosen


def test_the_fallback_signs_what_no_entry_matches() -> None:
    entries = [*ENTRIES, Entry("relay.example.net", fallback=True)]
    assert signing_domain("news.other.org", entries).domain == "relay.example.net"  # type: ignore[union-attr]
    assert signing_domain("other.org", entries).domain == "other.org"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("head", "domain"),
    [
        (b"From: App <app@Example.COM>\r\n\r\n", "example.com"),
        (b"Subject: x\r\nfrom: a@b.example\r\n\r\n", "b.example"),
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>,\r\n\tother@else.test\r\n\r\n", "example.com"),
        ("From: jörg@bücher.example\r\n\r\n".encode(), "xn--bcher-kva.example"),
        (b"Subject: no from\r\n\r\n", ""),
        (b"Subject: x\r\nFrom \t:a@obs.example\r\n\r\n", "obs.example"),  # RFC 5322 4.5
        (b"Fromage: a@x.example\r\nFrom: b@y.example\r\n\r\n", "y.example"),
    ],
)
def test_the_author_domain_is_the_from_fields_first_address(head: bytes, domain: str) -> None:
    assert author_domain(head) == domain


def test_header_fields_reads_white_space_before_the_colon_as_verifiers_do() -> None:
    head = b"From :ceo@bank.example\r\n\tfolded\r\nFrom: a@example.test\r\nSubject\t: s\r\n\r\n"
    assert header_fields(head) == [
        [b"From", b"ceo@bank.example\r\n\tfolded\r\n"],
        [b"From", b" a@example.test\r\n"],
        [b"Subject", b" s\r\n"],
    ]
    with pytest.raises(dkim.MessageFormatError):
        header_fields(b"From mbox-line\r\nFrom: a@example.test\r\n\r\n")


def test_oversigned_fields_are_listed_once_more_than_they_appear() -> None:
    present = [b"From", b"To", b"Subject", b"Received", b"To"]
    names = header_list(present, ("From", "To", "Subject", "Date", "Cc"), ("From", "Subject", "Reply-To"))
    assert names == [b"from", b"from", b"to", b"to", b"subject", b"subject", b"reply-to"]


def key_file(tmp_path: Path, algorithm: str = "rsa-sha256", name: str = "k.key") -> str:
    pem, _ = generate_key(algorithm)  # type: ignore[arg-type]
    path = tmp_path / name
    path.write_bytes(pem)
    return str(path)


def settings(dkim_entries: list[dict[str, Any]]) -> Any:
    return settings_from_dict(
        {"pool": [{"name": "d", "members": [{"name": "a", "address": "127.0.0.1:1"}]}], "dkim": dkim_entries},
        "postmux.toml",
    )


def problems(dkim_entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        settings(dkim_entries)
    return e.value.problems


def test_a_missing_key_file_is_a_config_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.key")
    found = problems([{"domain": "example.com", "selectors": [{"name": "s1", "key_file": missing}]}])
    assert len(found) == 1
    key, reason = found[0]
    assert key == "dkim[0].selectors[0]"
    assert reason.startswith("key_file: ") and missing in reason and "cannot be read" in reason


@pytest.mark.parametrize(
    ("content", "algorithm", "said"),
    [
        (b"not a key", "rsa-sha256", "holds no unencrypted PEM private key"),
        (None, "ed25519-sha256", "is not an Ed25519 key"),  # an RSA key given as Ed25519
        ("ed", "rsa-sha256", "is not an RSA key"),
        (b"c2hvcnQ=", "ed25519-sha256", "neither a PEM key nor a base64 Ed25519 seed"),
    ],
)
def test_a_key_that_cannot_sign_is_a_config_error(
    tmp_path: Path, content: bytes | str | None, algorithm: str, said: str
) -> None:
    if content is None:
        path = key_file(tmp_path, "rsa-sha256")
    elif content == "ed":
        path = key_file(tmp_path, "ed25519-sha256")
    else:
        path = str(tmp_path / "bad.key")
        Path(path).write_bytes(content)  # type: ignore[arg-type]
    found = problems(
        [{"domain": "example.com", "selectors": [{"name": "s1", "algorithm": algorithm, "key_file": path}]}]
    )
    assert found[0][0] == "dkim[0].selectors[0]" and said in found[0][1] and path in found[0][1]


def test_an_ed25519_seed_as_dkimpy_writes_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "seed.key"
    path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    loaded = settings(
        [
            {
                "domain": "example.com",
                "selectors": [{"name": "s1", "algorithm": "ed25519-sha256", "key_file": str(path)}],
            }
        ]
    )
    assert loaded.dkim[0].selectors[0].key.record().startswith("v=DKIM1; k=ed25519; p=")


@pytest.mark.parametrize(
    ("entry", "key", "said"),
    [
        ({"headers": ["To", "Subject"]}, "dkim[0].headers", "From must be signed"),
        ({"headers": ["From", "Received"]}, "dkim[0].headers", "must not be signed"),
        ({"oversign": ["DKIM-Signature"]}, "dkim[0].oversign", "must not be signed"),
        ({"headers": ["From", "Bad Name"]}, "dkim[0].headers", "not a header field name"),
        ({"domain": "bad_domain..com"}, "dkim[0].domain", ""),
        ({"selectors": []}, "dkim[0].selectors", ""),
        ({"subdomains": "yes"}, "dkim[0].subdomains", ""),
    ],
)
def test_bad_dkim_keys_are_config_errors(tmp_path: Path, entry: dict[str, Any], key: str, said: str) -> None:
    base = {"domain": "example.com", "selectors": [{"name": "s1", "key_file": key_file(tmp_path)}]}
    found = dict(problems([{**base, **entry}]))
    assert key in found and said in found[key]


def test_a_domain_twice_or_two_fallbacks_are_config_errors(tmp_path: Path) -> None:
    selectors = [{"name": "s1", "key_file": key_file(tmp_path)}]
    twice = problems([{"domain": "example.com", "selectors": selectors}] * 2)
    assert twice == [("dkim", "each domain has one entry; repeated: example.com")]
    fallbacks = problems(
        [
            {"domain": "a.example", "selectors": selectors, "fallback": True},
            {"domain": "b.example", "selectors": selectors, "fallback": True},
        ]
    )
    assert fallbacks == [("dkim", "one entry at most is the fallback; these are: a.example, b.example")]


def test_the_signer_signs_with_the_chosen_domain_and_every_selector(tmp_path: Path) -> None:
    loaded = settings(
        [
            {
                "domain": "example.com",
                "selectors": [
                    {"name": "rsa", "key_file": key_file(tmp_path, name="r.key")},
                    {
                        "name": "ed",
                        "algorithm": "ed25519-sha256",
                        "key_file": key_file(tmp_path, "ed25519-sha256"),
                    },
                ],
            }
        ]
    )
    signer = DkimSigner(loaded.dkim, clock=lambda: 1_700_000_000)
    text = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = signer.signatures(text) + text
    records = {
        f"{s.name}._domainkey.example.com.".encode(): s.key.record().encode()
        for s in loaded.dkim[0].selectors
    }
    parsed = dkim.DKIM(signed)
    assert [parsed.verify(i, dnsfunc=lambda name, timeout=5: records[name]) for i in (0, 1)] == [True, True]
    assert b"t=1700000000" in signed
    assert signer.signatures(b"From: a@elsewhere.test\r\n\r\nbody\r\n") == b""


def test_genkey_writes_a_private_key_file_and_prints_its_record(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["dkim", "genkey", "example.com", "s2026", "--algorithm", "ed25519", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "example.com.s2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result.stdout.startswith('s2026._domainkey.example.com. IN TXT "v=DKIM1; k=ed25519; p=')
    again = CliRunner().invoke(cli, ["dkim", "genkey", "example.com", "s2026", "--out", str(tmp_path)])
    assert again.exit_code == 1 and "File exists" in again.output  # a key in use is never overwritten
    wrong = CliRunner().invoke(
        cli, ["dkim", "genkey", "example.com", "s3", "--algorithm", "dsa", "--out", str(tmp_path)]
    )
    assert wrong.exit_code == 2 and "rsa or ed25519" in wrong.output


def test_genkey_makes_the_out_directory_when_it_does_not_exist(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    result = CliRunner().invoke(cli, ["dkim", "genkey", "example.com", "s1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "example.com.s1.key").is_file()
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0  # 0700, narrowed by the umask at most
    (tmp_path / "file").write_text("")
    blocked = CliRunner().invoke(
        cli, ["dkim", "genkey", "example.com", "s1", "--out", str(tmp_path / "file")]
    )
    assert blocked.exit_code == 1 and "cannot make the directory" in blocked.output
