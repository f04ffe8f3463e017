"""VERP return paths: an envelope sender per recipient that says, when a bounce comes back to it, which
message to which recipient bounced (Bernstein's variable envelope return paths).

    b.<queue id>.<mac>.<recipient local part>=<recipient domain>@<return-path domain>

The mac (HMAC-SHA256 of the queue id and the recipient, 80 bits, base32) makes the address unforgeable:
mail to a made-up return path is refused, so nobody can suppress an address or forge a complaint by
writing to the return-path domain. Lower case throughout: some MTAs fold the local part's case on the way.

A recipient whose local part is quoted (`"john doe"@example.com`) or that holds characters no dot-atom may
carry keeps the plain envelope sender: a VERP form of it would need quoting that many bounce senders mangle.
The local part grows past RFC 5321's 64 octets for any recipient past 23 octets (a limit most MTAs do not
enforce, as the RFC itself asks in 4.5.3.1, and postmux's own listener does not: ingress/hygiene.py); the mac
stays, so a truncated one simply fails to match.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from postmux.config import VerpSettings

PREFIX = "b"
# RFC 5322 atext, and any non-ASCII character (RFC 6531's UTF-8 local parts).
_DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*\Z"
)


@dataclass(frozen=True, slots=True)
class ReturnedFor:
    """What a VERP return path names: the message (queue id) and the recipient it was sent to."""

    message_id: str
    recipient: str


class VerpCodec:
    """Makes and reads the return paths of one [verp] configuration."""

    def __init__(self, settings: VerpSettings) -> None:
        self.settings = settings
        self.domain = (settings.domain or "").lower()
        self._secret = settings.secret

    @property
    def enabled(self) -> bool:
        return bool(self.domain)

    def applies_to(self, pool: str) -> bool:
        return self.settings.applies_to(pool)

    def _mac(self, message_id: str, recipient: str) -> str:
        digest = hmac.new(
            self._secret, f"{message_id}\0{recipient.lower()}".encode(), hashlib.sha256
        ).digest()
        return base64.b32encode(digest[:10]).decode().lower()

    def return_path(self, message_id: str, recipient: str) -> str | None:
        """The return path for one recipient of a message, or None when its address cannot carry one."""
        local, at, domain = recipient.rpartition("@")
        if not at or not local or not domain or not _DOT_ATOM.match(local):
            return None
        mac = self._mac(message_id, recipient)
        return f"{PREFIX}.{message_id}.{mac}.{local.lower()}={domain.lower()}@{self.domain}"

    def is_return_address(self, address: str) -> bool:
        return bool(self.domain) and address.rpartition("@")[2].lower().rstrip(".") == self.domain

    def read(self, address: str) -> ReturnedFor | None:
        """The message and recipient a return path names, or None when it is not one of ours."""
        local, _, domain = address.strip("<>").rpartition("@")
        if not self.domain or domain.lower().rstrip(".") != self.domain:
            return None
        parts = local.lower().split(".", 3)
        if len(parts) != 4 or parts[0] != PREFIX:
            return None
        _, message_id, mac, rest = parts
        rcpt_local, eq, rcpt_domain = rest.rpartition("=")
        if not eq or not rcpt_local or not rcpt_domain:
            return None
        recipient = f"{rcpt_local}@{rcpt_domain}"
        if not hmac.compare_digest(mac, self._mac(message_id, recipient)):
            return None
        return ReturnedFor(message_id, recipient)
