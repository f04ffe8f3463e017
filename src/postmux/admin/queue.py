"""The operator's queue operations over the admin API: summary, listing, show, and the verbs on a selector.

`postmux queue`, `queue list`, `queue show ID`, `flush`, `hold`, `release`, `delete`, `bounce` and `move`
(cli.py) call the routes of admin/api.py, which come here. The spool does the work (spool/base.py,
QueueOperations); this module turns what an operator typed into a Selector, brings what the spool does not
know (which domains a provider runs, which pools exist, where a DSN goes, the DSN itself), and says what
happened in JSON, an event per bounced recipient and a log line per change.

Deciding apart from doing: `criteria` is a plain function from the request's fields to Criteria (or the
field and reason it refuses); QueueControl does the reads and changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from postmux.config import parse_duration
from postmux.delivery.dsn import FailedRecipient, build_dsn, original_head
from postmux.delivery.mx import MxResolver
from postmux.envelope import Envelope, domain_of
from postmux.events.bus import EventBus
from postmux.events.types import Event, EventType
from postmux.headers import header_section_end
from postmux.reply import Reply
from postmux.reputation.bounces import ADMIN_BOUNCE
from postmux.scheduling.providers import Providers
from postmux.scheduling.router import Router
from postmux.spool.base import (
    DestinationStats,
    MessageView,
    QueueOperations,
    RecipientState,
    RecipientView,
    Selector,
)
from postmux.spool.operations import MAX_PAGE

log = structlog.get_logger("postmux.queue")

# The selector's fields as the API takes them (query parameters, or keys of a JSON body) and the CLI's
# options of the same names: --id, --pool, ...
SELECTOR_FIELDS = ("id", "pool", "domain", "provider", "member", "sender", "older_than", "state")
VERBS = ("flush", "hold", "release", "delete", "bounce", "move")
_OPTIONS = {"bounce": ("reason",), "move": ("to",)}  # what a verb takes beside its selector
_MAX_REASON = 300  # a reason goes into a DSN's human part and its Diagnostic-Code: a line, not a letter


class QueueRequestError(ValueError):
    """What the operator asked cannot be done as asked: the field at fault (or "") and why (a 4xx)."""

    def __init__(self, field: str, reason: str, status: int = 422) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.status = status


class UnknownMessage(KeyError):
    """The spool does not have that message (delivered and removed, or never accepted)."""


@dataclass(frozen=True, slots=True)
class Criteria:
    """A request's selector before the provider is turned into its domains (that needs the queue)."""

    selector: Selector
    provider: str | None = None


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise QueueRequestError(name, f"expected text, not {type(value).__name__}")
    return _one_line(name, value)


def _one_line(name: str, value: str) -> str:
    """`value` as the spool, a DSN and the log take it: no CR, LF or NUL, and valid Unicode (JSON may
    escape a lone surrogate, "\\udcfc", which is no character: no UTF-8 writer takes it, RFC 7493 2.1)."""
    if any(c in value for c in "\r\n\x00"):
        raise QueueRequestError(name, "CR, LF and NUL are not allowed")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise QueueRequestError(name, "not valid Unicode: a lone surrogate") from None
    return value


