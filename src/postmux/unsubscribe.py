"""One-click unsubscribe (RFC 8058, RFC 2369): the signed token, and the two header fields that carry it.

A word of its own, like dkim.py: config loads the secret through it, the acceptor stamps the fields, the
HTTP side (ingress/unsubscribe.py) reads the token back. Deciding only: no I/O but the secret's file.

The token names one recipient, the sender domain it unsubscribes from (the scope), the copy's queue id,
its Message-ID and when it was issued, and carries an HMAC-SHA256 over all of them with a secret kept in
a file: anyone can read a token, no one without the secret can make or alter one. It is
`base64url(JSON) "." base64url(HMAC)`, without padding: URL-safe as it is (RFC 4648 5).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from postmux.headers import has_field

LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
# RFC 8058 4: the DKIM signature must cover both, so a receiver knows the one-click link is the sender's.
SIGNED_FIELDS = (LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST)
ONE_CLICK = "List-Unsubscribe=One-Click"  # RFC 8058 3.1: the field's only value, and the POST's body
SECRET_MIN_BYTES = 32  # HMAC-SHA256's own key size; fewer would be the weak link
LINE_MAX = 998  # RFC 5322 2.1.1: octets in a line, CRLF not counted
MESSAGE_ID_MAX = 128  # a longer Message-ID is left out of the token (the queue id names the copy anyway)
TOKEN_MAX = 2048  # a token longer than this was never made here: refused before any decoding
# The MAC's input starts with a purpose, so the secret signs nothing else that could pass for a token.
_PURPOSE = b"postmux-unsubscribe-v1."


class SecretProblem(ValueError):
    """A secret file that cannot sign tokens: the reason, for the config error that names the file."""


def load_secret(path: str | Path) -> bytes:
    """The secret in the file at `path` (its bytes, white space at the ends taken off): at least 32."""
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as e:
        raise SecretProblem(f"{str(path)!r} cannot be read: {e.strerror or e}") from None
    if len(raw) < SECRET_MIN_BYTES:
        raise SecretProblem(
            f"{str(path)!r} holds {len(raw)} bytes; at least {SECRET_MIN_BYTES} random ones are needed"
            " (e.g. `head -c 48 /dev/urandom | base64 > FILE`)"
        )
    return raw


@dataclass(frozen=True, slots=True)
class Claim:
    """What a token says: who unsubscribes, from which sender domain, off which message, since when."""

    recipient: str
    sender_domain: str
    queue_id: str  # postmux's id of the copy that carried the token
    message_id: str  # its Message-ID field, without <> ("" when it had none)
    issued: int  # Unix time

    def payload(self) -> bytes:
        data = {"r": self.recipient, "d": self.sender_domain, "q": self.queue_id, "t": self.issued}
        if self.message_id:
            data["m"] = self.message_id
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class BadToken(ValueError):
    """A token that was not made with this secret, or was altered, or is unreadable: the reason."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> bytes:
    return hmac.new(secret, _PURPOSE + body.encode("ascii"), hashlib.sha256).digest()


def issue(claim: Claim, secret: bytes) -> str:
    body = _b64(claim.payload())
    return f"{body}.{_b64(_mac(secret, body))}"


def verify(token: str, secrets: tuple[bytes, ...], now: float, max_age_s: float) -> Claim:
    """The claim of a token made with one of `secrets` (the current one first, then any still honoured),
    unaltered, and not older than `max_age_s` (0: no limit). Raises BadToken with the reason."""
    if len(token) > TOKEN_MAX or token.count(".") != 1:
        raise BadToken("not a token")
    body, mac = token.split(".")
    # Compared as text with the one encoding made here: base64 decoding would take other spellings of the
    # same MAC (the last character's unused bits), so one altered character could still pass.
    if not (body + mac).isascii() or not any(hmac.compare_digest(mac, _b64(_mac(s, body))) for s in secrets):
        raise BadToken("the token's signature does not match: forged, altered or cut")
    try:
        data = json.loads(_unb64(body))
        claim = Claim(str(data["r"]), str(data["d"]), str(data["q"]), str(data.get("m", "")), int(data["t"]))
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise BadToken("the token's content is unreadable") from None
    if max_age_s and now - claim.issued > max_age_s:
        raise BadToken("the token has expired")
    return claim


def fields(url_base: str, mailto: str, token: str) -> bytes | None:
    """The two fields to put at the top of the header section (RFC 2369 3.2, RFC 8058 3.1): the HTTPS URI
    first, the mailto second, each on a line of its own; None when the HTTPS URI cannot fit on one line.

    RFC 5322 2.1.1: a line is at most 998 octets, and a URI cannot be folded. A token is ~200 characters
    for everyday addresses, but grows with the recipient's and the domain's length: the HTTPS URI goes on
    a line of its own when it does not fit after the field name, and the mailto URI goes without the token
    (its mail is still told apart by its sender) when that line would be too long.
    """
    https = f"<{url_base}{token}>"
    if 1 + len(https) + 1 > LINE_MAX:
        return None
    head = f"{LIST_UNSUBSCRIBE}: {https}"
    lines = [head if len(head) + 1 <= LINE_MAX else f"{LIST_UNSUBSCRIBE}:\r\n {https}"]
    if mailto:
        # The token in the subject, so the mail taken at that address names what to undo.
        uri = f"<mailto:{mailto}?subject=unsubscribe%20{token}>"
        lines.append(uri if 1 + len(uri) <= LINE_MAX else f"<mailto:{mailto}?subject=unsubscribe>")
    folded = ",\r\n ".join(lines)
    return f"{folded}\r\n{LIST_UNSUBSCRIBE_POST}: {ONE_CLICK}\r\n".encode("ascii")


def has_list_unsubscribe(head: bytes) -> bool:
    """Whether the header section carries a List-Unsubscribe field already (the sender's own)."""
    return has_field(head, "List-Unsubscribe")  # `List-Unsubscribe :` too (RFC 5322 4.5)
