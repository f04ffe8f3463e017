"""Envelope, recipients and message ids: the words every other module speaks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# The routing domain of an address, split as the parser splits it: every room asks it from here.
from postmux.address import domain_of as domain_of
from postmux.body import BodyFile, text_size

# Bounds on the sender's tags and metadata (the API refuses more; over SMTP the rest are ignored): they
# ride on every event of the message, so they stay small.
LABELS_MAX = 32  # entries of each
LABEL_NAME_MAX = 64
LABEL_VALUE_MAX = 1024


def new_message_id() -> str:
    """A sortable, unique queue id: 12 hex digits of microseconds since the epoch, then 8 random."""
    return f"{time.time_ns() // 1000:012x}{os.urandom(4).hex()}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a client handed us: sender, recipients and the message bytes exactly as received.

    The bytes are never re-serialised (a re-encoded header breaks DKIM signatures made upstream).
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    client_ip: str = ""
    smtputf8: bool = False
    helo: str = ""
    protocol: str = "ESMTP"
    auth_user: str = ""  # who the client authenticated as (SMTP AUTH); empty: not authenticated
    # The sender's labels and opaque values for the message (the API's tags and metadata, X-Postmux-Tag
    # and X-Postmux-Meta over SMTP): kept with it and put on every event about it (events/types.py).
    tags: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # The Message-ID header field's value without <>, found at accept: for events ("" when there is none).
    message_id_header: str = ""
    # The rest of a long text, in a file (postmux.body): the text is `data` then `tail`.
    tail: BodyFile | None = None
    # Ingress found only CRLF line ends and no line starting with "." (postmux.body): sent as it is.
    clean: bool = False

    @property
    def size(self) -> int:
        return text_size(self.data, self.tail)

    @property
    def sender_domain(self) -> str:
        return domain_of(self.sender)
