"""The suppression list: recipients who get no more mail, kept in the spool, looked up in memory.

Mail to an address that bounced for good (InvalidRecipient, BadDomain, InactiveMailbox), to someone who
complained or unsubscribed, ruins the reputation every other message depends on, so, as Postal and KumoMTA
do, postmux keeps a list and stops such mail at the door: refused at RCPT (`550 5.7.1`, with the reason),
or, per `[suppression] action = "drop"`, accepted and dropped with a Suppressed event, never silently. The
other recipients of the same message are not touched.

An entry names an address or a whole domain (`*@example.com`), a scope (every sender; one sender domain;
one API key), a reason, a source (bounce | complaint | unsubscribe | manual), when it was made, and
optionally when it expires. The entries live in the spool (spool/base.py SuppressionStore: a table of
SQLite's, PostgreSQL's next), are read once at start into a dict, and every change is written through the
store and then to the dict. One process owns a SQLite spool, so the dict stays in step; several nodes on
one PostgreSQL spool will need to hear of each other's changes (a LISTEN, or a reload of the table).

Cost of a lookup: at most six dict lookups (address and domain, in each of three scopes), about 1 µs
(bench/suppression_lookup.py); nothing is read from disk per RCPT.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from postmux.config import SuppressionSettings
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.reputation.bounces import HARD_BOUNCE_CLASSES
from postmux.spool.base import Suppression, SuppressionStore

log = structlog.get_logger("postmux.suppression")

SOURCES = ("bounce", "complaint", "unsubscribe", "manual")
GLOBAL = "global"
_SCOPE_KINDS = ("sender_domain", "api_key")
CSV_FIELDS = ("address", "scope", "reason", "source", "created", "expires")
_REASON_MAX = 200


class SuppressionError(ValueError):
    """An entry that cannot be made; `field` names what is wrong (for a 400 / 422 naming it)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def entry_address(address: str) -> str:
    """The form an entry keeps: "local@domain" or "*@domain", lower case (receivers and senders treat
    addresses case-insensitively in practice, whatever RFC 5321 2.4 allows a local part)."""
    value = address.strip().strip("<>").lower()
    local, at, domain = value.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or "." not in domain.strip(".")
        or any(c in value for c in " ,;\r\n")
    ):
        raise SuppressionError("address", f"{address!r} is not an address or *@domain")
    return value


def entry_scope(scope: str) -> str:
    """ "global", "sender_domain:example.org" or "api_key:NAME"."""
    value = scope.strip() or GLOBAL
    if value == GLOBAL:
        return value
    kind, _, name = value.partition(":")
    if kind not in _SCOPE_KINDS or not name or any(c.isspace() for c in name):
        raise SuppressionError("scope", f"{scope!r}: global, sender_domain:DOMAIN or api_key:NAME")
    return f"{kind}:{name.lower() if kind == 'sender_domain' else name}"


def entry(
    address: str,
    *,
    reason: str,
    source: str,
    scope: str = GLOBAL,
    created: float,
    expires: float | None = None,
) -> Suppression:
    """A checked entry (SuppressionError naming the field when it cannot be one)."""
    if source not in SOURCES:
        raise SuppressionError("source", f"{source!r}: one of {', '.join(SOURCES)}")
    if expires is not None and expires <= created:
        raise SuppressionError("expires", "an entry expires after it was made")
    # One line, short: the reason is quoted in an SMTP reply (RFC 5321 4.5.3.1.5: 512 octets a line).
    text = " ".join(reason.split())[:_REASON_MAX]
    return Suppression(entry_address(address), entry_scope(scope), text, source, created, expires)


@dataclass(frozen=True, slots=True)
class Found:
    """A recipient the list stops, and the reply that says so."""

    recipient: str
    entry: Suppression

    @property
    def reply(self) -> Reply:
        # RFC 3463 5.7.1: "delivery not authorized, message refused"; the words say which list and why.
        return Reply(
            550, "5.7.1", f"<{self.recipient}>: suppressed ({self.entry.source}: {self.entry.reason})"
        )

    def smtp_reply(self) -> str:
        return str(self.reply)


