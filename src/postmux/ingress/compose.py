"""What the HTTP submission API takes (shaped like KumoMTA's inject API), and the messages made from it.

Pure: pydantic models of the request, and `compose`, which turns one submitted message into the
envelopes to store. No I/O. The rules are the SMTP side's where they apply (address syntax by
address.py's parser and hygiene.read_path, the size limit, no NUL, lines of at most 998 octets folded as
[smtp] long_lines says, the hop count), and a header field, a name or an address never holds a CR, LF or
NUL (RFC 5322 2.2: a CR or LF there would start a field of the client's choosing, header injection).

Content is either raw RFC 5322 text (its lines may end in LF or CRLF; they are stored with CRLF) or
structured (from, reply_to, subject, text_body, html_body, headers, attachments), built into MIME with the
stdlib email package. Substitutions (`{{name}}`) fill the subject and bodies (or the raw text) for each
recipient; recipients whose message comes out the same share one stored message, the others get one each.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parsedate_to_datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from postmux.address import Role, mailbox_key
from postmux.envelope import LABEL_NAME_MAX, LABEL_VALUE_MAX, LABELS_MAX, Envelope, domain_of
from postmux.headers import header_section_end
from postmux.ingress.folding import FOLD_WIDTH, fold_long_lines
from postmux.ingress.hygiene import read_path, received_count

# Tags and metadata ride on every event of the message: bounded as envelope.py bounds them (SMTP's
# X-Postmux-Tag and X-Postmux-Meta are cut to the same limits; here more is refused).
MAX_TAGS = LABELS_MAX
TAG_NAME_MAX = LABEL_NAME_MAX
TAG_VALUE_MAX = LABEL_VALUE_MAX
SUBSTITUTION_VALUE_MAX = 65_536
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")  # a tag, metadata or substitution name
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]{1,64})\s*\}\}")
# RFC 5322 2.2 / 3.6.8: a field name is printable ASCII but ":" (ftext, %d33-57 / %d59-126).
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}\Z")
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")
# Fields the email package writes from the structure: set them through it, not through `headers`.
_STRUCTURAL = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
# Fields whose values are addresses (RFC 5322 3.6.2, 3.6.3, 3.6.6): one given in `headers` whose address is
# not ASCII makes the message SMTPUTF8 (RFC 6532 3.2), where 7-bit would mangle it into an encoded word,
# which RFC 2047 5 forbids in an address.
_ADDRESS_FIELDS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc"}
    | {f"resent-{name}" for name in ("from", "sender", "to", "cc", "bcc")}
)

# Every request model's config. str_min_length=0 refuses nothing by itself, but a length constraint makes
# pydantic check that each string is valid Unicode: JSON may escape a lone surrogate ("\udcfc", no
# character at all, RFC 7493 2.1), and such text was a 500 from the email package, or went into events that
# no UTF-8 writer could write. Now it is a 422 naming the field (string_unicode), the keys of tags and
# metadata included; the published schema is unchanged.
_REQUEST = ConfigDict(extra="forbid", frozen=True, str_min_length=0)


class BadInput(ValueError):
    """Input refused: `field` names it as the request spells it (`recipients[1].email`), `status` is the
    HTTP status to answer (422; 413 for a message over the size limit)."""

    def __init__(self, field: str, reason: str, status: int = 422) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status = status


def _one_line(value: str) -> str:
    """A value bound for a header field or an envelope: no CR, LF or NUL (RFC 5322 2.2, header injection)."""
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("CR, LF and NUL are not allowed here (they would end the header field)")
    return value


def _address(value: str, role: Role) -> str:
    _one_line(value)
    path = read_path(f"<{value}>", role, smtputf8=True)
    if isinstance(path, str):
        raise ValueError(path.split(" ", 2)[-1])  # the SMTP reply's text, without its codes
    if path.mailbox is None:  # "" read as the null path <>: no sender, and no recipient, has it here
        raise ValueError("an address with a domain is needed here (the null path <> is not one)")
    return path.mailbox.text


def field_addresses(value: str) -> list[str]:
    """The addresses in an address field's value ("Ann <a@x>, b@y" -> ["a@x", "b@y"]), as the email
    package reads them; an entry that is not an address comes back as it is, without an "@"."""
    return [address for _, address in getaddresses([value]) if address]


def _mailbox_field(name: str, address: str) -> str:
    """A mailbox as a header field's value (RFC 5322 3.4). An address that is not ASCII is written as it is,
    for an SMTPUTF8 message (RFC 6532 3.2): formataddr takes only ASCII (a 500 before), and encodes a
    display name that is not (RFC 2047), which stays so for an ASCII address."""
    if address.isascii():
        return formataddr((name, address))
    if not name:
        return address
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


def _labels(value: dict[str, str]) -> dict[str, str]:
    """Tags and metadata: bounded string maps, one line each (they may go into header fields and events)."""
    if len(value) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} entries")
    for name, text in value.items():
        if not _NAME.match(name):
            raise ValueError(f"{name[:70]!r} is not a name: 1-{TAG_NAME_MAX} of letters, digits and '_.-'")
        if len(text) > TAG_VALUE_MAX:
            raise ValueError(f"the value of {name!r} is longer than {TAG_VALUE_MAX} characters")
        _one_line(text)
    return value


class Mailbox(BaseModel):
    """A From or Reply-To mailbox: an address and a display name."""

    model_config = _REQUEST
    email: str = Field(max_length=320, examples=["news@example.com"])
    name: str = Field(default="", max_length=256, examples=["Example News"])

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        return _address(v, Role.SENDER)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _one_line(v)


class Recipient(BaseModel):
    model_config = _REQUEST
    email: str = Field(max_length=320, examples=["alice@example.net"])
    name: str = Field(default="", max_length=256, examples=["Alice"])
    # Values for this recipient's {{name}} placeholders, over the message's own `substitutions`.
    substitutions: dict[str, str] = Field(default_factory=dict, examples=[{"first_name": "Alice"}])

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        return _address(v, Role.RECIPIENT)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _one_line(v)

    @field_validator("substitutions")
    @classmethod
    def _substitutions(cls, v: dict[str, str]) -> dict[str, str]:
        return _substitution_map(v)


def _substitution_map(v: dict[str, str]) -> dict[str, str]:
    for name, text in v.items():
        if not _NAME.match(name):
            raise ValueError(f"{name[:70]!r} is not a name: 1-64 of letters, digits and '_.-'")
        if len(text) > SUBSTITUTION_VALUE_MAX or "\x00" in text:
            raise ValueError(f"the value of {name!r} is longer than {SUBSTITUTION_VALUE_MAX} or holds NUL")
    return v


class Attachment(BaseModel):
    model_config = _REQUEST
    data: str = Field(description="The attachment's octets, base64 (RFC 4648 4).", examples=["aGVsbG8="])
    content_type: str = Field(default="application/octet-stream", examples=["text/plain"])
    file_name: str = Field(default="", max_length=255, examples=["hello.txt"])
    # With a content_id the attachment is inline, for the HTML body to show as <img src="cid:...">.
    content_id: str = Field(default="", max_length=255, examples=[""])

    @field_validator("data")
    @classmethod
    def _base64(cls, v: str) -> str:
        try:
            base64.b64decode("".join(v.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64 (RFC 4648 4)") from None
        return v

    @field_validator("content_type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not _MIME_TYPE.match(v):
            raise ValueError("not a MIME type such as 'application/pdf' (RFC 2045 5.1)")
        if v.lower().startswith(("multipart/", "message/")):
            # Opaque octets sent base64 cannot be either: a multipart needs its boundary (RFC 2046 5.1.1),
            # and neither may be base64 (RFC 2045 6.4). Such a structure is sent as raw content.
            raise ValueError("multipart/* and message/* are structure, not an attachment: send raw content")
        return v

    @field_validator("file_name", "content_id")
    @classmethod
    def _line(cls, v: str) -> str:
        _one_line(v)
        if any(c in v for c in '<>"\\'):
            raise ValueError('<, >, " and \\ are not allowed here')
        return v

    def octets(self) -> bytes:
        return base64.b64decode("".join(self.data.split()))


class Content(BaseModel):
    """A message to build: postmux writes the MIME structure (RFC 2045, 2046) with the email package."""

    model_config = ConfigDict(**_REQUEST, populate_by_name=True)
    from_: Mailbox = Field(alias="from")
    reply_to: Mailbox | None = None
    subject: str = Field(default="", max_length=998, examples=["Hello {{first_name}}"])
    text_body: str = Field(default="", examples=["Hi {{first_name}}, your order has shipped."])
    html_body: str = Field(default="", examples=["<p>Hi {{first_name}}, your order has shipped.</p>"])
    # More header fields, name -> value; one given here replaces the one postmux would write (To, Date,
    # Message-ID...). Content-Type, Content-Transfer-Encoding and MIME-Version are the structure's.
    headers: dict[str, str] = Field(default_factory=dict, examples=[{"X-Campaign": "spring"}])
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        return _one_line(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name[:80]!r} is not a header field name (RFC 5322 3.6.8)")
            if name.lower() in _STRUCTURAL:
                raise ValueError(f"{name} is written by postmux from the content's structure")
            try:
                _one_line(value)
            except ValueError:
                raise ValueError(f"the value of {name}: CR, LF and NUL are not allowed") from None
            if name.lower() == "date" and not _is_date(value):
                # The email package would write the field empty: the client's value lost, and a
                # message without a valid origination date (RFC 5322 3.6.1).
                raise ValueError("the value of Date is not a date-time (RFC 5322 3.3)")
        return v

    def needs_smtputf8(self) -> bool:
        """Whether an address the message's header section will hold is not ASCII (RFC 6532 3.2)."""
        mailboxes = [self.from_] + ([self.reply_to] if self.reply_to is not None else [])
        if any(not m.email.isascii() for m in mailboxes):
            return True
        return any(
            not address.isascii()
            for name, value in self.headers.items()
            if name.lower() in _ADDRESS_FIELDS
            for address in field_addresses(value)
        )


