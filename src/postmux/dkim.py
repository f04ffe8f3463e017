"""DKIM signatures (RFC 6376) made once per message, at accept, over the bytes that go on the wire.

A word of its own, like body.py: config loads the keys through it (a bad key is a config error), the
acceptor signs with it, the CLI makes keys with it; none of them imports another for it.

What is signed is the text as stored (after ingress's repairs: long lines folded, bare LF repaired, the
X-Postmux-* request fields taken out), seen as delivery sends it: a text that is not `clean` has each bare
CR or LF sent as CRLF (delivery/smtp_client.py WireText), so it is hashed so too; dot-stuffing is undone
by the receiver and changes nothing signed (RFC 5321 4.5.2). The DKIM-Signature fields go before the
stored text, so every later hop's trace fields sit above them, unsigned.

dkimpy canonicalizes, hashes and folds the header section (the steps of its DomainSigner.gen_header;
OpenSSL makes the signature, see `_signature`). The body hash is taken here, streamed in relaxed
canonicalization (RFC 6376 3.4.4), because dkimpy wants the whole text in memory and a text's tail
(postmux.body) is read in chunks: memory stays at one chunk whatever the size.
tests/unit/test_dkim.py holds the two to the same bh= value.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal, Protocol

import dkim
import idna
from dkim.canonicalization import CanonicalizationPolicy

from postmux.body import BodyFile
from postmux.headers import head_field_value, header_section_end
from postmux.text import has_bare_cr_or_lf
from postmux.unsubscribe import SIGNED_FIELDS as RFC8058_FIELDS

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

# RFC 6376 5.4.1's list, with the fields a bulk sender's mail carries (RFC 8058's pair included).
DEFAULT_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "Cc",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
# Signed once more than they appear (RFC 6376 5.4.2, 8.15): a second From: or Subject: added on the way
# breaks the signature instead of being shown to the reader beside a valid one.
DEFAULT_OVERSIGN = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
# RFC 6376 5.4: fields that change on the way (and dkimpy refuses to sign).
NEVER_SIGNED = frozenset(x.decode() for x in dkim.DKIM.SHOULD_NOT)
RSA_MIN_BITS = 1024  # RFC 8301 3.2: verifiers refuse smaller keys; 2048 is what to use

_WSP_RUN = re.compile(rb"[ \t]+")
_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_FIELD = b"DKIM-Signature"


class KeyProblem(ValueError):
    """A key file that cannot sign: the reason, for the config error that names the file."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A selector's key: signs a SHA-256 digest of the signed header fields (RSASSA-PKCS1-v1_5 over the
    digest, RFC 6376 3.3.1; Ed25519 over the digest itself, RFC 8463 3), by OpenSSL (cryptography)."""

    algorithm: Algorithm
    secret: Any  # cryptography's RSAPrivateKey or Ed25519PrivateKey
    public: bytes  # the p= value of the DNS record (base64)

    def sign(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        if self.algorithm == "rsa-sha256":
            return bytes(self.secret.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
        return bytes(self.secret.sign(digest))

    def record(self) -> str:
        """The DNS TXT record at SELECTOR._domainkey.DOMAIN (RFC 6376 3.6.1, RFC 8463 4)."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public.decode()}"


def load_private_key(path: str | Path, algorithm: Algorithm) -> PrivateKey:
    """The key in the file at `path`: PEM (PKCS#1 or PKCS#8; what `postmux dkim genkey` and openssl
    write), or for Ed25519 also the base64 seed dkimpy's dknewkey writes. Raises KeyProblem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise KeyProblem(f"{path!r} cannot be read: {e.strerror or e}") from None
    return parse_private_key(raw, algorithm, str(path))


def parse_private_key(raw: bytes, algorithm: Algorithm, path: str = "the key") -> PrivateKey:
    """`load_private_key` for a key's bytes in hand; `path` names it in the problem raised."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        if algorithm == "ed25519-sha256" and b"-----" not in raw:
            return _ed25519_seed(raw, path)
        raise KeyProblem(f"{path!r} holds no unencrypted PEM private key ({e})") from None
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyProblem(f"{path!r} is not an RSA key, but algorithm is rsa-sha256")
        if key.key_size < RSA_MIN_BITS:
            raise KeyProblem(f"{path!r} is a {key.key_size}-bit RSA key; RFC 8301 wants at least 1024 (2048)")
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return PrivateKey(algorithm, key, base64.b64encode(public))
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyProblem(f"{path!r} is not an Ed25519 key, but algorithm is ed25519-sha256")
    return _ed25519_key(key)