def criteria(fields: Mapping[str, Any]) -> Criteria:
    """The selector a request's fields name: `id`, `pool`, `domain`, `provider`, `member`, `sender`,
    `older_than` (a duration: 30m, 2h, 5d), `state`, and `all` (the one way to say "every message").

    An empty value is no criterion, but for `sender`, where "" means the null sender (DSNs).
    """
    unknown = sorted(set(fields) - {*SELECTOR_FIELDS, "all"})
    if unknown:
        raise QueueRequestError(unknown[0], f"not a selector; use {', '.join(SELECTOR_FIELDS)} or all")
    values = {name: _text(fields, name) for name in SELECTOR_FIELDS}
    older_than_s = None
    if values["older_than"]:
        try:
            older_than_s = parse_duration(values["older_than"])
        except ValueError as e:
            raise QueueRequestError("older_than", str(e)) from None
        if not (older_than_s >= 0 and math.isfinite(older_than_s)):
            raise QueueRequestError("older_than", "a duration of 0 or more")
    state = None
    if values["state"]:
        try:
            state = RecipientState(values["state"].lower())
        except ValueError:
            states = ", ".join(s.value for s in RecipientState)
            raise QueueRequestError("state", f"{values['state']!r} is not one of {states}") from None
    everything = fields.get("all", False)
    if not isinstance(everything, bool):
        raise QueueRequestError("all", "expected true or false")
    selector = Selector(
        message_id=values["id"] or None,
        pool=values["pool"] or None,
        domain=values["domain"] or None,
        sender=values["sender"],
        state=state,
        older_than_s=older_than_s,
        member=values["member"] or None,
        everything=everything,
    )
    return Criteria(selector, values["provider"] or None)


def query_fields(query: Mapping[str, str]) -> dict[str, Any]:
    """A GET's query parameters as the fields `criteria` reads (`all` as a boolean)."""
    fields: dict[str, Any] = {k: v for k, v in query.items() if k not in ("limit", "after")}
    if "all" in fields:
        fields["all"] = fields["all"].lower() in ("1", "true", "yes")
    return fields


class Dispatch(Protocol):
    def scan_soon(self) -> None:
        """Read due work from the spool soon (it was released, flushed or moved)."""
        ...


class KnownDestinations:
    """Which provider a domain's mail goes to, as the scheduler judges it now (scheduling/providers.py):
    the MX answer it has (source pools), else the provider's own domains (relay pools), else none."""

    def __init__(self, resolver: MxResolver) -> None:
        self.resolver = resolver

    @property
    def names(self) -> frozenset[str]:
        providers = self.resolver.providers
        return providers.names if isinstance(providers, Providers) else frozenset()

    def destination_of(self, domain: str) -> str:
        plan = self.resolver.cached(domain)
        return plan.destination if plan is not None else self.resolver.providers.destination(domain)


@dataclass(frozen=True, slots=True)
class QueueNode:
    """What the queue operations read and steer: live objects of the node, never copies."""

    spool: QueueOperations
    pools: Mapping[str, Any]  # the node's pools by name: `move` checks its target is one
    router: Router  # where a bounce's DSN goes: the route for mail to the sender's domain
    destinations: KnownDestinations
    bus: EventBus
    dispatch: Dispatch
    clock: Callable[[], float]
    reporting_mta: str  # the name a DSN says it comes from ([smtp] hostname)