def _is_date(value: str) -> bool:
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    return True


def _content_kind(value: Any) -> str:
    return "raw" if isinstance(value, str) else "structured"


MessageContent = Annotated[
    Annotated[str, Tag("raw")] | Annotated[Content, Tag("structured")],
    Discriminator(_content_kind),
]


class Message(BaseModel):
    """One message to send (KumoMTA's inject request): to each recipient, from envelope_sender."""

    model_config = _REQUEST
    envelope_sender: str = Field(max_length=320, examples=["bounces@example.com"])
    recipients: list[Recipient] = Field(min_length=1, max_length=10_000)
    content: MessageContent = Field(
        description="Raw RFC 5322 text (lines end in LF or CRLF), or a structured message to build."
    )
    substitutions: dict[str, str] = Field(default_factory=dict, examples=[{"shop": "Example Shop"}])
    pool: str | None = Field(default=None, max_length=128, examples=[None])
    tags: dict[str, str] = Field(default_factory=dict, examples=[{"campaign": "spring"}])
    metadata: dict[str, str] = Field(default_factory=dict, examples=[{"order": "1234"}])

    @field_validator("envelope_sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        return _address(v, Role.SENDER)

    @field_validator("substitutions")
    @classmethod
    def _substitutions(cls, v: dict[str, str]) -> dict[str, str]:
        return _substitution_map(v)

    @field_validator("tags", "metadata")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _labels(v)


class Batch(BaseModel):
    """Several messages in one request: validated and stored together, all or none."""

    model_config = _REQUEST
    messages: list[Message] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Rules:
    """What the SMTP side holds a message to, from [smtp] (the same limits for both ways in)."""

    max_message_size: int
    max_recipients: int
    max_hops: int
    fold: bool  # [smtp] long_lines = "fold": long lines are broken, not refused
    hostname: str  # the right-hand side of the Message-IDs postmux writes


@dataclass(frozen=True, slots=True)
class Composed:
    """One message to store: its envelope sender, its recipients, and its text."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool


def compose(message: Message, rules: Rules, now: float, where: str = "") -> list[Composed]:
    """The messages to store for one submitted message: one, or one per group of recipients whose
    substituted text is the same. Raises BadInput naming the field (prefixed by `where`)."""
    if len(message.recipients) > rules.max_recipients:
        raise BadInput(
            f"{where}recipients", f"more than {rules.max_recipients} recipients ([smtp] max_recipients)"
        )
    smtputf8 = not message.envelope_sender.isascii() or any(not r.email.isascii() for r in message.recipients)
    groups: dict[tuple[str, ...], list[Recipient]] = {}
    templated = bool(message.substitutions) or any(r.substitutions for r in message.recipients)
    mailboxes: set[str] = set()
    for i, rcpt in enumerate(message.recipients):
        if (mailbox := mailbox_key(rcpt.email)) in mailboxes:
            continue  # the same mailbox again goes once, its first entry's, as at SMTP (ingress/smtp.py)
        mailboxes.add(mailbox)
        values = {**message.substitutions, **rcpt.substitutions}
        groups.setdefault(
            _rendered(message.content, rcpt, values, templated, f"{where}recipients[{i}]"), []
        ).append(rcpt)
    out: list[Composed] = []
    for parts, rcpts in groups.items():
        if isinstance(message.content, str):
            data = _raw_text(parts[0], rules, now, f"{where}content")
        else:
            smtputf8 = smtputf8 or message.content.needs_smtputf8()
            data = _built(message.content, parts, rules, now, smtputf8)
        out.append(
            Composed(
                message.envelope_sender, tuple(r.email for r in rcpts), _checked(data, rules, where), smtputf8
            )
        )
    return out


def _substitute(text: str, values: Mapping[str, str]) -> str:
    """{{name}} becomes its value; a name with no value becomes "" (as an undefined Jinja variable)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)


