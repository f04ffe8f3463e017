"""The admin API's suppression routes: list, add, remove, import and export (CSV) the suppression list.

Given the node's SuppressionList (postmux.reputation.suppression), never the App. Times in JSON are Unix
seconds, as in event records; the CSV has ISO 8601 UTC times, for people and spreadsheets.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from postmux.config import parse_duration
from postmux.ingress.http import json_error
from postmux.reputation.suppression import (
    GLOBAL,
    SuppressionError,
    SuppressionList,
    from_csv,
    to_csv,
)
from postmux.spool.base import SpoolError, Suppression

PREFIX = "/api/v1/suppressions"
IMPORT_MAX_BYTES = 50 * 1024 * 1024  # a CSV of about a million addresses


class SuppressionRequest(BaseModel):
    """An entry to add (or replace: one entry per address and scope)."""

    model_config = ConfigDict(extra="forbid")
    address: str = Field(max_length=320, examples=["gone@example.net"], description="An address, or *@domain")
    reason: str = Field(default="added by an operator", max_length=500)
    source: Literal["bounce", "complaint", "unsubscribe", "manual"] = "manual"
    scope: str = Field(
        default=GLOBAL, max_length=300, description="global, sender_domain:DOMAIN or api_key:NAME"
    )
    expires_in: str | None = Field(default=None, examples=["30d"], description="A duration; none: never")


def as_record(e: Suppression) -> dict[str, Any]:
    return {
        "address": e.address,
        "scope": e.scope,
        "reason": e.reason,
        "source": e.source,
        "created": e.created,
        "expires": e.expires,
    }


def suppression_routes(app: FastAPI, suppressions: SuppressionList) -> None:
    @app.get(PREFIX)
    async def listing(address: str = "", scope: str = "", expired: bool = False) -> dict[str, Any]:
        """Entries, oldest first; `address` and `scope` narrow it down (exact, lower case)."""
        entries = suppressions.entries(expired=expired)
        entries = [
            e
            for e in entries
            if (not address or e.address == address.strip().lower()) and (not scope or e.scope == scope)
        ]
        return {"suppressions": [as_record(e) for e in entries]}

    @app.post(PREFIX, status_code=201)
    async def add(body: SuppressionRequest) -> Any:
        try:
            expires_in = parse_duration(body.expires_in) if body.expires_in is not None else None
        except ValueError as e:
            return json_error(400, f"expires_in: {e}", field="expires_in")
        if expires_in is not None and expires_in <= 0:
            return json_error(400, "expires_in: an entry lasts more than 0 s", field="expires_in")
        try:
            made = await suppressions.add(
                body.address,
                reason=body.reason,
                source=body.source,
                scope=body.scope,
                expires=None if expires_in is None else suppressions.clock() + expires_in,
            )
        except SuppressionError as e:
            return json_error(400, str(e), field=e.field)
        except SpoolError as e:
            return json_error(503, f"the spool could not store the entry: {e}")
        return {"suppression": as_record(made)}

    # `:path`: an address is taken whole; a "*@domain" entry is removed by that name.
    @app.delete(f"{PREFIX}/{{address:path}}")
    async def remove(address: str, scope: str = GLOBAL) -> Any:
        try:
            removed = await suppressions.remove(address, scope)
        except SuppressionError as e:
            return json_error(400, str(e), field=e.field)
        except SpoolError as e:
            return json_error(503, f"the spool could not remove the entry: {e}")
        if not removed:
            return json_error(404, f"no suppression of {address!r} in scope {scope!r}")
        return {"removed": {"address": address.strip().lower(), "scope": scope}}

    @app.get(
        f"{PREFIX}.csv", response_class=PlainTextResponse, responses={200: {"content": {"text/csv": {}}}}
    )
    async def export(expired: bool = False) -> PlainTextResponse:
        """Every entry as CSV: address,scope,reason,source,created,expires (RFC 4180)."""
        return PlainTextResponse(to_csv(suppressions.entries(expired=expired)), media_type="text/csv")

    @app.post(f"{PREFIX}.csv")
    async def import_csv(request: Request) -> Any:
        """Entries from a CSV body (the export's columns; only `address` is required), all or none."""
        raw = await request.body()
        if not raw.strip():
            return json_error(400, "the body is a CSV file with a header row (address,scope,reason,...)")
        if len(raw) > IMPORT_MAX_BYTES:
            return json_error(400, f"the body is over {IMPORT_MAX_BYTES} octets: split it")
        try:
            entries = from_csv(raw.decode("utf-8-sig"), suppressions.clock())
        except UnicodeDecodeError:
            return json_error(400, "the body is not UTF-8")
        except SuppressionError as e:
            return json_error(400, str(e), field=e.field)
        try:
            await suppressions.add_all(entries)
        except SpoolError as e:
            return json_error(503, f"the spool could not store the entries: {e}")
        return {"imported": len(entries)}