class QueueControl:
    def __init__(self, node: QueueNode) -> None:
        self.node = node

    # -- the selector --------------------------------------------------------------------------------

    async def selector(self, chosen: Criteria, now: float) -> Selector:
        """The Selector a request means; a provider becomes the domains in the queue that it runs."""
        if chosen.provider is None:
            return chosen.selector
        known = self.node.destinations.names
        if chosen.provider not in known:
            names = ", ".join(sorted(known)) or "none"
            raise QueueRequestError("provider", f"no provider named {chosen.provider!r} (known: {names})")
        destinations = self.node.destinations
        domains = {d.domain for d in await self.node.spool.stats(Selector(), now, limit=1_000_000)}
        mine = frozenset(d for d in domains if destinations.destination_of(d) == chosen.provider)
        return replace(chosen.selector, domains=mine)

    # -- reads ---------------------------------------------------------------------------------------

    async def summary(self, chosen: Criteria) -> dict[str, Any]:
        now = self.node.clock()
        found = await self.node.spool.stats(await self.selector(chosen, now), now)
        rows = [self._destination(d) for d in found]
        return {
            "destinations": rows,
            "recipients": sum(r["recipients"] for r in rows),
            "oldest_age_s": max((r["oldest_age_s"] for r in rows), default=0.0),
        }

    def _destination(self, d: DestinationStats) -> dict[str, Any]:
        return {
            "pool": d.pool,
            "domain": d.domain,
            "destination": self.node.destinations.destination_of(d.domain),
            "recipients": d.total,
            **{s.value: d.counts.get(s.value, 0) for s in _OPEN},
            "oldest_age_s": round(d.oldest_age_s, 1),
            "last_error": d.last_error,
        }

    async def listing(self, chosen: Criteria, limit: int, after: str) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise QueueRequestError("limit", f"a page holds 1 to {MAX_PAGE} messages, not {limit}")
        now = self.node.clock()
        page = await self.node.spool.list_queue(
            await self.selector(chosen, now), now, limit=limit, after=after
        )
        return {
            "messages": [describe_message(m, now) for m in page.messages],
            "next_after": page.next_after,
        }

    async def show(self, message_id: str) -> dict[str, Any]:
        now = self.node.clock()
        message = await self.node.spool.show(message_id, now)
        if message is None:
            raise UnknownMessage(message_id)
        rcpts = {r.rid: r.address for r in message.recipients}
        return {
            **describe_message(message, now),
            "smtputf8": message.smtputf8,
            "message_id": message.message_id_header,
            "tags": dict(message.tags),
            "metadata": dict(message.metadata),
            "headers": header_fields(message.data or b""),
            "attempts": [
                {"recipient": rcpts.get(a.rid, ""), "member": a.member, "reply": a.reply, "at": a.at}
                for a in message.attempts
            ],
        }

    # -- the verbs -----------------------------------------------------------------------------------

    async def act(self, verb: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Do `verb` on the recipients the body's selector chooses; a mass action needs `all`."""
        if verb not in VERBS:
            raise QueueRequestError("", f"no queue operation {verb!r}; there are {', '.join(VERBS)}", 404)
        options = {k: body[k] for k in _OPTIONS.get(verb, ()) if k in body}
        fields = {k: v for k, v in body.items() if k not in options}
        chosen = criteria(fields)
        now = self.node.clock()
        selector = await self.selector(chosen, now)
        if selector.is_empty:
            raise QueueRequestError(
                "",
                f"{verb} with no selector would act on every message in the queue: choose some "
                f"({', '.join(SELECTOR_FIELDS)}), or say all",
                status=400,
            )
        spool = self.node.spool
        match verb:
            case "hold":
                count = await spool.hold(selector, now)
            case "release":
                count = await spool.release(selector, now)
            case "flush":
                count = await spool.flush(selector, now)
            case "delete":
                count = await spool.delete(selector, now)
            case "move":
                count = await spool.move(selector, self._pool(options.get("to")), now)
            case _:  # bounce: the verb is one of VERBS (checked above)
                count = await self._bounce(selector, self._reason(options.get("reason")), now)
        if verb in ("release", "flush", "move") and count:
            self.node.dispatch.scan_soon()
        log.info("queue operation", action=verb, recipients=count, **_logged(body))
        return {"action": verb, "recipients": count, "changes": [_said(verb, count, options)]}

    def _pool(self, to: Any) -> str:
        if not isinstance(to, str) or not to:
            raise QueueRequestError("to", "move needs the pool to move to")
        if to not in self.node.pools:
            raise QueueRequestError("to", f"no pool named {to!r}")
        return to

    @staticmethod
    def _reason(reason: Any) -> str:
        if not isinstance(reason, str) or not reason.strip():
            raise QueueRequestError("reason", "bounce needs a reason: the sender reads it in the DSN")
        return _one_line("reason", reason).strip()[:_MAX_REASON]

    async def _bounce(self, selector: Selector, reason: str, now: float) -> int:
        # RFC 3463 3.1: X.0.0, no more to say of the cause in a code; the reason says it in words.
        reply = Reply(550, "5.0.0", f"bounced by the operator: {reason}")
        reporting_mta = self.node.reporting_mta

        def dsn(message: MessageView, recipients: Sequence[RecipientView]) -> Envelope | None:
            # Run by the spool inside its transaction, perhaps more than once for a message (PostgreSQL
            # runs a batch again after a failure): pure, remembering nothing. The events come from what
            # the spool answers, the committed run's bounce alone.
            return build_dsn(
                original_sender=message.sender,
                original_message=original_head(message.data or b"", None),
                message_id=message.message_id,
                failed=[FailedRecipient(r.address, reply) for r in recipients],
                reporting_mta=reporting_mta,
                arrival=message.created,
                now=now,
            )

        router = self.node.router
        bounced = await self.node.spool.bounce(
            selector,
            now,
            reply=str(reply),
            dsn=dsn,
            dsn_pool=lambda message: router.pool_for("", domain_of(message.sender), ""),
        )
        for b in bounced:
            for r in b.recipients:
                self.node.bus.emit(_bounce_event(b.message, r, reply, now))
        count = sum(len(b.recipients) for b in bounced)
        if count:
            self.node.dispatch.scan_soon()  # the DSNs are due now
        return count


_OPEN = (RecipientState.QUEUED, RecipientState.LEASED, RecipientState.HELD)


def _bounce_event(message: MessageView, r: RecipientView, reply: Reply, now: float) -> Event:
    return Event(
        EventType.BOUNCE,
        id=message.message_id,
        sender=message.sender,
        recipient=r.address,
        queue=f"{r.pool}/{r.domain}",
        pool=r.pool,
        response=reply,
        num_attempts=r.attempts,
        latency_s=now - message.created,
        size=message.size,
        tags={**message.tags, "by": "operator"},  # the event's own label wins a clash, as verdicts' do
        bounce_class=ADMIN_BOUNCE,  # the operator's word, not the receiver's: never suppresses
        timestamp=now,
        created=message.created,
        metadata=dict(message.metadata),
        message_id=message.message_id_header,
    )


def _said(verb: str, count: int, options: Mapping[str, Any]) -> str:
    done = {
        "hold": "held",
        "release": "released",
        "flush": "made due now",
        "delete": "deleted",
        "bounce": "bounced",
        "move": f"moved to pool {options.get('to')}",
    }[verb]
    return f"{count} recipient{'s' if count != 1 else ''} {done}"


def _logged(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in (*SELECTOR_FIELDS, "all", "to")}


def describe_message(m: MessageView, now: float) -> dict[str, Any]:
    """A message as the API shows it in a listing: its envelope and the recipients chosen."""
    return {
        "id": m.message_id,
        "sender": m.sender,
        "created": m.created,
        "age_s": round(m.age_s(now), 1),
        "size": m.size,
        "client_ip": m.client_ip,
        "recipients": [describe_recipient(r, now) for r in m.recipients],
    }


def describe_recipient(r: RecipientView, now: float) -> dict[str, Any]:
    return {
        "rid": r.rid,
        "address": r.address,
        "pool": r.pool,
        "domain": r.domain,
        "state": r.state.value,
        "due": r.due,
        "due_in_s": round(max(0.0, r.due - now), 1) if r.state is RecipientState.QUEUED else None,
        "attempts": r.attempts,
        "rounds": r.rounds,
        "last_reply": r.last_reply,
        "last_member": r.last_member,
        "last_at": r.last_at,
        "owner": r.owner,
        "lease_until": r.lease_until,
    }


def header_fields(data: bytes) -> list[dict[str, str]]:
    """The header section as name/value pairs in order, folded lines joined (RFC 5322 2.2.3).

    Values as written (encoded words stay encoded: what the sender wrote, not a rendering of it);
    octets that are not UTF-8 are shown as U+FFFD.
    """
    head = data[: header_section_end(data)]
    fields: list[dict[str, str]] = []
    for raw in head.splitlines():
        line = raw.decode("utf-8", "replace")
        if not line.strip():
            break
        if line[:1] in (" ", "\t") and fields:
            fields[-1]["value"] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append({"name": name.strip(), "value": value.strip()})
    return fields
