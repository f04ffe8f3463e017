"""The admin HTTP API under /api/v1: members, shaping, drain and enable, suspend and resume, the queue
(summary, listing, show, and flush, hold, release, delete, bounce, move on a selector), webhooks, the
suppression list (admin/suppressions.py), blocklists, the DNS doctor of a sending domain, reload.

Mounted on the HTTP server of ingress/http.py (beside /metrics and /healthz) by the composition root;
every route asks Control, which holds the node's parts. JSON in, JSON out; every refusal is a 4xx with
`{"error": "..."}` (and `field` when one field is at fault).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from postmux.admin.control import Control, NothingHeld, UnknownMember
from postmux.admin.queue import QueueControl, QueueRequestError, UnknownMessage, criteria, query_fields
from postmux.admin.suppressions import suppression_routes
from postmux.config import parse_duration
from postmux.ingress.http import json_error
from postmux.reputation.doctor import Report
from postmux.spool.base import SpoolError

ADMIN_PREFIX = "/api/v1"

# RFC 9110 11.6.1: a 401 carries at least one challenge; RFC 6750 3: the Bearer scheme's, with
# error="invalid_token" when a token was given and is wrong (none given: no error code).
_CHALLENGE = 'Bearer realm="postmux"'


def admin_api(
    control: Control, token: str | None, public: Collection[tuple[str, str]] = ()
) -> Callable[[FastAPI], None]:
    """What mounts the admin API on an HTTP app: its token guard and its routes.

    `public`: (method, path) pairs under /api/v1 that are not the admin's (the submission API, which
    guards itself with API keys, and the OpenAPI document).
    """

    def mount(app: FastAPI) -> None:
        app.middleware("http")(_admin_guard(token, frozenset(public)))
        _admin_routes(app, control)

    return mount


def _admin_guard(token: str | None, public: frozenset[tuple[str, str]]) -> Any:
    """Every admin call carries `Authorization: Bearer TOKEN`; no token configured means no admin API."""

    async def guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if not path.startswith(ADMIN_PREFIX) or (request.method, path) in public:
            response: Response = await call_next(request)
            return response
        if token is None:
            return json_error(403, "the admin API is off: set [http] admin_token to turn it on")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            challenge = _CHALLENGE + (', error="invalid_token"' if scheme.lower() == "bearer" else "")
            return json_error(401, "missing or wrong bearer token", {"WWW-Authenticate": challenge})
        response = await call_next(request)
        return response

    return guard


def _admin_routes(app: FastAPI, control: Control) -> None:
    # Every admin route is async: it runs in the event loop that owns the state it reads and changes.
    @app.get(f"{ADMIN_PREFIX}/members")
    async def members() -> dict[str, Any]:
        return {"members": control.members()}

    @app.get(f"{ADMIN_PREFIX}/shaping")
    async def shaping() -> dict[str, Any]:
        return {"lanes": control.shaping()}

    # {name:path}: a name is taken whole, "/" included (the CLI sends it as one encoded segment, which
    # the server decodes before routing); an unknown one is a 404 with the name, never another member.
    def set_draining(name: str, draining: bool) -> Any:
        try:
            return {"members": control.set_draining(name, draining)}
        except UnknownMember:
            return json_error(404, f"no member named {name!r}")

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/drain")
    async def drain(name: str) -> Any:
        return set_draining(name, True)

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/enable")
    async def enable(name: str) -> Any:
        return set_draining(name, False)

    # `:path`: an id with a "/" in it (never one of ours, but a typo can be) gets the same clear 404.
    @app.post(f"{ADMIN_PREFIX}/messages/{{message_id:path}}/release")
    async def release(message_id: str) -> Any:
        try:
            return await control.release(message_id)
        except NothingHeld:
            return json_error(404, f"no held message with id {message_id!r}")
        except SpoolError as e:  # as the queue routes say it (_answer): the spool, not this request
            return json_error(503, f"the spool could not answer: {e}")

    _shaping_routes(app, control)
    _queue_routes(app, control.queue)
    if control.node.suppressions is not None:
        suppression_routes(app, control.node.suppressions)

    @app.get(f"{ADMIN_PREFIX}/webhooks")
    async def webhooks() -> Any:
        try:
            return {"webhooks": await control.webhooks()}
        except SpoolError as e:  # the backlog is read from the spool: down, it is the queue routes' 503
            return json_error(503, f"the spool could not answer: {e}")

    @app.delete(f"{ADMIN_PREFIX}/webhooks/{{endpoint}}/records")
    async def drop_webhook_records(endpoint: str) -> Any:
        try:
            return {"endpoint": endpoint, "dropped": await control.drop_webhook_records(endpoint)}
        except ValueError as e:  # configured here: its sender's records
            return json_error(409, str(e))
        except SpoolError as e:
            return json_error(503, f"the spool could not answer: {e}")

    @app.get(f"{ADMIN_PREFIX}/blocklists")
    async def blocklists() -> dict[str, Any]:
        """The blocklist watch: zones, the last round, every sending IP and domain x zone, listed or not."""
        return control.blocklists()

    # The domain is one path segment; what is not a domain name is a 400 before any lookup.
    @app.get(f"{ADMIN_PREFIX}/doctor/{{domain}}", response_model=Report, summary="DNS doctor of a domain")
    async def doctor(domain: str) -> Any:
        """The sending domain's MX, SPF, DKIM, DMARC, MTA-STS and TLS-RPT records and its source members'
        reverse DNS, checked against the running configuration; then the Gmail/Yahoo bulk-sender rules.
        `ok` is false when a check or a rule fails (docs/api.md)."""
        try:
            return await control.doctor(domain)
        except ValueError as e:
            return json_error(400, str(e))

    @app.post(f"{ADMIN_PREFIX}/reload")
    async def reload() -> Any:
        result = control.reload()
        if not result.ok:
            return JSONResponse(
                {"error": "configuration refused; the running one is unchanged", **result.as_dict()}, 400
            )
        return result.as_dict()


def _shaping_routes(app: FastAPI, control: Control) -> None:
    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/suspend")
    async def suspend(name: str, destination: str = "", duration: str = "1h") -> Any:
        if not destination:
            return json_error(400, "suspend needs a destination (a provider such as google, or a domain)")
        try:
            duration_s = parse_duration(duration)
        except ValueError as e:
            return json_error(400, f"duration: {e}")
        if duration_s <= 0:
            return json_error(400, "duration: a suspension lasts more than 0 s")
        try:
            return {"lanes": control.suspend(name, destination, duration_s)}
        except UnknownMember:
            return json_error(404, f"no member named {name!r}")
        except ValueError as e:
            return json_error(400, f"destination: {e}")

    @app.post(f"{ADMIN_PREFIX}/members/{{name:path}}/resume")
    async def resume(name: str, destination: str | None = None) -> Any:
        try:
            return {"lanes": control.resume(name, destination or None)}
        except UnknownMember:
            return json_error(404, f"no member named {name!r}")
        except ValueError as e:
            return json_error(400, f"destination: {e}")


async def _answer(work: Callable[[], Awaitable[dict[str, Any]]]) -> Any:
    """How the queue routes say no: a 4xx naming the field, 404 for a message, 503 for the spool."""
    try:
        return await work()
    except QueueRequestError as e:
        if e.field:
            return json_error(e.status, str(e), field=e.field)
        return json_error(e.status, str(e))
    except UnknownMessage as e:
        return json_error(404, f"no message with id {e.args[0]!r} in the queue")
    except SpoolError as e:
        return json_error(503, f"the spool could not answer: {e}")


def _queue_routes(app: FastAPI, queue: QueueControl) -> None:
    @app.get(f"{ADMIN_PREFIX}/queue")
    async def summary(request: Request) -> Any:
        return await _answer(lambda: queue.summary(criteria(query_fields(request.query_params))))

    @app.get(f"{ADMIN_PREFIX}/queue/messages")
    async def listing(request: Request) -> Any:
        query = request.query_params

        async def page() -> dict[str, Any]:
            try:
                limit = int(query.get("limit", "100"))
            except ValueError:
                raise QueueRequestError("limit", f"{query['limit']!r} is not a number") from None
            return await queue.listing(criteria(query_fields(query)), limit, query.get("after", ""))

        return await _answer(page)

    @app.get(f"{ADMIN_PREFIX}/queue/messages/{{message_id:path}}")
    async def show(message_id: str) -> Any:
        return await _answer(lambda: queue.show(message_id))

    @app.post(f"{ADMIN_PREFIX}/queue/{{verb}}")
    async def act(verb: str, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            return json_error(400, f"the body is not JSON: {e}")
        except RecursionError:
            # json's decoder recurses per nesting level: "[" * 200000 is valid JSON it cannot read. No
            # selector nests at all, so such a body is refused as any other that is not one.
            return json_error(400, "the body is not JSON this API reads: nested too deeply")
        if not isinstance(body, dict):
            return json_error(400, "the body is a JSON object: the selector's fields, all, reason, to")
        return await _answer(lambda: queue.act(verb, body))
