"""Feedback: what an attempt teaches health, latency and shaping.

The pool hears the facts and judges the member itself (Pool.observe: health, latency, counters); the
member x destination lane hears what the receiver said (Shaper.react). A change of limits comes back as an
event for the dispatcher to emit: this module only hands facts to the deciders.
"""

from __future__ import annotations

from postmux.attempt import AttemptOutcome
from postmux.balancing.member import Member
from postmux.balancing.pool import Pool
from postmux.events.types import Event, EventType
from postmux.reply import Reply
from postmux.scheduling.shaping import Lane, Shaper, pushes_back


def learn(
    pool: Pool,
    member: Member,
    shaper: Shaper,
    lane: Lane,
    outcome: AttemptOutcome,
    elapsed_s: float,
    started_at: float,
    now: float,
) -> Event | None:
    """Health, latency and shaping hear how the attempt went; returns the change of shaping, if any."""
    pool.observe(member, outcome, elapsed_s, now)
    if outcome.local:
        return None  # shaping's reactions and AIMD listen only to what receivers say
    return react(shaper, lane, outcome, started_at, now)


def react(shaper: Shaper, lane: Lane, outcome: AttemptOutcome, started_at: float, now: float) -> Event | None:
    """Let shaping hear what the receiver said; a change of limits is an event of its own."""
    reply = telling_reply(list(outcome.replies.values()))
    if reply is None:
        return None
    change = shaper.react(lane, reply, started_at, now)
    if change is None:
        return None
    return Event(
        EventType.SHAPING_CHANGED,
        queue=f"{lane.pool}/{lane.destination}",
        pool=lane.pool,
        member=lane.member,
        response=Reply(reply.code, reply.enhanced_code, change),
        timestamp=now,
    )


def telling_reply(replies: list[Reply]) -> Reply | None:
    """The reply that says most about the receiver's mood: a 421, else a deferral of everything (one that
    pushes back first: "4.7.1 slow down" says more than another recipient's "4.2.2 mailbox full"), else a
    success, else a refusal (which reaction rules may still match, e.g. a blocklist listing)."""
    if not replies:
        return None
    for r in replies:
        if r.code == 421:
            return r
    if all(r.is_transient for r in replies):
        return next((r for r in replies if pushes_back(r)), replies[0])
    return next((r for r in replies if r.is_success), replies[0])