def _ed25519_seed(raw: bytes, path: str) -> PrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        seed = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise KeyProblem(f"{path!r} holds neither a PEM key nor a base64 Ed25519 seed of 32 octets")
    return _ed25519_key(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def _ed25519_key(key: Any) -> PrivateKey:
    from cryptography.hazmat.primitives import serialization

    # RFC 8463 4: p= is the raw 32-octet public key in base64 (no SubjectPublicKeyInfo around it).
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PrivateKey("ed25519-sha256", key, base64.b64encode(raw))


def generate_key(algorithm: Algorithm, rsa_bits: int = 2048) -> tuple[bytes, PrivateKey]:
    """A new key: its PEM (PKCS#8) for the key file, and the key itself (its DNS record)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    new: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        new = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    else:
        new = ed25519.Ed25519PrivateKey.generate()
    pem = new.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, parse_private_key(pem, algorithm)


class DkimSelector(Protocol):
    """One selector of a signing domain (config's [[dkim]] selectors): its name and loaded key."""

    @property
    def name(self) -> str: ...

    @property
    def key(self) -> PrivateKey: ...


class DkimDomain(Protocol):
    """A signing domain (config's [[dkim]] entry), as the signer reads it."""

    @property
    def domain(self) -> str: ...

    @property
    def subdomains(self) -> bool: ...

    @property
    def fallback(self) -> bool: ...

    @property
    def headers(self) -> tuple[str, ...]: ...

    @property
    def oversign(self) -> tuple[str, ...]: ...

    @property
    def keys(self) -> Sequence[DkimSelector]: ...


def signing_domain(author_domain: str, domains: Sequence[DkimDomain]) -> DkimDomain | None:
    """The entry to sign with for mail From: `author_domain`: the entry of that very domain; else of the
    nearest parent that allows `subdomains` (d= a parent still aligns with the From: domain in DMARC's
    relaxed mode, RFC 7489 3.1.1); else the `fallback` entry; else none (the message goes unsigned)."""
    author = author_domain.lower().rstrip(".")
    by_name = {d.domain: d for d in domains}
    if author in by_name:
        return by_name[author]
    labels = author.split(".")
    for i in range(1, len(labels) - 1 + 1):
        parent = by_name.get(".".join(labels[i:]))
        if parent is not None and parent.subdomains:
            return parent
    return next((d for d in domains if d.fallback), None)


def author_domain(head: bytes) -> str:
    """The domain of the From: field's first address (RFC 5322 3.6.2), lower-cased; "" when none."""
    value = head_field_value(head, head.lower(), "From")
    if not value:
        return ""
    addresses = getaddresses([value])
    address = addresses[0][1] if addresses else ""
    _, at, domain = address.rpartition("@")
    if not at:
        return ""
    domain = domain.strip().rstrip(".").lower()
    try:
        # d= is in A-labels (RFC 6376 3.5, RFC 8616 4): a U-label From: domain (SMTPUTF8) matches its
        # entry through the same form.
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


class RelaxedBodyHash:
    """SHA-256 of a body in relaxed canonicalization (RFC 6376 3.4.4), fed in pieces of any size.

    Line ends are those delivery sends: CRLF, and each bare CR or LF as CRLF (a CR at a piece's end may
    be the first half of a CRLF, so it waits for the next). White space runs become one SP, white space at
    a line's end goes, empty lines at the end go (held back until a line with text follows), and a last
    line without its line end gets one. An empty body hashes as "" (RFC 6376 erratum 3192).
    """

    def __init__(self, *, clean: bool = False) -> None:
        self._clean = clean  # postmux.body: CRLF line ends only, known already; nothing to look for
        self._sha = hashlib.sha256()
        self._carry = b""  # the start of a line not yet ended
        self._empty_lines = 0  # empty lines seen and not yet hashed: they count only if text follows

    def update(self, octets: bytes) -> None:
        text = self._carry + octets if self._carry else octets
        cut = text.rfind(b"\n") + 1
        cr = text.rfind(b"\r", cut, len(text) - 1)  # a CR before the last octet ends a line already
        if cr >= 0:
            cut = cr + 1
        self._carry = text[cut:]
        if cut:
            self._lines(text[:cut])

    def digest(self) -> bytes:
        if self._carry:
            carry, self._carry = self._carry, b""
            self._lines(carry if carry.endswith((b"\n", b"\r")) else carry + b"\r\n")
        return self._sha.digest()

    def _lines(self, block: bytes) -> None:
        """Whole lines (`block` ends with a line end)."""
        if not self._clean and has_bare_cr_or_lf(block):
            block = _ANY_LINE_END.sub(b"\r\n", block)
        if b"\t" in block or b"  " in block:  # two searches at memchr speed; the regex costs 10 times more
            block = _WSP_RUN.sub(b" ", block)
        block = block.replace(b" \r\n", b"\r\n")
        text = block.rstrip(b"\r\n")
        if not text:
            self._empty_lines += len(block) // 2
            return
        self._sha.update(b"\r\n" * self._empty_lines + text + b"\r\n")
        self._empty_lines = (len(block) - len(text)) // 2 - 1


def body_hash(data: bytes, start: int, tail: BodyFile | None, *, clean: bool = False) -> bytes:
    """The relaxed body hash of the text from `start` in `data`, then its `tail` read in chunks."""
    hashed = RelaxedBodyHash(clean=clean)
    hashed.update(data[start:])
    if tail is not None:
        for chunk in tail.chunks():
            hashed.update(chunk)
    return hashed.digest()


def header_list(present: Iterable[bytes], headers: Sequence[str], oversign: Sequence[str]) -> list[bytes]:
    """The h= list: each configured field as often as the message has it, the oversigned ones once more."""
    seen: dict[bytes, int] = {}
    for field in present:
        found = field.lower().strip()
        seen[found] = seen.get(found, 0) + 1
    over = {o.lower() for o in oversign}
    names: list[bytes] = []
    for name in dict.fromkeys([*(h.lower() for h in headers), *(o.lower() for o in oversign)]):
        wanted = name.encode("ascii")
        names.extend([wanted] * (seen.get(wanted, 0) + (1 if name in over else 0)))
    return names


_FIELD_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_fields(head: bytes) -> list[list[bytes]]:
    """The header section's fields as [name, value] (value with its folding and CRLF), as a verifier
    reads them: what dkimpy's rfc822_parse does, except for `Name :` (RFC 5322 4.5 obs-optional). That
    parser drops a line starting "From " as an mbox separator, so `From :x` was neither counted in h= nor
    hashed, while Mail::DKIM and OpenDKIM hash it (relaxed canonicalization, RFC 6376 3.4.2, removes the
    white space before the colon): the signature failed at every receiver. A line that is neither a field
    nor a continuation raises dkim.MessageFormatError (the text goes unsigned, said in the log)."""
    fields: list[list[bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise dkim.MessageFormatError("the header section starts with a continuation line")
            fields[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_LINE.match(line)
        if match is None:
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line[:80]!r}")
        fields.append([match.group(1), line[match.end() :] + b"\r\n"])
    return fields


class DkimSigner:
    """Signs a text with the entry its From: domain chooses. Cost: one pass over the body (SHA-256) and,
    per selector, one RSA-2048 (~1 ms) or Ed25519 (~0.1 ms) signature (bench/README.md).
    Thread-safe: it holds nothing per message, and `reconfigure` swaps one tuple."""

    def __init__(self, domains: Sequence[DkimDomain] = (), clock: Callable[[], float] = time.time) -> None:
        self.domains: tuple[DkimDomain, ...] = tuple(domains)
        self.clock = clock

    def reconfigure(self, domains: Sequence[DkimDomain]) -> list[str]:
        before = {(d.domain, tuple(k.name for k in d.keys)) for d in self.domains}
        self.domains = tuple(domains)
        after = {(d.domain, tuple(k.name for k in d.keys)) for d in self.domains}
        # Keys are read again at every reload (config loads them): a rotated file is taken even when
        # its selector's name stayed the same.
        return [f"dkim: {d} selectors {', '.join(s)}" for d, s in sorted(after - before)]

    def signing_domain(self, head: bytes) -> str:
        """The d= a text with this header section would be signed with; "" when it would go unsigned."""
        if not self.domains:
            return ""
        entry = signing_domain(author_domain(head), self.domains)
        return entry.domain if entry is not None else ""

    def signatures(self, data: bytes, tail: BodyFile | None = None, *, clean: bool = True) -> bytes:
        """The DKIM-Signature fields to put before `data` (+ `tail`), one per selector; b"" when the
        From: domain has no entry (and there is no fallback), or the header section does not end in
        `data` (longer than [smtp] spill_bytes: such a message goes unsigned)."""
        if not self.domains:
            return b""
        end = header_section_end(data)
        if tail is not None and end == len(data) and not data.endswith((b"\n\n", b"\r\n\r\n")):
            return b""
        head = data[:end]
        if not clean and has_bare_cr_or_lf(head):
            head = _ANY_LINE_END.sub(b"\r\n", head)
        entry = signing_domain(author_domain(head), self.domains)
        if entry is None:
            return b""
        bh = base64.b64encode(body_hash(data, end, tail, clean=clean))
        return b"".join(self._signature(head, bh, entry, key) for key in entry.keys)

    def _signature(self, head: bytes, bh: bytes, entry: DkimDomain, selector: DkimSelector) -> bytes:
        """One DKIM-Signature field, made as dkimpy's DKIM.sign makes it (its canonicalization, folding
        and header hashing), given the body hash taken here, the signature made by OpenSSL: dkimpy's own
        RSA is pure Python, ~6 ms for RSA-2048 with the GIL held (bench/dkim_sign.py)."""
        present = header_fields(head)
        # RFC 8058 4: List-Unsubscribe and List-Unsubscribe-Post, when present, are signed whatever the
        # entry's list says: a receiver honours one-click only under a signature that covers both.
        wanted = (*entry.headers, *RFC8058_FIELDS)
        include = header_list((name for name, _ in present), wanted, entry.oversign)
        fields = [
            (b"v", b"1"),
            (b"a", selector.key.algorithm.encode()),
            (b"c", b"relaxed/relaxed"),
            (b"d", entry.domain.encode("ascii")),
            (b"s", selector.name.encode("ascii")),
            (b"t", str(int(self.clock())).encode("ascii")),
            (b"h", b" : ".join(include)),  # spaces: fold may break there, never inside a name
            (b"bh", bh),
            # As dkimpy: b= folds onto a line of its own, so that filling it in refolds nothing before it.
            (b"b", b"0" * 60),
        ]
        value = dkim.fold(b"; ".join(b"=".join(x) for x in fields), namelen=len(_FIELD), linesep=b"\r\n")
        value = dkim.RE_BTAG.sub(b"\\1", value)
        hashed = hashlib.sha256()
        headers = _CANON.canonicalize_headers(present)
        dkim.hash_headers(hashed, _CANON, headers, include, (_FIELD, b" " + value), dict(fields))
        fields[-1] = (b"b", base64.b64encode(selector.key.sign(hashed.digest())))
        value = dkim.fold(b"; ".join(b"=".join(x) for x in fields) + b"\r\n", namelen=len(_FIELD))
        return _FIELD + b": " + bytes(value)
