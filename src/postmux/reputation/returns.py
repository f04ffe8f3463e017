"""Mail that comes back: delivery status notifications and complaint reports sent to the return-path domain.

A receiver that took a message and later could not deliver it sends a DSN (RFC 3464: multipart/report,
report-type=delivery-status; for SMTPUTF8 mail, RFC 6533's message/global-delivery-status) to the envelope
sender - with [verp], a return path that names the message and the recipient (reputation/verp.py). A
mailbox provider's feedback loop sends an ARF report (RFC 5965: report-type=feedback-report) when a
recipient marks the message as spam, to the return path or to an address registered with it; the original
message rides along, and its Return-Path field holds the return path.

Reading (`read_report`) is apart from acting (`ReturnedMail.take`): a DSN's per-recipient blocks, an ARF
report's fields, and, for the many bounces that are no DSN at all (old qmail, Exchange's, vacation-style
texts), GNU Mailman's detectors (flufl.bounce). What it finds becomes events - `Bounce` with
`tags.async = "true"`, `Complaint` - which the suppression list and the reputation breaker act on, and
`Feedback` (an ARF report that calls the message no abuse: not-spam, auth-failure), which nothing acts on.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import email.utils
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog
from flufl.bounce import all_failures

from postmux.envelope import Envelope, domain_of
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.reputation.bounces import reply_from_dsn
from postmux.reputation.verp import ReturnedFor, VerpCodec

log = structlog.get_logger("postmux.returns")

# "delivered": a DSN block whose Action is delivered, relayed or expanded (nothing went wrong), kept only
# so that a DSN about several recipients can be told apart for the one the return path names (`match`).
ReportKind = Literal["bounce", "delayed", "complaint", "delivered"]
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
DSN_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})


@dataclass(frozen=True, slots=True)
class Report:
    """One recipient's fate as the returned mail tells it."""

    kind: ReportKind
    recipient: str = ""  # as reported (Final-Recipient, Original-Rcpt-To); "" when the report hides it
    status: str = ""  # the enhanced status code, "5.1.1"
    diagnostic: str = ""  # what the receiver said ("550 5.1.1 <x>: user unknown")
    reporting_mta: str = ""
    source_ip: str = ""  # ARF: the IP the reported message came from
    feedback_type: str = ""  # ARF: abuse, fraud, virus, other, not-spam, auth-failure ("" when missing)
    auth_failure: str = ""  # RFC 6591 reports: the Auth-Failure field, "dkim", "spf", ...
    return_path: str = ""  # the original message's Return-Path, when the report carries it
    original_recipient: str = ""  # a DSN block's Original-Recipient, when it has one

    def reply(self) -> Reply:
        """The receiver's reply as postmux's events carry it (bounces.reply_from_dsn)."""
        reply = reply_from_dsn(self.status, self.diagnostic)
        if reply.text:
            return reply
        said = f"reported by {self.reporting_mta}" if self.reporting_mta else "returned without a reason"
        return Reply(reply.code, reply.enhanced_code, said)


