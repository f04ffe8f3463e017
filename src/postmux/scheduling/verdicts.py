"""Verdicts: what becomes of work after an attempt, or when no attempt can be made, as values.

Plain functions of (work, the facts of the attempt, the pool, the rules, now): each returns a `Verdict`
saying which recipients settle how (the spool's `Settlement`s), which events tell of it, which work goes
back to its queue at once for another member, and what the member's counters add. Nothing here does I/O
or writes to anything it is given; the dispatcher applies a verdict (emits, resubmits, records through the
spool), and tests/unit/test_verdicts.py holds the rules without sockets or a spool.

The rules, in brief:
- a reply per recipient decides it: 2xx delivered, 5xx bounced with a DSN, 4xx deferred; but recipients
  refused as too many for the transaction (452 4.5.3) while others were delivered go at once in a new
  transaction (`split`), as shaping's max_recipients splits a message; and a 5xx about
  the member rather than the recipient (its IP is on a blocklist: `[bounces] try_other_members`) is
  deferred while another member of the pool has not tried the recipient, and bounces at the last one;
- deferred work goes at once to another member of the pool that has not tried it this round (RFC 5321
  4.5.4.1 asks for a wait before retrying the *same* server; another member is another server), else back
  to the spool for its next round on the retry schedule, or expires with a DSN after `max_age`;
- a member that cannot take the message (no SMTPUTF8) passes it on; once every member has said so, it
  bounces (RFC 6531 3.5);
- a crash of postmux's own code is the message's fault: it waits, and after `max_local_errors` crashes in a
  row it is held until an operator releases it;
- work that only suspended or warm-up-capped members could take waits for them without using up a round.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

from postmux.attempt import AttemptOutcome
from postmux.balancing.pool import Pool
from postmux.delivery.dsn import FailedRecipient, build_dsn, original_head
from postmux.envelope import domain_of
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.reputation.bounces import BounceClassifier
from postmux.scheduling.gate import Gate
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router
from postmux.spool.base import RecipientState, Settlement
from postmux.work import WorkItem, WorkRecipient


@dataclass(frozen=True, slots=True)
class Rules:
    """What verdicts go by: the retry schedule (with `[retry]` max_age and max_local_errors), the routes
    a DSN takes back to the sender, the name this node reports itself by in a DSN, and which 5xx replies
    refuse the member rather than the recipient (`[bounces] try_other_members`; None: no 5xx does)."""

    retry: RetrySchedule
    router: Router
    reporting_mta: str
    refuses_member: Callable[[Reply], bool] | None = None

    @property
    def max_local_errors(self) -> int:
        return self.retry.settings.max_local_errors

    @property
    def max_age(self) -> float:
        return self.retry.settings.max_age


@dataclass(frozen=True, slots=True)
class Tally:
    """Recipients the member's counters add, by what became of them (Pool.tally)."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0


NO_TALLY = Tally()


@dataclass(slots=True)
class Verdict:
    """What to do about one piece of work; the dispatcher does it in this order: emit the events, count
    the tally, put `retry_now` and `split` at the front of their queue, then record the settlements
    durably."""

    settlements: list[Settlement] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Work another member of the pool takes at once, at the front of its queue (not yet recorded).
    retry_now: WorkItem | None = None
    # Recipients the receiver would not take in this transaction alone ("452 4.5.3 too many recipients"):
    # a new transaction at once, at the front of the queue, as shaping's max_recipients splits a message
    # (not yet recorded, no round ended, no failure counted).
    split: WorkItem | None = None
    tally: Tally = NO_TALLY
    held: bool = False  # set aside after crashing our code too often (the settlements say HELD)


# -- after an attempt ---------------------------------------------------------------------------------------


def after_attempt(
    item: WorkItem, member: str, outcome: AttemptOutcome, pool: Pool, rules: Rules, now: float
) -> Verdict:
    """The verdict on an attempt that ran (the transport returned); `item.tried` includes `member`."""
    if outcome.unfit:
        return attempted_by(unfit(item, member, outcome, pool, rules, now), member)
    return attempted_by(settled(item, member, outcome, pool, rules, now), member)


def attempted_by(v: Verdict, member: str) -> Verdict:
    """Its settlements name the member whose attempt they come from: the spool keeps the attempt for the
    operator's `postmux queue show` and the member as the recipient's last (`--member`)."""
    v.settlements = [s if s.member == member else replace(s, member=member) for s in v.settlements]
    return v


