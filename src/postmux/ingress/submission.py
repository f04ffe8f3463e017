"""HTTP submission: POST /api/v1/messages (and /batch), through the one accept path (ingress/acceptor.py).

The answer is 202 with one queue id per stored message, given only once the spool has committed, as the
SMTP side's 250. Every refusal is JSON (`{"error": ...}`, with `field` naming the input at fault):

- 413 before the body is read when its Content-Length is over [api] max_request_size, or as soon as that
  many octets have arrived (chunked); 413 too for a message over [smtp] max_message_size once built;
- 401 without a known API key (`Authorization: Bearer KEY`, [[api_key]], ingress/api_keys.py), 403 for a
  sender domain or pool the key may not use;
- 422 for input that is not what the OpenAPI document says, naming the field (pydantic's loc, address
  syntax, CR/LF/NUL in a header field or address, bad base64, an unknown pool);
- 429 with Retry-After when the key's rate is spent (GCRA, scheduling/throttles.py);
- 503 (507 for a full disk) with Retry-After when the spool could not store: nothing was stored.

Idempotency-Key: the key, a digest of the request and the answer are stored in the same transaction as
the messages (Spool.store_all), per API key, for [api] idempotency_ttl: a replay gets the first answer
and stores nothing, across restarts; the same key with another request is 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import structlog
from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from postmux.config import ApiKey, Settings
from postmux.ingress.acceptor import Acceptor, AcceptRefused, Submission
from postmux.ingress.api_keys import ApiKeys
from postmux.ingress.compose import (
    BadInput,
    Batch,
    Composed,
    Message,
    Rules,
    as_envelope,
    compose,
    field_addresses,
    sender_domain_allowed,
)
from postmux.ingress.http import json_error
from postmux.spool.base import Answered, Spool, SpoolError

log = structlog.get_logger("postmux.api")

PREFIX = "/api/v1"
MESSAGES = f"{PREFIX}/messages"
BATCH = f"{PREFIX}/messages/batch"
OPENAPI = f"{PREFIX}/openapi.json"
# What the admin guard leaves to this module: the submission routes and the published document.
PUBLIC_ROUTES = frozenset({("POST", MESSAGES), ("POST", BATCH), ("GET", OPENAPI)})
SPOOL_RETRY_AFTER_S = 30  # how long a client waits after a spool failure before it tries again
IDEMPOTENCY_KEY_MAX = 255
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}\Z")  # visible ASCII, as Stripe's and the IETF draft's
# RFC 9110 11.6.1: a 401 carries a challenge; RFC 6750 3 the Bearer scheme's.
_CHALLENGE = 'Bearer realm="postmux submission"'


class Queued(BaseModel):
    """One stored message: its queue id (on every event about it) and the recipients it goes to."""

    id: str = Field(examples=["18c1f2a9b3c40a1b2c3d4"])
    recipients: list[str] = Field(examples=[["alice@example.net"]])


class SuppressedRecipient(BaseModel):
    """A recipient refused for the suppression list ([suppression] action = "refuse"): not stored."""

    email: str = Field(examples=["gone@example.net"])
    reason: str = Field(examples=["<gone@example.net>: suppressed (bounce: InvalidRecipient: 550 5.1.1 ...)"])


class Accepted(BaseModel):
    """The messages stored for one submitted message: one, or one per group of recipients whose
    substituted text differs; and the recipients refused for the suppression list, if any."""

    messages: list[Queued]
    suppressed: list[SuppressedRecipient] = Field(default_factory=list)


class BatchAccepted(BaseModel):
    """One result per submitted message, in the request's order."""

    results: list[Accepted]


class FieldError(BaseModel):
    field: str = Field(examples=["recipients[0].email"])
    reason: str = Field(examples=["a domain label that is not a valid IDNA 2008 U-label (RFC 5891)"])


class ErrorBody(BaseModel):
    """Every refusal: `error` says what happened; `field` names the input at fault, when one is."""

    model_config = ConfigDict(extra="allow")
    error: str
    field: str | None = None
    errors: list[FieldError] | None = None
    details: list[str] | None = None