def _rendered(
    content: str | Content, rcpt: Recipient, values: Mapping[str, str], templated: bool, where: str
) -> tuple[str, ...]:
    """What makes this recipient's message: the substituted text, or subject, bodies and To."""
    fill: Callable[[str], str] = (lambda t: _substitute(t, values)) if templated else (lambda t: t)
    if isinstance(content, str):
        return (fill(content),)
    subject = fill(content.subject)
    if "\r" in subject or "\n" in subject:
        raise BadInput(f"{where}.substitutions", "a value put into the subject holds CR or LF")
    has_to = any(name.lower() == "to" for name in content.headers)
    to = "" if has_to else _mailbox_field(rcpt.name, rcpt.email)
    return (subject, fill(content.text_body), fill(content.html_body), to)


def _raw_text(text: str, rules: Rules, now: float, where: str) -> bytes:
    """Raw content as stored: lines end in CRLF, a Message-ID and a Date added if it has none."""
    if "\x00" in text:
        raise BadInput(where, "NUL is not allowed in a message (RFC 5322 2.3)")
    data = text.replace("\r\n", "\n")
    if "\r" in data:
        raise BadInput(where, "a CR not followed by LF: lines end with LF or CRLF (RFC 5322 2.3)")
    raw = data.replace("\n", "\r\n").encode("utf-8")
    head = raw[: header_section_end(raw)].lower()
    added = b""
    if not (head.startswith(b"message-id:") or b"\r\nmessage-id:" in head):
        added += f"Message-ID: {make_msgid(domain=rules.hostname)}\r\n".encode()
    if not (head.startswith(b"date:") or b"\r\ndate:" in head):
        added += f"Date: {formatdate(now)}\r\n".encode()
    return added + raw