def settled(
    item: WorkItem, member: str, outcome: AttemptOutcome, pool: Pool, rules: Rules, now: float
) -> Verdict:
    """Each recipient by its reply: delivered, bounced (with a DSN), or deferred (another member, a wait)."""
    v = Verdict()
    delivered: list[WorkRecipient] = []
    bounced: list[tuple[WorkRecipient, Reply]] = []
    deferred: list[tuple[WorkRecipient, Reply]] = []
    too_many = _too_many(item, outcome)
    if too_many:
        v.split = _split(item, member, too_many)
    for r in item.recipients:
        if r.rid in too_many:
            continue
        reply = outcome.replies.get(r.rid) or Reply(451, "4.3.0", "no reply recorded")
        bumped = r.answered()
        if reply.is_success:
            delivered.append(bumped)
            accepted = reply  # the transaction's one answer to DATA: the same for every recipient
            kind = EventType.DELIVERY
        elif reply.is_permanent and not _another_member(reply, item, pool, rules, now):
            bounced.append((bumped, reply))
            kind = EventType.BOUNCE
        else:
            deferred.append((bumped, reply))
            kind = EventType.TRANSIENT_FAILURE
        v.events.append(event(kind, item, bumped, pool.name, member, reply, now, outcome))
    v.tally = Tally(len(delivered), len(deferred), len(bounced))
    if delivered:
        attempts = max(r.attempts for r in delivered)
        v.settlements.append(
            Settlement(
                item.message_id,
                [r.rid for r in delivered],
                RecipientState.DELIVERED,
                str(accepted),  # kept with the attempt while the message stays for other recipients
                attempts=attempts,
                member=member,  # as attempted_by would, without a copy (the hot path)
            )
        )
    failures = [Failure(r, reply, RecipientState.BOUNCED, said_by(outcome, r.rid)) for r, reply in bounced]
    if deferred:
        if pool.can_serve(now, item.tried | item.barred):
            v.retry_now = replace(item, recipients=[r for r, _ in deferred])
        else:
            failures += _defer_or_expire(v, item, pool, deferred, rules, now, outcome=outcome)
    # One DSN for the recipients this attempt bounced and those it left expired (RFC 3464 2: one report,
    # a per-recipient group each), recorded in the same transaction as their settlements.
    v.settlements += finals(item, failures, rules, now)
    return v


def _too_many_recipients(reply: Reply) -> bool:
    """RFC 5321 4.5.3.1.10 and RFC 3463 X.5.3: the receiver takes no more recipients in this transaction
    (a 552 to RCPT is read as this 452 already: delivery.smtp_client.rcpt_reply)."""
    return reply.code == 452 and reply.enhanced_code == "4.5.3"


def _too_many(item: WorkItem, outcome: AttemptOutcome) -> frozenset[int]:
    """The recipients refused only for the transaction's size, to go at once in a transaction of their own.

    Only when the receiver delivered another recipient of this one: each new transaction then takes at
    least one recipient more, so a receiver that says 4.5.3 to every RCPT (or a first one) cannot keep
    the work going round at once; its recipients wait for their retry as any deferral does.
    """
    replies = outcome.replies
    if not any(reply.code == 452 for reply in replies.values()):
        return frozenset()  # the usual attempt: nothing more to look at (the hot path)
    said = outcome.said()
    if not any(reply.is_success for reply in said) or not any(_too_many_recipients(r) for r in said):
        return frozenset()
    return frozenset(
        r.rid for r in item.recipients if r.rid in replies and _too_many_recipients(replies[r.rid])
    )


def _split(item: WorkItem, member: str, rids: frozenset[int]) -> WorkItem:
    """Those recipients as new work, as they were before this attempt: its member may take it again (the
    limit was the transaction's, not the member's), and nothing about them was settled or counted."""
    return replace(
        item,
        recipients=[r for r in item.recipients if r.rid in rids],
        tried=item.tried - {member},
        unfit=set(item.unfit),
    )


def said_by(outcome: AttemptOutcome | None, rid: int) -> str:
    """The remote server whose reply a recipient's is, or "" when postmux made the reply up itself.

    RFC 3464 2.3.5/2.3.6: Remote-MTA and an `smtp;` Diagnostic-Code belong to a reply a remote MTA gave.
    A reply postmux made (`outcome.local`: no connection, a timeout, a lost connection, SMTPUTF8 not
    offered; or an address refused before anything was sent, `outcome.unsent`) is postmux's own finding,
    even when it names the host it was about.
    """
    if outcome is None or outcome.local or rid in outcome.unsent:
        return ""
    return outcome.remote


