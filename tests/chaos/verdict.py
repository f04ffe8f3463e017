"""The chaos run's verdict: a pure function of what the sender, the upstreams and the spool saw.

Kept apart from the run so that each rule is tested on its own (tests/chaos/test_verdict.py): a checker
that cannot fail would prove nothing.

Words. An *id* is one message the sender wants delivered (X-Chaos-Id); each time it is sent is an
*attempt* (X-Chaos-Attempt), and the pair is a *key*. The sender sends an id again after a 4xx, a refused
connection, or no reply at all; it stops at the first 250 (acked) or 5xx (refused).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

Key = tuple[str, int]  # (chaos id, attempt)

ACKED = "acked"  # 250 after DATA: postmux promised to deliver it
REFUSED = "refused"  # a 5xx: postmux promised not to
IN_DOUBT = "in_doubt"  # the connection broke after DATA was sent and before the reply: either is allowed
RETRY = "retry"  # a 4xx or no connection before DATA: postmux holds nothing of this attempt


@dataclass(frozen=True, slots=True)
class Copy:
    """One message an upstream accepted (or stored before hanging up)."""

    member: str
    key: Key
    body_sha256: str  # of the bytes after postmux's Received header
    prefix_ok: bool  # what came before the sender's bytes was exactly one Received header
    dropped: bool = False  # stored by an upstream that then hung up before its reply
    epoch: int = 0  # how many kills came before it: which postmux process delivered it


@dataclass(frozen=True, slots=True)
class Dsn:
    """One DSN the bounce sink accepted; copies of one DSN share its own Message-ID."""

    key: Key  # the message it reports on (from the returned headers)
    dsn_id: str
    epoch: int = 0


@dataclass(slots=True)
class Ledger:
    """What the sender sent and heard."""

    ids: list[str] = field(default_factory=list)
    doomed: set[str] = field(default_factory=set)  # every upstream answers these with 550: a DSN is due
    sha256: dict[Key, str] = field(default_factory=dict)
    outcome: dict[Key, str] = field(default_factory=dict)

    def keys_with(self, outcome: str) -> set[Key]:
        return {k for k, o in self.outcome.items() if o == outcome}


@dataclass(slots=True)
class Observed:
    copies: list[Copy]
    dsns: list[Dsn]
    strays: int  # receptions that carry no chaos id at all (or a DSN that names none)
    kills: int
    max_in_flight: int  # deliveries the pools can have running at once (sum of max_connections)
    unfinished: int  # messages left in the spool after a clean stop
    misrouted: int = 0  # DSNs at an ordinary member, or ordinary mail at the DSN sink


@dataclass(slots=True)
class Verdict:
    counts: dict[str, int]
    problems: list[str]

    def summary(self) -> str:
        c = self.counts
        names = ("sent", "accepted", "delivered", "dsn", "refused", "duplicates", "bound", "kills")
        return "chaos: " + " ".join(f"{n}={c[n]}" for n in names) + f" unfinished={c['unfinished']}"

    def details(self) -> str:
        c = self.counts
        names = ("in_doubt", "resent", "dropped_after_store", "dsn_copies", "worst_kill", "strays")
        return "chaos detail: " + " ".join(f"{n}={c[n]}" for n in names)


def judge(ledger: Ledger, seen: Observed) -> Verdict:
    problems: list[str] = []
    copies_by_key: dict[Key, list[Copy]] = defaultdict(list)
    for c in seen.copies:
        copies_by_key[c.key].append(c)
    dsn_ids_by_key: dict[Key, set[str]] = defaultdict(set)
    for d in seen.dsns:
        dsn_ids_by_key[d.key].add(d.dsn_id)

    acked, refused, in_doubt = (ledger.keys_with(o) for o in (ACKED, REFUSED, IN_DOUBT))
    accepted_ids = {i for i, _ in acked}
    refused_ids = {i for i, _ in refused}
    delivered_ids = {i for i, _ in copies_by_key}
    dsn_ids = {i for i, _ in dsn_ids_by_key}

    problems += _promises_kept(ledger, acked, copies_by_key, dsn_ids_by_key)
    problems += _nothing_unpromised(ledger, refused_ids, acked | in_doubt, copies_by_key, dsn_ids_by_key)
    problems += _bodies_intact(ledger, seen.copies)

    duplicates, explained, by_kill, repeats = _duplicates(copies_by_key, seen.dsns)
    problems += repeats
    dsn_copies = sum(n - 1 for n in Counter(d.dsn_id for d in seen.dsns).values())
    bound = seen.kills * seen.max_in_flight
    if duplicates > bound:
        problems.append(
            f"{duplicates} duplicates, more than {bound} ({seen.kills} kills x {seen.max_in_flight})"
        )
    if seen.unfinished:
        problems.append(f"{seen.unfinished} messages left unfinished in the spool")
    if seen.strays:
        problems.append(f"{seen.strays} receptions nobody sent")
    if seen.misrouted:
        problems.append(f"{seen.misrouted} DSNs at ordinary members or ordinary mail at the DSN sink")

    attempts_delivered: dict[str, set[int]] = defaultdict(set)
    for chaos_id, attempt in copies_by_key:
        attempts_delivered[chaos_id].add(attempt)
    resent = [i for i, attempts in attempts_delivered.items() if len(attempts) > 1]
    counts = {
        "sent": len(ledger.ids),
        "accepted": len(accepted_ids),
        "delivered": len(delivered_ids),
        "dsn": len(dsn_ids),
        "refused": len(refused_ids),
        "duplicates": duplicates,
        "bound": bound,
        "kills": seen.kills,
        "unfinished": seen.unfinished,
        "in_doubt": len(in_doubt),
        "resent": len(resent),
        "dropped_after_store": explained,
        "dsn_copies": dsn_copies,
        "strays": seen.strays,
        "worst_kill": max(by_kill.values(), default=0),
    }
    return Verdict(counts, problems)


def _promises_kept(
    ledger: Ledger, acked: set[Key], copies: dict[Key, list[Copy]], dsns: dict[Key, set[str]]
) -> list[str]:
    """Every 250 ends in a delivery, or (for a doomed message) in exactly one DSN and no delivery."""
    problems = []
    for key in sorted(acked):
        if key[0] in ledger.doomed:
            if len(dsns.get(key, ())) != 1:
                problems.append(f"{key}: acked and refused by every upstream, {len(dsns.get(key, ()))} DSNs")
        else:
            if key not in copies:
                problems.append(f"{key}: acked but never delivered")
            if key in dsns:
                problems.append(f"{key}: a DSN for a message that no upstream refuses")
    return problems


def _nothing_unpromised(
    ledger: Ledger,
    refused_ids: set[str],
    may_exist: set[Key],
    copies: dict[Key, list[Copy]],
    dsns: dict[Key, set[str]],
) -> list[str]:
    """Nothing refused is delivered; nothing postmux did not take (a 4xx, no DATA) shows up anywhere."""
    problems = []
    for key, found in sorted(dsns.items()):
        if len(found) > 1:
            problems.append(f"{key}: {len(found)} different DSNs, one bounce must make exactly one")
    for key in sorted(copies):
        if key[0] in ledger.doomed:
            problems.append(f"{key}: delivered although every upstream refuses it")
    for key in sorted(set(copies) | set(dsns)):
        if key[0] in refused_ids:
            problems.append(f"{key}: refused with a 5xx, yet delivered or reported")
        elif key not in may_exist:
            outcome = ledger.outcome.get(key, "never sent")
            problems.append(f"{key}: delivered or reported, but the sender's attempt ended '{outcome}'")
    return problems


def _bodies_intact(ledger: Ledger, copies: list[Copy]) -> list[str]:
    problems = []
    for c in copies:
        if c.body_sha256 != ledger.sha256.get(c.key):
            problems.append(f"{c.key} via {c.member}: body changed in transit")
        elif not c.prefix_ok:
            problems.append(f"{c.key} via {c.member}: something other than one Received header was added")
    return problems


def _duplicates(copies: dict[Key, list[Copy]], dsns: list[Dsn]) -> tuple[int, int, Counter[int], list[str]]:
    """Duplicates postmux is answerable for, those an upstream explains, duplicates per kill, problems.

    A copy stored by an upstream that then hung up is sent again: that second copy is the upstream's doing
    (RFC 1047). Every other second copy (of a message or of a DSN) can only come from a kill between an
    upstream's 250 and the spool recording it: the process that got the 250 is gone, its successor sends
    again. So the copies of one key come from different processes, and kill k (which ended process k - 1)
    answers for the copies whose predecessor process k - 1 delivered.

    The count per kill is reported (worst_kill), not held to max_in_flight: the dispatcher frees a
    member's slot before the outcome is committed, so outcomes waiting for a slow commit come on top of
    the connections (observed: up to 13 against 14 connections, during a restart's large lease batches).
    """
    duplicates = explained = 0
    by_kill: Counter[int] = Counter()
    problems = []
    for key, found in copies.items():
        answered = sorted(c.epoch for c in found if not c.dropped)
        dropped = len(found) - len(answered)
        explained += dropped if answered else max(dropped - 1, 0)
        duplicates += max(len(answered) - 1, 0)
        problems += _by_process(f"{key}", answered, by_kill)
    by_dsn: dict[str, list[int]] = {}
    for d in dsns:
        by_dsn.setdefault(d.dsn_id, []).append(d.epoch)
    for dsn_id, epochs in by_dsn.items():
        duplicates += len(epochs) - 1
        problems += _by_process(f"DSN {dsn_id}", sorted(epochs), by_kill)
    return duplicates, explained, by_kill, problems


def _by_process(what: str, epochs: list[int], by_kill: Counter[int]) -> list[str]:
    problems = []
    for earlier, later in itertools.pairwise(epochs):
        if earlier == later:
            problems.append(f"{what}: delivered twice by one process (epoch {later}), without a kill between")
        else:
            by_kill[earlier + 1] += 1
    return problems
