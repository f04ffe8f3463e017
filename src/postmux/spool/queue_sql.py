"""What the SQLite and PostgreSQL spools' queue operations share: a queue selector (spool/operations.py
`Selector`) as SQL terms, and the rows of the recipient and message tables as the operator's views.

The terms use `?` placeholders (the PostgreSQL spool numbers them, postgres_queue.numbered). Where the two
dialects differ, each spool says how: how one of many domains is matched (`AnyOf`) and what an empty
condition is (`true`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from postmux.spool.base import AttemptView
from postmux.spool.operations import MessageView, RecipientState, RecipientView, Selector
from postmux.spool.sqlite_schema import decode_labels

RECIPIENT_COLUMNS = (
    "rid, address, pool, domain, state, due, attempts, rounds, last_reply, owner, lease_until,"
    " last_member, last_at"
)

# (column with its prefix, the values) -> (a term, its parameters); an empty set of values chooses nothing.
AnyOf = Callable[[str, list[str]], tuple[str, list[Any]]]


def recipient_terms(
    sel: Selector, states: Collection[RecipientState] | None, any_of: AnyOf, prefix: str = ""
) -> tuple[list[str], list[Any]]:
    terms: list[str] = []
    params: list[Any] = []
    if states is not None:
        # Literal states (enum values, never input), so the planner sees them as it sees the work side's.
        terms.append(f"{prefix}state IN ({', '.join(repr(s.value) for s in sorted(states))})")
    for column, value in (
        ("state", sel.state.value if sel.state is not None else None),
        ("message_id", sel.message_id),
        ("pool", sel.pool),
        ("domain", sel.domain),
        ("last_member", sel.member),
    ):
        if value is not None:
            terms.append(f"{prefix}{column} = ?")
            params.append(value)
    if sel.domains is not None:
        # A provider runs a handful of domains in any queue.
        term, values = any_of(f"{prefix}domain", sorted(sel.domains))
        terms.append(term)
        params += values
    return terms, params


def message_terms(sel: Selector, now: float, prefix: str = "") -> tuple[list[str], list[Any]]:
    terms: list[str] = []
    params: list[Any] = []
    if sel.sender is not None:
        terms.append(f"{prefix}sender = ?")
        params.append(sel.sender)
    if sel.older_than_s is not None:
        terms.append(f"{prefix}created <= ?")
        params.append(now - sel.older_than_s)
    return terms, params


def where(
    sel: Selector, now: float, states: Collection[RecipientState] | None, any_of: AnyOf, true: str
) -> tuple[str, list[Any]]:
    """The WHERE of a statement on the recipient table alone."""
    terms, params = recipient_terms(sel, states, any_of)
    m_terms, m_params = message_terms(sel, now)
    if m_terms:
        terms.append(f"message_id IN (SELECT id FROM message WHERE {' AND '.join(m_terms)})")
        params += m_params
    return " AND ".join(terms) or true, params


# -- rows to views -------------------------------------------------------------------------------------


def recipient_view(row: Sequence[Any]) -> RecipientView:
    """A row of RECIPIENT_COLUMNS; a lease's owner and expiry only while it is leased."""
    rid, address, pool, domain, state, due, attempts, rounds, last_reply, owner, lease_until = row[:11]
    last_member, last_at = row[11:13]
    leased = state == RecipientState.LEASED
    return RecipientView(
        rid,
        address,
        pool,
        domain,
        RecipientState(state),
        due,
        attempts,
        rounds,
        last_reply,
        owner if leased else "",
        lease_until if leased else None,
        last_member,
        last_at,
    )


def message_view(
    row: Sequence[Any],
    recipients: tuple[RecipientView, ...],
    data: bytes | None = None,
    attempts: tuple[AttemptView, ...] = (),
) -> MessageView:
    """A row of the spool's message columns (id, sender, created, size, client_ip, smtputf8,
    message_id_header, labels)."""
    message_id, sender, created, size, client_ip, smtputf8, header_id, labels = row[:8]
    tags, metadata = decode_labels(labels)
    return MessageView(
        message_id,
        sender,
        created,
        size,
        client_ip,
        bool(smtputf8),
        recipients,
        data,
        attempts,
        header_id,
        tags,
        metadata,
    )