def _another_member(reply: Reply, item: WorkItem, pool: Pool, rules: Rules, now: float) -> bool:
    """A 5xx that refuses the member, not the recipient (a blocklisted IP: "554 5.7.1 ... blocked using
    zen.spamhaus.org"), while a member that has not tried this work can take it: the next member is
    another IP, which the receiver may well accept; the last one's refusal bounces, so a sender's own
    listing (a domain on a DBL, say) costs one attempt a member, not retries until `max_age`."""
    refuses_member = rules.refuses_member
    return (
        refuses_member is not None and refuses_member(reply) and pool.can_serve(now, item.tried | item.barred)
    )


def unfit(
    item: WorkItem, member: str, outcome: AttemptOutcome, pool: Pool, rules: Rules, now: float
) -> Verdict:
    """The member cannot take this message (its server lacks SMTPUTF8): another member, or a verdict.

    Another untried usable member gets it at once. Once every member of the pool has said it cannot,
    the refusal is final and the sender gets a DSN (RFC 6531 3.5, 5.6.7): retrying would only meet
    the same servers. While some member that was not asked is out of service (ejected, draining),
    the mail waits for it on the normal retry schedule instead, up to the queue lifetime.
    """
    v = Verdict()
    unable = item.unfit | {member}
    if pool.can_serve(now, item.tried | item.barred):
        for r in item.recipients:
            reply = outcome.replies[r.rid]
            v.events.append(
                event(EventType.TRANSIENT_FAILURE, item, r, pool.name, member, reply, now, outcome)
            )
        v.retry_now = replace(item, unfit=unable)
        return v
    bumped = [r.answered() for r in item.recipients]
    if {m.name for m in pool.members if not m.removed} <= unable:
        # The 553 5.6.7 is postmux's finding about the servers (their EHLO lacked SMTPUTF8), not a reply
        # any of them gave: said_by gives it no Remote-MTA (the outcome is local).
        failed = [
            Failure(r, outcome.replies[r.rid], RecipientState.BOUNCED, said_by(outcome, r.rid))
            for r in bumped
        ]
        for f in failed:
            v.events.append(
                event(EventType.BOUNCE, item, f.recipient, pool.name, member, f.reply, now, outcome)
            )
        v.tally = Tally(bounced=len(failed))
        v.settlements += finals(item, failed, rules, now)
        return v
    wait = Reply(451, "4.4.5", f"no usable member offering SMTPUTF8 in pool {pool.name}")
    for r in bumped:
        v.events.append(event(EventType.TRANSIENT_FAILURE, item, r, pool.name, member, wait, now, outcome))
    _wait_or_expire(v, item, pool, bumped, wait, rules, now)
    return v


def crashed(item: WorkItem, member: str, error: Exception, pool: Pool, rules: Rules, now: float) -> Verdict:
    """postmux's own code raised during the attempt: the message's fault, never the member's.

    The real cases are messages our sending code cannot put on the wire and our own bugs. Either way the
    member did nothing wrong (the dispatcher teaches health nothing). A bug may lie in one member's
    transport, so another member is tried at once, else the work waits its round; after `[retry]
    max_local_errors` crashes in a row it is held (Postfix's hold queue: kept, never retried nor expired,
    until an operator releases it) instead of crashing for days.
    """
    v = Verdict()
    reply = _internal_error(error)
    bumped = [replace(r, attempts=r.attempts + 1, local_errors=r.local_errors + 1) for r in item.recipients]
    local_errors = max((r.local_errors for r in bumped), default=0)
    if local_errors >= rules.max_local_errors:
        _hold(v, item, bumped, pool, member, reply, error, now)
        return attempted_by(v, member)
    tags = {"local_error": type(error).__name__}
    for r in bumped:
        v.events.append(event(EventType.TRANSIENT_FAILURE, item, r, pool.name, member, reply, now, tags=tags))
    if pool.can_serve(now, item.tried | item.barred):
        v.retry_now = replace(item, recipients=bumped)
    else:
        _wait_or_expire(v, item, pool, bumped, reply, rules, now)
    return attempted_by(v, member)