class Refused(Exception):
    def __init__(
        self, status: int, error: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers

    def response(self) -> JSONResponse:
        extra: dict[str, Any] = {"field": self.field} if self.field else {}
        return json_error(self.status, self.error, self.headers, **extra)


def _error(status: int, description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": ErrorBody,
        "description": description,
        "content": {"application/json": {"example": example}},
    }


RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}
}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error(401, "No API key, or not a known one", {"error": "missing or unknown API key"}),
    403: _error(
        403,
        "The key may not use this sender domain or pool",
        {"error": "this API key may not send from example.org", "field": "envelope_sender"},
    ),
    413: _error(
        413,
        "The request body, or a message built from it, is over the size limit",
        {"error": "the request body is over the limit of 41943040 octets ([api] max_request_size)"},
    ),
    422: _error(
        422,
        "The input is not valid; `field` names it",
        {
            "error": "recipients[0].email: Bad recipient address syntax: an empty domain",
            "field": "recipients[0].email",
            "errors": [
                {"field": "recipients[0].email", "reason": "Bad recipient address syntax: an empty domain"}
            ],
        },
    ),
    429: {
        **_error(429, "The key's rate is spent", {"error": "rate limit of API key shop: retry in 2 s"}),
        "headers": RETRY_AFTER_HEADER,
    },
    503: {
        **_error(
            503,
            "Nothing was stored: the spool failed; retry later",
            {"error": "the spool could not store the message"},
        ),
        "headers": RETRY_AFTER_HEADER,
    },
    507: {
        **_error(
            507,
            "Nothing was stored: the disk is full; retry later",
            {"error": "no room in the spool: disk full"},
        ),
        "headers": RETRY_AFTER_HEADER,
    },
}

EXAMPLE_MESSAGE: dict[str, Any] = {
    "envelope_sender": "bounces@example.com",
    "recipients": [{"email": "alice@example.net", "name": "Alice", "substitutions": {"first_name": "Alice"}}],
    "content": {
        "from": {"email": "news@example.com", "name": "Example News"},
        "subject": "Hello {{first_name}}",
        "text_body": "Hi {{first_name}}, your order has shipped.",
    },
    "tags": {"campaign": "spring"},
    "metadata": {"order": "1234"},
}
EXAMPLE_ACCEPTED = {"messages": [{"id": "18c1f2a9b3c40a1b2c3d4", "recipients": ["alice@example.net"]}]}


class Turns(Protocol):
    """A rate per key: scheduling/throttles.py's GCRA behind it (ingress does not import scheduling; the
    composition root hands one over). Cost: one throttles call."""

    def wait_s(self, key: str, per_s: float, burst: int, now: float, take: int) -> float:
        """Take `take` turns under `key` and return 0.0, or take none and return the seconds until that
        many are free (math.inf: never, more than `burst`)."""
        ...


