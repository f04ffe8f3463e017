"""One-click unsubscribe (RFC 8058) served on the [http] listener: POST /unsubscribe/{token}.

No admin token: the caller is a mailbox provider (or the recipient's browser) acting for the recipient,
and the token itself is the authority (postmux.unsubscribe: HMAC-signed, naming one recipient). A good
token's POST records an `Unsubscribe` event, committed to the webhook outbox before the 200 (so it is
never lost once answered; the suppression list consumes it), then put on the bus (event log, metrics).
The answer is quick: one outbox append, no other work.

GET shows a small page whose button POSTs: it never unsubscribes by itself, because link scanners and
mail previewers fetch every URL of a message (RFC 8058 3.2 wants the POST for that reason).
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from postmux.config import UnsubscribeSettings
from postmux.events.bus import EventBus
from postmux.events.outbox import EventOutbox
from postmux.events.types import Event, EventType
from postmux.ingress.http import json_error
from postmux.reputation.suppression import GLOBAL, SuppressionError, SuppressionList
from postmux.spool.base import SpoolError, WebhookOutbox
from postmux.unsubscribe import BadToken, Claim, verify

log = structlog.get_logger("postmux.unsubscribe")

PATH = "/unsubscribe/{token}"
RETRY_AFTER_S = 30

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Unsubscribe</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<p>Stop mail from <b>{domain}</b> to <b>{recipient}</b>?</p>
<form method="post" action=""><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>
</body></html>
"""


# The page POSTs to itself; no script, no outside resource, never cached.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; form-action 'self'",
    "Cache-Control": "no-store",
}


class Unsubscribes:
    """The unsubscribe routes: given the outbox store, the bus and the webhooks' fan-out, never the App."""

    def __init__(
        self,
        settings: UnsubscribeSettings | None,
        store: WebhookOutbox,
        bus: EventBus,
        outbox: EventOutbox,
        clock: Callable[[], float] = time.time,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.outbox = outbox
        self.clock = clock
        self.suppressions = suppressions
        self.reconfigure(settings)

    def reconfigure(self, settings: UnsubscribeSettings | None) -> None:
        self.settings = settings

    def mount(self, app: FastAPI) -> None:
        @app.post(PATH, include_in_schema=False)
        async def unsubscribe(token: str) -> Response:
            found = self._claim(token)
            if isinstance(found, Response):
                return found
            return await self._record(found)

        @app.get(PATH, include_in_schema=False)
        async def confirm(token: str, request: Request) -> Response:
            found = self._claim(token)
            if isinstance(found, Response):
                return found
            page = _PAGE.format(
                domain=html.escape(found.sender_domain), recipient=html.escape(found.recipient)
            )
            # The page POSTs to itself; no script, no outside resource.
            headers = {
                "Content-Security-Policy": "default-src 'none'; form-action 'self'",
                "Cache-Control": "no-store",
            }
            return HTMLResponse(page, headers=headers)

    def _claim(self, token: str) -> Claim | JSONResponse:
        settings = self.settings
        if settings is None:
            return json_error(404, "one-click unsubscribe is not configured ([unsubscribe])")
        try:
            return verify(token, settings.secrets, self.clock(), settings.max_age)
        except BadToken as e:
            return json_error(400, f"bad unsubscribe token: {e}")

    async def _suppress(self, claim: Claim) -> None:
        """The recipient goes on the suppression list for the sender domain it unsubscribed from (durable
        before the 200): RFC 8058 asks that the POST alone stop the mail, with nothing more to click."""
        if self.suppressions is None:
            return
        try:
            await self.suppressions.add(
                claim.recipient,
                reason="one-click unsubscribe",
                source="unsubscribe",
                scope=f"sender_domain:{claim.sender_domain}" if claim.sender_domain else GLOBAL,
            )
        except SuppressionError as e:  # an address no entry can hold (a quoted local part): said, not lost
            log.warning("unsubscribe not suppressed", recipient=claim.recipient, reason=str(e))

    async def _record(self, claim: Claim) -> Response:
        now = self.clock()
        event = Event(
            EventType.UNSUBSCRIBE,
            id=claim.queue_id,
            recipient=claim.recipient,
            sender_domain=claim.sender_domain,
            message_id=claim.message_id,
            timestamp=now,
            created=float(claim.issued),
            tags={"method": "one-click"},
        )
        try:
            await self._suppress(claim)
        except SpoolError as e:
            log.error("unsubscribe not recorded", error=str(e))
            return json_error(
                503, "the unsubscribe could not be recorded; try again", {"Retry-After": str(RETRY_AFTER_S)}
            )
        rows = self.outbox.rows([event])
        if rows:
            try:
                # Committed before the 200: an answered unsubscribe is never lost (events/outbox.py).
                await self.store.outbox_append(rows)
            except SpoolError as e:
                log.error("unsubscribe not recorded", error=str(e))
                return json_error(
                    503,
                    "the unsubscribe could not be recorded; try again",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            self.outbox.committed()
        self.bus.emit(event)
        log.info("unsubscribed", recipient=claim.recipient, sender_domain=claim.sender_domain)
        return JSONResponse(
            {"unsubscribed": True, "recipient": claim.recipient, "sender_domain": claim.sender_domain}
        )