def after_crash(item: WorkItem, error: Exception, pool: Pool, rules: Rules, now: float) -> Verdict:
    """Deciding or recording an attempt's outcome raised (our bug, e.g. in building a DSN).

    Left alone, the work would stay leased until a restart. It waits a round instead, counted as one
    of the message's crashes, so a message that keeps doing this is held, as one that crashes the
    sending code is. Nothing of the outcome was recorded, so recipients this attempt delivered are
    tried again: a duplicate is better than mail stuck or lost.
    """
    v = Verdict()
    bumped = [replace(r, local_errors=r.local_errors + 1) for r in item.recipients]
    rounds = rounds_ended(item, bumped)
    local_errors = max((r.local_errors for r in bumped), default=0)
    reply = _internal_error(error)
    if local_errors >= rules.max_local_errors:
        _hold(v, item, bumped, pool, "", reply, error, now, rounds=rounds)
        return v
    v.settlements.append(
        Settlement(
            item.message_id,
            [r.rid for r in bumped],
            RecipientState.QUEUED,
            str(reply),
            # Not next_due: expiring would build a DSN, which may be the very code that raised.
            now + rules.retry.interval(rounds),
            attempts=max((r.attempts for r in bumped), default=0),
            rounds=rounds,
            local_errors=local_errors,
        )
    )
    return v


# -- when no attempt can be made ------------------------------------------------------------------------


def no_member(item: WorkItem, pool: Pool, rules: Rules, now: float) -> Verdict:
    """Every usable member was tried (or none is usable): the work waits for its next retry."""
    v = Verdict()
    reply = Reply(451, "4.4.5", f"no usable member in pool {pool.name}")
    _wait_or_expire(v, item, pool, item.recipients, reply, rules, now, attempted=False)
    return v


def spf_refused(
    item: WorkItem, pool: Pool, domain: str, why: Mapping[str, str], rules: Rules, now: float
) -> Verdict:
    """Every member that could take the work is one the sender domain's SPF record does not permit.

    `why`: each barred member and the result that keeps it out ("192.0.2.20 fail"). A transient failure,
    never a bounce: the operator can fix it (publish the members' IPs in the record, add a permitted
    member), so the work waits on the retry schedule and expires with a DSN after `max_age` as deferred
    work does. RFC 7372 3: X.7.23 "SPF validation failed", X.7.24 "SPF validation error" when only
    records that could not be evaluated (temperror, permerror, with [spf] on_error = "closed") keep it.
    """
    v = Verdict()
    errors = all(r.split()[-1] in ("temperror", "permerror") for r in why.values())
    members = ", ".join(f"{name}: {result}" for name, result in sorted(why.items()))
    if errors:
        reply = Reply(451, "4.7.24", f"the SPF record of {domain} could not be evaluated ({members})")
    else:
        reply = Reply(
            451,
            "4.7.23",
            f"no member of pool {pool.name} is permitted by the SPF record of {domain} ({members})",
        )
    tags = {"reason": "spf_not_permitted", "spf_domain": domain}
    _wait_or_expire(v, item, pool, item.recipients, reply, rules, now)  # its Expiration events, if any
    if not v.events:
        for r in item.recipients:
            v.events.append(event(EventType.TRANSIENT_FAILURE, item, r, pool.name, "", reply, now, tags=tags))
    return v


def overflow(item: WorkItem, gate: Gate, pools: Collection[str]) -> WorkItem | None:
    """The work, moved to the overflow pool of a warm-up-capped member that could take it; None: stays.

    Once only: two pools that overflow into each other must not pass the work back and forth.
    """
    to = next((m.settings.warmup.overflow_pool for m in gate.capped if m.settings.warmup), None)
    if to is None or to not in pools or item.overflowed_from:
        return None
    return replace(item, overflowed_from=item.pool, pool=to, destination="", tried=set(), unfit=set())


def postponed(item: WorkItem, pool: Pool, reopen: float, rules: Rules, now: float) -> Verdict:
    """Only suspended or warm-up-capped members could take this: it waits until the first reopens.

    Not an attempt, so no retry step is used up; a member already tried may take it again at its next
    retry, maybe before the others reopen. Past `max_age` it expires as any deferred work does.
    """
    v = Verdict()
    reply = Reply(451, "4.7.0", f"{pool.name}: every member is held back from {item.destination}")
    rounds = rounds_ended(item, item.recipients)
    due = reopen
    if item.tried:
        due = min(due, rules.retry.next_due(rounds, item.created, now) or due)
    if now - item.created >= rules.max_age:
        _wait_or_expire(v, item, pool, item.recipients, reply, rules, now)
        return v
    for r in item.recipients:
        v.events.append(event(EventType.TRANSIENT_FAILURE, item, r, pool.name, "", reply, now))
    v.settlements.append(
        Settlement(
            item.message_id,
            [r.rid for r in item.recipients],
            RecipientState.QUEUED,
            str(reply),
            due,
            attempts=item.attempts,
            rounds=rounds,
            local_errors=item.local_errors,
        )
    )
    return v