class Submissions:
    """The submission API: given the acceptor and the spool, never the App; settings by `reconfigure`."""

    def __init__(
        self,
        acceptor: Acceptor,
        spool: Spool,
        settings: Settings,
        turns: Turns,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.acceptor = acceptor
        self.spool = spool
        self.clock = clock
        self.turns = turns
        self.keys = ApiKeys(settings.api_key)
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.keys.reconfigure(settings.api_key)
        smtp = settings.smtp
        self.rules = Rules(
            smtp.max_message_size,
            smtp.max_recipients,
            smtp.max_hops,
            smtp.long_lines == "fold",
            smtp.hostname,
        )

    # -- the HTTP side ---------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        app.add_middleware(SubmissionGuard, submissions=self)
        responses = {202: {"description": "Stored durably; one queue id per stored message"}, **ERRORS}

        @app.post(
            MESSAGES,
            status_code=202,
            response_model=Accepted,
            responses=responses,
            summary="Submit one message",
            tags=["submission"],
            openapi_extra={"requestBody": {"content": {"application/json": {"example": EXAMPLE_MESSAGE}}}},
        )
        async def submit(
            request: Request,
            message: Message,
            idempotency_key: str | None = Header(default=None, max_length=IDEMPOTENCY_KEY_MAX),
        ) -> Response:
            return await self._submit(request, [message], idempotency_key, batch=False)

        @app.post(
            BATCH,
            status_code=202,
            response_model=BatchAccepted,
            responses=responses,
            summary="Submit several messages, stored together (all or none)",
            tags=["submission"],
            openapi_extra={
                "requestBody": {"content": {"application/json": {"example": {"messages": [EXAMPLE_MESSAGE]}}}}
            },
        )
        async def submit_batch(
            request: Request,
            batch: Batch,
            idempotency_key: str | None = Header(default=None, max_length=IDEMPOTENCY_KEY_MAX),
        ) -> Response:
            return await self._submit(request, batch.messages, idempotency_key, batch=True)

        @app.get(OPENAPI, include_in_schema=False)
        async def openapi() -> JSONResponse:
            return JSONResponse(published_openapi(app))

    async def _submit(
        self, request: Request, messages: list[Message], idempotency_key: str | None, *, batch: bool
    ) -> Response:
        key: ApiKey = request.state.api_key
        try:
            return await self._store(request, key, messages, idempotency_key, batch)
        except Refused as e:
            return e.response()
        except BadInput as e:
            return json_error(
                e.status, str(e), field=e.field, errors=[{"field": e.field, "reason": e.reason}]
            )

    async def _store(
        self, request: Request, key: ApiKey, messages: list[Message], idempotency_key: str | None, batch: bool
    ) -> Response:
        """Check, build, and store: the answer once durable, or the first answer to a replayed key."""
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise BadInput("Idempotency-Key", f"1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters")
        now = self.clock()
        made, submissions, refused = self._made(request, key, messages, now, batch)
        self._within_limits(key, len(submissions))
        request_hash = _digest(request.url.path, messages)
        if idempotency_key is not None:
            first = await self._answered(key.name, idempotency_key, now)
            if first is not None:
                return _replay(first, request_hash)
        self._take_turns(key, len(submissions), now)

        def record(ids: list[str]) -> Answered:
            assert idempotency_key is not None
            expires = now + self.settings.api.idempotency_ttl
            return Answered(
                key.name, idempotency_key, request_hash, _answer(made, ids, batch, refused), now, expires
            )

        result = await self._accept(submissions, record if idempotency_key is not None else None, key)
        if isinstance(result, Answered):  # a request with the same key was stored meanwhile
            return _replay(result, request_hash)
        return JSONResponse(json.loads(_answer(made, result, batch, refused)), status_code=202)

    def _made(
        self, request: Request, key: ApiKey, messages: list[Message], now: float, batch: bool
    ) -> tuple[list[list[Composed]], list[Submission], list[list[dict[str, str]]]]:
        """Each submitted message as the messages to store (BadInput, Refused when it may not be), and
        the recipients of each refused for the suppression list."""
        client_ip = request.client.host if request.client else ""
        made: list[list[Composed]] = []
        submissions: list[Submission] = []
        refused: list[list[dict[str, str]]] = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]." if batch else ""
            pool = self._pool(key, message, where)
            message, suppressed = self._without_suppressed(key, message, where)
            copies: list[Composed] = []
            for c in compose(message, self.rules, now, where):
                submission = Submission(as_envelope(c, message, client_ip, key.name), pool)
                try:
                    self.acceptor.check(submission.envelope)
                except AcceptRefused as e:
                    raise BadInput(f"{where}content", e.reason) from None
                # [unsubscribe]: one copy per recipient whose mail gets a token, each with its own id.
                for part in self.acceptor.split(submission):
                    copies.append(replace(c, recipients=part.envelope.recipients))
                    submissions.append(part)
            made.append(copies)
            refused.append(suppressed)
        return made, submissions, refused

    def _without_suppressed(
        self, key: ApiKey, message: Message, where: str
    ) -> tuple[Message, list[dict[str, str]]]:
        """The message without the recipients the suppression list refuses ([suppression] action =
        "refuse"), as SMTP refuses them at RCPT: the others are stored, the answer names those refused.
        A message left with none is refused whole (422 naming `recipients`)."""
        suppressions = self.acceptor.suppressions
        if suppressions is None or not len(suppressions):
            return message, []
        kept, refused = [], []
        for r in message.recipients:
            found = suppressions.refusal(r.email, message.envelope_sender, key.name)
            if found is None:
                kept.append(r)
            else:
                refused.append({"email": r.email, "reason": found.reply.text})
        if not refused:
            return message, []
        if not kept:
            reasons = "; ".join(r["reason"] for r in refused[:3])
            raise BadInput(f"{where}recipients", f"every recipient is on the suppression list: {reasons}")
        return message.model_copy(update={"recipients": kept}), refused

    async def _accept(
        self, submissions: list[Submission], record: Callable[[list[str]], Answered] | None, key: ApiKey
    ) -> list[str] | Answered:
        try:
            # Shielded, as the SMTP side's accept: a client that hangs up while the spool commits must not
            # cancel a store that may already be durable.
            return await asyncio.shield(self.acceptor.accept_all(submissions, record))
        except AcceptRefused as e:
            raise Refused(422, e.reason) from None
        except SpoolError as e:
            log.error("spool refused a submission", error=str(e), disk_full=e.disk_full, key=key.name)
            status, words = (
                (507, "no room in the spool: disk full")
                if e.disk_full
                else (503, "the spool could not store the message")
            )
            raise Refused(
                status, f"{words}; nothing was stored", headers={"Retry-After": str(SPOOL_RETRY_AFTER_S)}
            ) from None

    async def _answered(self, client: str, key: str, now: float) -> Answered | None:
        try:
            return await self.spool.answered(client, key, now)
        except SpoolError as e:
            log.error("spool could not look up an idempotency key", error=str(e))
            raise Refused(
                503,
                "the spool could not be read; nothing was stored",
                headers={"Retry-After": str(SPOOL_RETRY_AFTER_S)},
            ) from None

    def _pool(self, key: ApiKey, message: Message, where: str) -> str:
        """The pool the message goes by ("": routes choose); refuses a sender or pool the key may not use."""
        for field, address in (("envelope_sender", message.envelope_sender), *self._from(message)):
            if not sender_domain_allowed(address, key.sender_domains):
                raise Refused(
                    403,
                    f"API key {key.name} may not send from {address.rpartition('@')[2] or repr(address)}",
                    f"{where}{field}",
                )
        if message.pool is None:
            return key.pools[0] if key.pools else ""
        if message.pool not in {p.name for p in self.settings.pool}:
            raise BadInput(f"{where}pool", f"no pool named {message.pool!r}")
        if key.pools and message.pool not in key.pools:
            raise Refused(403, f"API key {key.name} may not use pool {message.pool!r}", f"{where}pool")
        return message.pool

    @staticmethod
    def _from(message: Message) -> list[tuple[str, str]]:
        """The From addresses a structured message will carry: content.from's, and those of a From field in
        its headers, which takes its place (else the key's sender_domains could be got round there)."""
        if isinstance(message.content, str):
            return []
        found = [("content.from.email", message.content.from_.email)]
        for name, value in message.content.headers.items():
            if name.lower() == "from":
                found += [(f"content.headers.{name}", a) for a in field_addresses(value) or [value]]
        return found

    def _within_limits(self, key: ApiKey, count: int) -> None:
        limit = min(
            self.settings.api.max_batch, key.burst if key.rate is not None else self.settings.api.max_batch
        )
        if count > limit:
            raise BadInput("messages", f"{count} messages in one request, more than {limit}: split it")

    def _take_turns(self, key: ApiKey, count: int, now: float) -> None:
        if key.rate is None:
            return
        wait_s = self.turns.wait_s(f"api:{key.name}", key.rate, key.burst, now, count)
        if wait_s > 0:
            wait = max(1, math.ceil(min(wait_s, 86_400)))
            raise Refused(
                429,
                f"rate limit of API key {key.name}: retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )


def _digest(path: str, messages: list[Message]) -> str:
    """The request as a digest: a replay must be the same request, whatever its JSON spacing or key order."""
    canonical = json.dumps([m.model_dump(mode="json", by_alias=True) for m in messages], sort_keys=True)
    return hashlib.sha256(f"{path}\n{canonical}".encode()).hexdigest()


def _answer(
    made: list[list[Composed]], ids: list[str], batch: bool, refused: list[list[dict[str, str]]]
) -> str:
    results: list[dict[str, Any]] = []
    it = iter(ids)
    for composed, suppressed in zip(made, refused, strict=True):
        result: dict[str, Any] = {
            "messages": [{"id": next(it), "recipients": list(c.recipients)} for c in composed]
        }
        if suppressed:
            result["suppressed"] = suppressed
        results.append(result)
    return json.dumps({"results": results} if batch else results[0])


def _replay(first: Answered, request_hash: str) -> Response:
    if first.request_hash != request_hash:
        raise BadInput("Idempotency-Key", "this key was used with another request (keys are per request)")
    return JSONResponse(json.loads(first.answer), status_code=202, headers={"Idempotent-Replayed": "true"})


def _too_large(limit: int) -> JSONResponse:
    return json_error(
        413,
        f"the request body is over the limit of {limit} octets ([api] max_request_size)",
        {"Connection": "close"},
    )


class SubmissionGuard:
    """Before a submission is parsed: its declared size (413, before a byte of it is read), its API key
    (401), then its body read here, counted as it arrives (413 as soon as it passes the limit), and
    handed to the route whole. Reading it here, not in a wrapped `receive`, keeps the refusal a plain
    response whatever middleware sits between (an exception raised from a read is turned into a 400 by
    FastAPI, or wrapped in an ExceptionGroup by BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, submissions: Submissions) -> None:
        self.app = app
        self.submissions = submissions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or ("POST", scope["path"]) not in PUBLIC_ROUTES
        ):
            await self.app(scope, receive, send)
            return
        limit = self.submissions.settings.api.max_request_size
        refusal = await self._refusal(scope, limit)
        if refusal is None:
            body = await _read_body(receive, limit)
            if body is None:
                refusal = _too_large(limit)
            elif not _is_utf8(body):
                # FastAPI would answer 400 "error parsing the body"; it is input, named like the rest.
                refusal = json_error(422, "body: not UTF-8 JSON (RFC 8259 8.1)", field="body")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        given = False

        async def replay() -> AsgiMessage:
            nonlocal given
            if given:
                return await receive()  # past the body: a disconnect, when it comes
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refusal(self, scope: Scope, limit: int) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return _too_large(limit)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = await self.submissions.keys.identify(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            challenge = _CHALLENGE + (', error="invalid_token"' if scheme.lower() == "bearer" else "")
            return json_error(401, "missing or unknown API key", {"WWW-Authenticate": challenge})
        scope.setdefault("state", {})["api_key"] = key
        return None


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as more than `limit` octets have arrived (the rest is not read)."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away: the route finds the body short
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# -- the published OpenAPI document ---------------------------------------------------------------------


ADMIN_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "400": ("A value the operation cannot use", {"error": "duration: a suspension lasts more than 0 s"}),
    "401": ("Missing or wrong admin token", {"error": "missing or wrong bearer token"}),
    "403": (
        "The admin API is off ([http] admin_token)",
        {"error": "the admin API is off: set [http] admin_token to turn it on"},
    ),
    "404": ("No such member or message", {"error": "no member named 'relay-z'"}),
    "422": (
        "Invalid input; `field` names it",
        {"error": "duration: Field required", "field": "duration", "errors": [], "details": []},
    ),
}


def _documented(description: str, example: dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        "description": description,
        "content": {"application/json": {"schema": schema, "example": example}},
    }


def published_openapi(app: FastAPI) -> dict[str, Any]:
    """Every /api/v1 route, its security, its errors (as ErrorBody) and examples: built once per app."""
    cached = getattr(app.state, "api_openapi", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    from fastapi.openapi.utils import get_openapi

    routes = [r for r in app.routes if getattr(r, "path", "").startswith(PREFIX)]
    doc = get_openapi(
        title="postmux API",
        version="1",
        description="HTTP submission (API keys) and the admin API (admin token). See docs/api.md.",
        routes=routes,
    )
    doc.setdefault("components", {}).setdefault("securitySchemes", {}).update(
        {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "An [[api_key]]'s key"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "[http] admin_token"},
        }
    )
    doc["components"].setdefault("schemas", {}).setdefault("ErrorBody", ErrorBody.model_json_schema())
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            public = (method.upper(), path) in PUBLIC_ROUTES
            operation["security"] = [{"apiKey": []}] if public else [{"adminToken": []}]
            responses = operation.setdefault("responses", {})
            if not public:
                for status, (description, example) in ADMIN_ERRORS.items():
                    responses.setdefault(status, _documented(description, example))
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):  # FastAPI's, not what is sent
                responses["422"] = _documented(*ADMIN_ERRORS["422"])
    doc["components"]["schemas"].pop("HTTPValidationError", None)
    doc["components"]["schemas"].pop("ValidationError", None)
    app.state.api_openapi = doc
    return doc