class _Policy(email.policy.Compat32):
    """compat32, the most forgiving parser (bounce texts are often malformed, RFC 5322 or not), except that
    a header field is always read as a str.

    compat32 hands out a field with 8-bit octets as an `email.header.Header` of charset unknown-8bit, which
    third-party code does not expect (flufl.bounce's detectors call `.lower()` on it and raise). Raw UTF-8
    in a header field is normal in SMTPUTF8 mail (RFC 6532 3.2), so the octets are read as UTF-8, any
    that are not valid UTF-8 as U+FFFD: the field stays readable and nothing downstream sees a Header.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        if isinstance(value, str):
            # The parser keeps octets past 127 as lone surrogates (surrogateescape): back to the octets.
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return str(value)


_POLICY = _Policy()

# The types of reports about SMTPUTF8 mail (RFC 6533 6): the DSN fields in UTF-8, the returned headers, and
# the returned message (RFC 6532 3.7). Unlike message/delivery-status and message/rfc822, each may come in
# any transfer encoding, base64 and quoted-printable included.
_GLOBAL_DSN = "message/global-delivery-status"
_GLOBAL_LEAVES = frozenset({_GLOBAL_DSN, "message/global-headers", "message/global"})


class _ReportMessage(email.message.Message):
    """A Message whose RFC 6533 parts the parser keeps as they are, to be decoded and read here.

    The standard library's parser takes every message/* part but message/delivery-status for one embedded
    RFC 5322 message, which is wrong for these: a message/global-delivery-status is blocks of fields, and
    either of them may be base64 or quoted-printable, which parsed as a message is noise. Called a leaf
    (maintype "application") for the parser's sake, the part keeps its body, and `get_payload(decode=True)`
    undoes its transfer encoding. `get_content_type()` still gives the real type.
    """

    def get_content_maintype(self) -> str:
        if self.get_content_type() in _GLOBAL_LEAVES:
            return "application"
        return super().get_content_maintype()


def _parse(text: bytes) -> email.message.Message:
    return email.message_from_bytes(text, _ReportMessage, policy=_POLICY)


def _field(headers: email.message.Message, name: str) -> str:
    value = headers.get(name, "")
    return " ".join(str(value).split())


def _inner(part: email.message.Message) -> list[email.message.Message]:
    """The header blocks or messages a message/* part holds (the stdlib parses them into Messages)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [m for m in payload if isinstance(m, email.message.Message)]
    raw = part.get_payload(decode=True)
    return [_parse(raw)] if isinstance(raw, bytes) and raw else []


# RFC 6533 3: a utf-8 address may carry characters as "\\x{HEX}" (utf-8-addr-xtext, -unitext).
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _typed(value: str) -> str:
    """An address-type field ("rfc822; user@example.com", RFC 6533's "utf-8; jörg@example.com") without
    its type."""
    kind, typed, address = value.partition(";")
    address = (address if typed else kind).strip().strip("<>")
    if kind.strip().lower() == "utf-8":
        address = _EMBEDDED.sub(_unescaped, address)
    return address


def _unescaped(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else m.group(0)


def _header_blocks(raw: bytes) -> list[email.message.Message]:
    """Blocks of header fields separated by blank lines (RFC 3464 2.1; RFC 6533 keeps the layout)."""
    return [_parse(b + b"\r\n") for b in re.split(rb"(?:\r?\n){2,}", raw.strip(b"\r\n")) if b.strip()]


def read_report(text: bytes) -> list[Report]:
    """What a returned message says, recipient by recipient (empty: nothing we can use)."""
    msg = _parse(text)
    param = msg.get_param("report-type", "", header="content-type")
    report_type = email.utils.collapse_rfc2231_value(param).lower() if param else ""
    if msg.get_content_type() == "multipart/report" and report_type == "feedback-report":
        return _complaints(msg)
    # RFC 6533 keeps report-type=delivery-status for a global DSN; "global-delivery-status" is taken too.
    if msg.get_content_type() == "multipart/report" and report_type in DSN_REPORT_TYPES:
        found = _dsn(msg)
        if found:
            return found
    return _detected(msg)


def _detected(msg: email.message.Message) -> list[Report]:
    """What GNU Mailman's detectors find in a bounce that is no DSN; [] when they find nothing or fail.

    flufl.bounce's `all_failures` logs and re-raises any exception of one of its detectors (a text with no
    From: field, a truncated report), which would abort the whole read. The same text fails the same way
    every time, so a failure is "nothing found": the report is logged and dropped, and answered 250; a 451
    (RFC 5321 4.2.1: the command may succeed later) would only make the reporter send it again for days.
    """
    try:
        temporary, permanent = all_failures(msg)
    except Exception as e:  # third-party heuristics: any bug of theirs means "nothing read"
        log.warning("bounce detectors could not read a returned message", error=f"{type(e).__name__}: {e}")
        return []
    # No status to go by: a permanent failure is 5.0.0, a temporary one 4.0.0 (RFC 3463 X.0.0).
    return [Report("bounce", _text(a), "5.0.0") for a in sorted(permanent)] + [
        Report("delayed", _text(a), "4.0.0") for a in sorted(temporary)
    ]


def _text(address: bytes | str) -> str:
    return address.decode(errors="replace") if isinstance(address, bytes) else str(address)


def _blocks_of(msg: email.message.Message, *content_types: str) -> list[email.message.Message]:
    """The header blocks of the report's (first) machine-readable part of one of `content_types`, else []."""
    part = next((p for p in msg.walk() if p.get_content_type() in content_types), None)
    if part is None:
        return []
    if part.get_content_type() == _GLOBAL_DSN:  # kept whole by the parser (_ReportMessage)
        raw = part.get_payload(decode=True)
        return _header_blocks(raw) if isinstance(raw, bytes) else []
    return _inner(part)


def _dsn(msg: email.message.Message) -> list[Report]:
    """RFC 3464 2: a per-message block (Reporting-MTA) and a block per recipient; for SMTPUTF8 mail the
    same blocks in UTF-8, in a message/global-delivery-status part (RFC 6533 3 and 6)."""
    blocks = _blocks_of(msg, "message/delivery-status", _GLOBAL_DSN)
    if not blocks:
        return []
    reporting = _typed(_field(blocks[0], "Reporting-MTA"))
    reports = []
    for block in blocks[1:]:
        action = _field(block, "Action").lower()
        kind: ReportKind | None = (
            "bounce"
            if action == "failed"
            else "delayed"
            if action == "delayed"
            else "delivered"
            if action in ("delivered", "relayed", "expanded")
            else None
        )
        if kind is None:
            continue
        original = _typed(_field(block, "Original-Recipient"))
        recipient = _typed(_field(block, "Final-Recipient")) or original
        m = _STATUS.search(_field(block, "Status"))
        status = m.group(0) if m else ""
        diagnostic = _field(block, "Diagnostic-Code")
        reports.append(
            Report(
                kind,
                recipient,
                status,
                diagnostic,
                reporting,
                return_path=_original_return_path(msg),
                original_recipient=original,
            )
        )
    return reports


# RFC 5965 7.3's Feedback Event Types that say a person or a system called the message abuse: spam
# (`abuse`), phishing (`fraud`), malware (`virus`). These are complaints: the recipient is suppressed and the
# report counts toward the reputation breaker's complaint rate (the 0.3% Gmail and Yahoo hold bulk senders
# to). The others are not, whatever the report's path:
# - `not-spam` says the reporter does NOT consider the message spam (it undoes a spam verdict): suppressing
#   that recipient, or counting it as a complaint, is the opposite of what it says;
# - `auth-failure` (RFC 6591, RFC 6650) reports an SPF/DKIM/DMARC failure of the message: about the sender's
#   authentication, not about the recipient, who asked for nothing;
# - `other` ("any other feedback that does not fit into other registered types"): the reporter chose not to
#   say abuse. Suppression for ever and a lane's suspension need a report that says it; an operator sees
#   these as Feedback events and can act on them;
# - types outside the registry (old drafts' opt-out, miscategorized): the same, for the same reason.
# A report with no Feedback-Type at all is taken as `abuse`: RFC 5965 3.1 requires the field, so it comes
# from a sloppy feedback loop, and feedback loops send reports when a user presses "this is spam" (RFC 6449);
# treating it as one costs one recipient, not treating it keeps mailing someone who complained.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus"})


def is_complaint(feedback_type: str) -> bool:
    """Whether an ARF report of this Feedback-Type (lower case, "" when missing) is a complaint."""
    return not feedback_type or feedback_type in COMPLAINT_TYPES


def _complaints(msg: email.message.Message) -> list[Report]:
    """RFC 5965 3.1: the machine-readable part's fields; the original's Return-Path names our message."""
    blocks = _blocks_of(msg, "message/feedback-report")
    if not blocks:
        return []
    fields = blocks[0]
    return [
        Report(
            "complaint",
            _typed(_field(fields, "Original-Rcpt-To")),
            feedback_type=_field(fields, "Feedback-Type").lower().split(";")[0].strip(),
            auth_failure=_field(fields, "Auth-Failure").lower(),
            reporting_mta=_field(fields, "Reporting-MTA") or _field(fields, "User-Agent"),
            source_ip=_field(fields, "Source-IP"),
            return_path=_original_return_path(msg),
        )
    ]


# The returned original or its headers: RFC 3462 / 6522 text/rfc822-headers, message/rfc822 (RFC 5965
# ARF), and for SMTPUTF8 mail RFC 6533 6 message/global-headers and RFC 6532 3.7 message/global.
_ORIGINAL_TYPES = frozenset(
    {
        "message/rfc822",
        "message/rfc822-headers",
        "text/rfc822-headers",
        "message/global",
        "message/global-headers",
    }
)


def _original_return_path(msg: email.message.Message) -> str:
    """The Return-Path of the original message (or its header section) that a report carries."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in _ORIGINAL_TYPES:
            inner = _inner(part)
            return _typed(_field(inner[0], "Return-Path")) if inner else ""
    return ""


@dataclass(frozen=True, slots=True)
class Matched:
    report: Report
    sent: ReturnedFor


def match(reports: Iterable[Report], envelope_recipients: Iterable[str], codec: VerpCodec) -> list[Matched]:
    """Each report tied to the message and recipient it is about, through a VERP return path: the one the
    report was sent to, else the one in the original's Return-Path. A report naming another recipient than
    the return path does (a forwarded address) is still about the return path's recipient.

    One outcome per recipient (RFC 3464 2.3: a block per recipient): a DSN with several blocks (a forward,
    a list's expansion) gives at most one per message and recipient, that of the block naming the return
    path's recipient (Final-Recipient or Original-Recipient) if one does, whatever it says (`delivered`
    too: nothing to act on), else the worst of the others (failed before delayed, 5.x.x before 4.x.x)."""
    sent_to = [s for s in (codec.read(r) for r in envelope_recipients) if s is not None]
    chosen: dict[tuple[str, str], Matched] = {}
    for report in reports:
        sent = codec.read(report.return_path) if report.return_path else None
        if sent is None and len(sent_to) == 1:
            sent = sent_to[0]
        if sent is None:
            sent = next((s for s in sent_to if s.recipient == report.recipient.lower()), None)
        if sent is None:
            continue
        found, key = Matched(report, sent), (sent.message_id, sent.recipient)
        if key not in chosen or _rank(found) > _rank(chosen[key]):
            chosen[key] = found
    return list(chosen.values())


_SEVERITY = {"delivered": 0, "delayed": 1, "bounce": 2, "complaint": 3}


def _rank(m: Matched) -> tuple[bool, int, bool]:
    """Which of the reports about one message and recipient tells its outcome: the higher the better."""
    r = m.report
    own = m.sent.recipient in {r.recipient.lower(), r.original_recipient.lower()}
    return own, _SEVERITY[r.kind], r.status.startswith("5")


Classify = Callable[[Reply], str]
Destination = Callable[[str], str]  # a recipient domain -> its destination (a provider, else the domain)
SenderOf = Callable[[str], tuple[str, str] | None]  # a source IP -> (pool, member) sending from it
# Reports are short; a "report" of megabytes is something else, and only its head is read.
MAX_REPORT_OCTETS = 1 << 20


class ReturnedMail:
    """Reads mail sent to the return-path domain into the events it tells of (the acceptor records and
    emits them: the suppression list first, so a 250 means the entries are on disk)."""

    def __init__(
        self,
        codec: VerpCodec,
        destination: Destination,
        sender_of: SenderOf = lambda ip: None,
        classify: Classify = lambda reply: "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec = codec
        self.destination = destination
        self.sender_of = sender_of
        self.classify = classify
        self.clock = clock

    def takes(self, envelope: Envelope) -> bool:
        """Whether this is returned mail: every recipient is at the return-path domain."""
        return bool(envelope.recipients) and all(self.codec.is_return_address(r) for r in envelope.recipients)

    def read(self, envelope: Envelope) -> list[Event]:
        """Read and match; returns the events. The text's file, if it had one, is removed."""
        text = envelope.data
        if envelope.tail is not None:
            text += envelope.tail.head(max(0, MAX_REPORT_OCTETS - len(text)))
            with contextlib.suppress(OSError):
                os.unlink(envelope.tail.path)
        try:
            reports = read_report(text[:MAX_REPORT_OCTETS])
            matched = match(reports, envelope.recipients, self.codec)
        except Exception:
            # Reading is pure (the text is in memory): a text that cannot be read now never will be, so it
            # is logged and dropped ([verp] in docs/configuration.md) and answered 250, never a 451 that
            # the reporter would retry for its whole queue lifetime (RFC 5321 4.2.1).
            log.exception("returned mail could not be read: dropped", client=envelope.client_ip)
            return []
        now = self.clock()
        events = [e for m in matched if (e := self._event(m, envelope, now)) is not None]
        log.info(
            "returned mail taken",
            client=envelope.client_ip,
            reports=len(reports),
            matched=len(matched),
            events=[f"{e.type.value} {e.recipient}" for e in events],
        )
        return events

    def _event(self, m: Matched, envelope: Envelope, now: float) -> Event | None:
        report, sent = m.report, m.sent
        destination = self.destination(domain_of(sent.recipient))
        if report.kind == "complaint":
            tags = {"async": "true", "feedback_type": report.feedback_type or "abuse"}
            if report.reporting_mta:
                tags["reporting_mta"] = report.reporting_mta
            if report.auth_failure:
                tags["auth_failure"] = report.auth_failure
            # Only a report calling the message abuse is a Complaint (suppression, breaker); the rest are
            # Feedback events, which nothing acts on (see COMPLAINT_TYPES).
            kind = EventType.COMPLAINT if is_complaint(report.feedback_type) else EventType.FEEDBACK
            if kind is EventType.FEEDBACK:
                log.info(
                    "feedback report that is no complaint: nothing suppressed",
                    feedback_type=report.feedback_type,
                    recipient=sent.recipient,
                    message=sent.message_id,
                )
            # The report's Source-IP names the member that sent it, so the breaker can count it against
            # that IP's lane toward this provider.
            pool, member = self.sender_of(report.source_ip) or ("", "")
            return Event(
                kind,
                id=sent.message_id,
                recipient=sent.recipient,
                queue=f"{pool}/{destination}",
                pool=pool,
                member=member,
                source_ip=report.source_ip,
                tags=tags,
                timestamp=now,
            )
        if report.kind == "delayed":
            return None  # the receiver is still trying: nothing to act on yet
        if report.kind == "delivered":
            return None  # delivered, relayed or expanded: nothing went wrong
        # The Action decides, not the reply's code: `failed` means the message could not be delivered to
        # this recipient and the reporter gave up (RFC 3464 2.3.3), even when the Status is 4.x.x, as
        # Postfix reports mail that expired in its queue (`Action: failed`, `Status: 4.4.7` or 4.4.1 and the
        # last temporary reply). The event keeps the reported reply and its class, so suppression still
        # follows the class: a 4.4.x (MessageExpired, NoAnswerFromHost, ...) never suppresses.
        reply = report.reply()
        tags = {"async": "true"}
        if report.reporting_mta:
            tags["reporting_mta"] = report.reporting_mta
        return Event(
            EventType.BOUNCE,
            id=sent.message_id,
            recipient=sent.recipient,
            queue=f"/{destination}",
            response=reply,
            tags=tags,
            timestamp=now,
            bounce_class=self.classify(reply),
        )