# -- the pieces -----------------------------------------------------------------------------------------


def rounds_ended(item: WorkItem, recipients: list[WorkRecipient]) -> int:
    """The rounds these recipients will have ended once they go back to the spool to wait.

    A round ends when members were tried and none is left to try at once; work that waits without any
    try (no usable member, every member held back) uses up no round, as a wait for a suspension never did.
    """
    rounds = max((r.rounds for r in recipients), default=0)
    return rounds + 1 if item.tried else rounds


def _wait_or_expire(
    v: Verdict,
    item: WorkItem,
    pool: Pool,
    recipients: list[WorkRecipient],
    reply: Reply,
    rules: Rules,
    now: float,
    attempted: bool = True,
) -> None:
    """_defer_or_expire for recipients that share one reply postmux made (no usable member, a crash, an
    SPF bar), with the DSN of those that expired."""
    expired = _defer_or_expire(v, item, pool, [(r, reply) for r in recipients], rules, now, attempted)
    v.settlements += finals(item, expired, rules, now)


def _defer_or_expire(
    v: Verdict,
    item: WorkItem,
    pool: Pool,
    deferred: list[tuple[WorkRecipient, Reply]],
    rules: Rules,
    now: float,
    attempted: bool = True,
    outcome: AttemptOutcome | None = None,
) -> list[Failure]:
    """Back to the spool until the next round is due (settlements added to `v`), or, once `max_age` is
    reached, expired: returned, for the caller's DSN, with their Expiration events added to `v`.

    Each recipient keeps its own last reply (RFC 3464 2.3.6: the diagnostic is that recipient's): one
    server may have said "4.2.2 mailbox full" to one and "4.7.1 greylisted" to another. `outcome`: the
    attempt that gave the replies, which says which of them a remote server gave (said_by).
    """
    recipients = [r for r, _ in deferred]
    rounds = rounds_ended(item, recipients)
    due = rules.retry.next_due(rounds, item.created, now)
    if due is None:
        for r, reply in deferred:
            v.events.append(event(EventType.EXPIRATION, item, r, pool.name, "", reply, now))
        return [Failure(r, reply, RecipientState.EXPIRED, said_by(outcome, r.rid)) for r, reply in deferred]
    if not attempted:
        for r, reply in deferred:
            v.events.append(event(EventType.TRANSIENT_FAILURE, item, r, pool.name, "", reply, now))
    for text, same in _by_reply(deferred).items():  # a settlement records one reply for its recipients
        v.settlements.append(
            Settlement(
                item.message_id,
                [r.rid for r in same],
                RecipientState.QUEUED,
                text,
                due,
                attempts=max((r.attempts for r in recipients), default=0),
                rounds=rounds,
                local_errors=max((r.local_errors for r in recipients), default=0),
            )
        )
    return []


def _by_reply(pairs: list[tuple[WorkRecipient, Reply]]) -> dict[str, list[WorkRecipient]]:
    """The recipients by the text of their reply, in their order (one group when all got the same)."""
    groups: dict[str, list[WorkRecipient]] = {}
    for r, reply in pairs:
        groups.setdefault(str(reply), []).append(r)
    return groups


def _hold(
    v: Verdict,
    item: WorkItem,
    recipients: list[WorkRecipient],
    pool: Pool,
    member: str,
    reply: Reply,
    error: Exception,
    now: float,
    *,
    rounds: int | None = None,
) -> None:
    """Set the work aside (HELD) with an event saying why; `postmux release ID` queues it again.

    `rounds`: the rounds to record, when the crash ended one; else those the recipients had.
    """
    tags = _crash_tags(error)
    for r in recipients:
        v.events.append(event(EventType.HELD, item, r, pool.name, member, reply, now, tags=tags))
    v.settlements.append(
        Settlement(
            item.message_id,
            [r.rid for r in recipients],
            RecipientState.HELD,
            str(reply),
            attempts=max((r.attempts for r in recipients), default=0),
            rounds=max((r.rounds for r in recipients), default=0) if rounds is None else rounds,
            local_errors=max((r.local_errors for r in recipients), default=0),
        )
    )
    v.held = True