class SuppressionList:
    """The entries in a dict by (address, scope), written through to the store."""

    def __init__(
        self,
        store: SuppressionStore,
        settings: SuppressionSettings | None = None,
        clock: Callable[[], float] = time.time,
        *,
        refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or SuppressionSettings()
        self.clock = clock
        # Told (action, source) of each recipient refused here (metrics); drops are told by their events.
        self._refused = refused or (lambda action, source: None)
        self._entries: dict[tuple[str, str], Suppression] = {}

    def reconfigure(self, settings: SuppressionSettings) -> None:
        self.settings = settings

    async def load(self) -> int:
        """Read every entry from the store (at start, once the spool is open); returns how many."""
        self._entries = {(e.address, e.scope): e for e in await self.store.suppressions()}
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # -- looking up ------------------------------------------------------------------------------

    def find(self, recipient: str, sender: str = "", api_key: str = "") -> Suppression | None:
        """The entry that stops mail from `sender` (by `api_key`, if any) to `recipient`, if one does.

        Global entries first, then the sender domain's, then the key's; within each, the address before
        its domain. An expired entry stops nothing.
        """
        now = self.clock()
        address = recipient.strip().strip("<>").lower()
        keys = (address, "*@" + address.rpartition("@")[2])
        scopes = [GLOBAL]
        if "@" in sender:
            scopes.append("sender_domain:" + sender.rpartition("@")[2].lower())
        if api_key:
            scopes.append("api_key:" + api_key)
        for scope in scopes:
            for key in keys:
                found = self._entries.get((key, scope))
                if found is not None and not found.expired(now):
                    return found
        return None

    def stopped(self, recipient: str, sender: str = "", api_key: str = "") -> Found | None:
        """What the list says of one recipient, when it is turned on ([suppression] enabled)."""
        if not self.settings.enabled:
            return None
        found = self.find(recipient, sender, api_key)
        return None if found is None else Found(recipient, found)

    def refusal(self, recipient: str, sender: str = "", api_key: str = "") -> Found | None:
        """The recipient to refuse now (at RCPT, or in the API's answer): only with action "refuse"."""
        if self.settings.action != "refuse":
            return None
        found = self.stopped(recipient, sender, api_key)
        if found is not None:
            self._refused("refuse", found.entry.source)
        return found

    def active(self) -> int:
        """Entries that stop mail now (a pass over them: for a scrape, not per RCPT)."""
        now = self.clock()
        return sum(1 for e in self._entries.values() if not e.expired(now))

    def entries(self, *, expired: bool = False) -> list[Suppression]:
        now = self.clock()
        every = sorted(self._entries.values(), key=lambda e: (e.created, e.address, e.scope))
        return every if expired else [e for e in every if not e.expired(now)]

    # -- changing ------------------------------------------------------------------------------

    async def add(
        self,
        address: str,
        *,
        reason: str,
        source: str = "manual",
        scope: str = GLOBAL,
        expires: float | None = None,
    ) -> Suppression:
        """Add (or replace) one entry; durable in the spool when this returns.

        The one way in for every source: a hard bounce (`note_bounces`), an operator (API, CLI), and the
        one-click unsubscribe and complaint handlers (`source="unsubscribe"` / `"complaint"`).
        """
        made = entry(
            address, reason=reason, source=source, scope=scope, created=self.clock(), expires=expires
        )
        await self.add_all([made])
        return made

    async def add_all(self, entries: Sequence[Suppression]) -> None:
        """Add (or replace) checked entries in one transaction (an import)."""
        await self.store.suppression_put(entries)
        for e in entries:
            self._entries[(e.address, e.scope)] = e

    async def remove(self, address: str, scope: str = GLOBAL) -> bool:
        key = (entry_address(address), entry_scope(scope))
        removed = await self.store.suppression_remove(*key)
        return self._entries.pop(key, None) is not None or removed

    async def note_complaints(self, events: Iterable[Event]) -> list[Suppression]:
        """Suppress the recipients of Complaint events ([suppression] complaints): global, no expiry.

        Complaint events are the ARF reports that call the message abuse (abuse, fraud, virus: returns.py
        COMPLAINT_TYPES); a not-spam or auth-failure report is a Feedback event and suppresses nobody."""
        if not self.settings.complaints:
            return []
        complaints = [e for e in events if e.type is EventType.COMPLAINT]
        return await self._note(
            complaints, "complaint", lambda e: f"complaint ({e.tags.get('feedback_type', 'abuse')})", None
        )

    async def note_bounces(self, events: Iterable[Event]) -> list[Suppression]:
        """Suppress the recipients of hard bounces among `events` ([suppression] hard_bounces): a class of
        InvalidRecipient, BadDomain or InactiveMailbox says the address will never take mail."""
        if not self.settings.hard_bounces:
            return []
        hard = [e for e in events if e.type is EventType.BOUNCE and e.bounce_class in HARD_BOUNCE_CLASSES]
        expiry = self.settings.hard_bounce_expiry
        return await self._note(hard, "bounce", lambda e: f"{e.bounce_class}: {e.response}", expiry or None)

    async def _note(
        self, events: list[Event], source: str, reason: Callable[[Event], str], lasts: float | None
    ) -> list[Suppression]:
        """Global entries for the events' recipients, in one transaction."""
        now = self.clock()
        made = []
        for e in events:
            try:
                expires = now + lasts if lasts else None
                made.append(entry(e.recipient, reason=reason(e), source=source, created=now, expires=expires))
            except SuppressionError as error:  # an address no entry can hold (a quoted local part)
                log.warning(f"{source} not suppressed", recipient=e.recipient, reason=str(error))
        if made:
            await self.add_all(made)
        return made


# -- CSV --------------------------------------------------------------------------------------------


def _iso(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(value: str, field: str) -> float | None:
    if not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SuppressionError(field, f"{value!r} is not an ISO 8601 time (2026-11-30T20:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def to_csv(entries: Iterable[Suppression]) -> str:
    """address,scope,reason,source,created,expires: times in ISO 8601 UTC, "" for no expiry."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180 2.1: CRLF between records
    writer.writerow(CSV_FIELDS)
    for e in entries:
        writer.writerow((e.address, e.scope, e.reason, e.source, _iso(e.created), _iso(e.expires)))
    return out.getvalue()


def from_csv(text: str, now: float, *, source: str = "manual") -> list[Suppression]:
    """The entries of a CSV file as `to_csv` writes it (only `address` is required; a missing scope is
    global, source `source`, created now). SuppressionError names the line and field of the first fault."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "address" not in [f.strip() for f in reader.fieldnames]:
        raise SuppressionError("line 1", "a header row naming at least the address column")
    unknown = sorted(set(f.strip() for f in reader.fieldnames) - set(CSV_FIELDS))
    if unknown:
        raise SuppressionError("line 1", f"unknown column {unknown[0]!r} (known: {', '.join(CSV_FIELDS)})")
    made = []
    for row in reader:
        line = reader.line_num
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        try:
            made.append(
                entry(
                    cells["address"],
                    reason=cells.get("reason", "") or "imported",
                    source=cells.get("source", "") or source,
                    scope=cells.get("scope", "") or GLOBAL,
                    created=_time(cells.get("created", ""), "created") or now,
                    expires=_time(cells.get("expires", ""), "expires"),
                )
            )
        except SuppressionError as e:
            raise SuppressionError(f"line {line}: {e.field}", e.reason) from None
    return made