def _built(content: Content, parts: tuple[str, ...], rules: Rules, now: float, smtputf8: bool) -> bytes:
    """The structured content as MIME, with CRLF line ends (RFC 5322 2.1) and 7-bit bodies."""
    subject, text_body, html_body, to = parts
    mime = EmailMessage(policy=(policy.SMTPUTF8 if smtputf8 else policy.SMTP).clone(cte_type="7bit"))
    given = {name.lower() for name in content.headers}
    mime["From"] = _mailbox_field(content.from_.name, content.from_.email)
    if content.reply_to is not None and "reply-to" not in given:
        mime["Reply-To"] = _mailbox_field(content.reply_to.name, content.reply_to.email)
    if to:
        mime["To"] = to
    if "subject" not in given:
        mime["Subject"] = subject
    if "date" not in given:
        mime["Date"] = formatdate(now)
    if "message-id" not in given:
        mime["Message-ID"] = make_msgid(domain=rules.hostname)
    for name, value in content.headers.items():
        if name.lower() == "from":
            del mime["From"]
        mime[name] = value
    if text_body or not html_body:
        mime.set_content(text_body)
        if html_body:
            mime.add_alternative(html_body, subtype="html")
    else:
        mime.set_content(html_body, subtype="html")
    _attach(mime, content, html_body)
    return mime.as_bytes()


def _attach(mime: EmailMessage, content: Content, html_body: str) -> None:
    for attachment in content.attachments:
        maintype, subtype = attachment.content_type.lower().split("/", 1)
        octets = attachment.octets()
        name = attachment.file_name or None
        if attachment.content_id and html_body:
            html = mime if mime.get_content_type() == "text/html" else mime.get_body(("html",))
            assert isinstance(html, EmailMessage)
            html.add_related(
                octets,
                maintype,
                subtype,
                cid=f"<{attachment.content_id}>",
                filename=name,
                disposition="inline",
            )
        else:
            mime.add_attachment(octets, maintype, subtype, filename=name)


def _checked(data: bytes, rules: Rules, where: str) -> bytes:
    """The SMTP side's checks on a message's text: line length, hop count, size."""
    if max(map(len, data.split(b"\r\n"))) > FOLD_WIDTH:
        if not rules.fold:
            raise BadInput(f"{where}content", f"a line longer than {FOLD_WIDTH} octets (RFC 5322 2.1.1)")
        data = fold_long_lines(data)
    if received_count(data) >= rules.max_hops:
        raise BadInput(f"{where}content", "too many Received fields: a routing loop (RFC 5321 6.3)")
    if len(data) > rules.max_message_size:
        raise BadInput(
            f"{where}content",
            f"the message is {len(data)} octets, over the limit of {rules.max_message_size}",
            status=413,
        )
    return data


def sender_domain_allowed(address: str, allowed: tuple[str, ...]) -> bool:
    """Whether an address's domain is one of `allowed` ("example.com", or "*.example.com": subdomains)."""
    if not allowed:
        return True
    domain = domain_of(address)
    return any(domain == d or (d.startswith("*.") and domain.endswith(d[1:])) for d in allowed)


def as_envelope(composed: Composed, message: Message, client_ip: str, key_name: str) -> Envelope:
    return Envelope(
        sender=composed.sender,
        recipients=composed.recipients,
        data=composed.data,
        client_ip=client_ip,
        smtputf8=composed.smtputf8,
        protocol="HTTP",
        auth_user=key_name,
        tags=dict(message.tags),
        metadata=dict(message.metadata),
    )