def _internal_error(error: Exception) -> Reply:
    """The reply recorded for a crash of our own code: its kind only (the text is in the event's tags)."""
    return Reply(451, "4.3.0", f"internal error: {type(error).__name__}")


def _crash_tags(error: Exception) -> dict[str, str]:
    # The full error is for the operator (event log, log); the reply, which a DSN may quote one day, names
    # only its kind.
    return {"reason": "local_error", "error": f"{type(error).__name__}: {error}"[:300]}


@dataclass(frozen=True, slots=True)
class Failure:
    """A recipient that failed for good: its own last reply, how it ended (BOUNCED or EXPIRED), and the
    remote server that gave the reply ("" when postmux made it: said_by)."""

    recipient: WorkRecipient
    reply: Reply
    state: RecipientState
    remote: str = ""


def finals(item: WorkItem, failed: list[Failure], rules: Rules, now: float) -> list[Settlement]:
    """The settlements of recipients that failed for good, with one DSN to the sender for all of them
    (RFC 3464) on the first: the spool records a verdict's settlements in one transaction, so none of these
    recipients is recorded without the DSN. One settlement per state and reply, so that each recipient
    keeps its own last reply (`postmux queue show`)."""
    if not failed:
        return []
    dsn = build_dsn(
        original_sender=item.sender,
        original_message=original_head(item.data, item.tail),
        message_id=item.message_id,
        failed=[
            FailedRecipient(f.recipient.address, f.reply, f.remote, expired=f.state is RecipientState.EXPIRED)
            for f in failed
        ],
        reporting_mta=rules.reporting_mta,
        arrival=item.created,
        now=now,
    )
    # The DSN goes to the sender: routed as mail to the sender's domain.
    dsn_pool = rules.router.pool_for("", domain_of(item.sender), "") if dsn else ""
    groups: dict[tuple[RecipientState, str], list[WorkRecipient]] = {}
    for f in failed:
        groups.setdefault((f.state, str(f.reply)), []).append(f.recipient)
    settlements = [
        Settlement(
            item.message_id,
            [r.rid for r in same],
            state,
            reply,
            attempts=max(r.attempts for r in same),
        )
        for (state, reply), same in groups.items()
    ]
    settlements[0] = replace(settlements[0], dsn=dsn, dsn_pool=dsn_pool)
    return settlements


_CLASSED = (EventType.BOUNCE, EventType.TRANSIENT_FAILURE)


def classify_failures(events: list[Event], classifier: BounceClassifier) -> None:
    """Give every Bounce and TransientFailure its reply's bounce class (postmux.reputation.bounces).

    Done once for a verdict's events, whichever rule made them, before anything reads them (the event
    log, metrics, webhook rows, suppression): one regular-expression match each.
    """
    for e in events:
        if e.type in _CLASSED and e.response is not None and not e.bounce_class:
            e.bounce_class = classifier.classify(e.response)


def place(events: list[Event], member: str, zone: str) -> None:
    """The events of `member`'s attempt carry its zone (placement by zone, balancing/zones.py)."""
    for e in events:
        if e.member == member:
            e.zone = zone


def event(
    kind: EventType,
    item: WorkItem,
    r: WorkRecipient,
    pool: str,
    member: str,
    reply: Reply,
    now: float,
    outcome: AttemptOutcome | None = None,
    *,
    tags: Mapping[str, str] | None = None,
) -> Event:
    """The event about one recipient of `item`; `outcome`, when an attempt made it, says where it went."""
    own = dict(tags or {})
    if outcome is not None and outcome.tls:
        own["tls"] = outcome.tls  # the attempt's TLS ("TLSv1.3 <cipher>" or "none"), when it connected
    if outcome is not None and outcome.passed_over:
        own["mx_skipped"] = "; ".join(outcome.passed_over)  # the MX hosts that could not take it first
    return Event(
        kind,
        id=item.message_id,
        sender=item.sender,
        recipient=r.address,
        queue=item.queue,
        pool=pool,
        member=member,
        response=reply,
        num_attempts=r.attempts,
        latency_s=now - item.created,
        size=item.size,  # the whole text's octets, tail included
        tags={**item.tags, **own} if item.tags else own,  # the event's own labels win a clash
        timestamp=now,
        metadata=item.metadata,
        message_id=item.message_id_header,
        created=item.created,
        mx_host=outcome.remote if outcome is not None else "",
        peer=outcome.peer if outcome is not None else "",
        source_ip=outcome.source_ip if outcome is not None else "",
    )
