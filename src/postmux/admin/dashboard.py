"""The live dashboard at / on the [http] listener: one page, fed over Server-Sent Events.

Behind the admin token: a login form (POST /login) checks it and sets an HttpOnly, SameSite=Strict
cookie holding a value derived from the token (an HMAC of it), never the token itself and never in a
URL. Without that cookie the data routes answer 401 and / shows only the form.

What the page reads:
- GET /dashboard/stream: a snapshot a second (members, redundancy, the hour's series, shaping lanes,
  the events since the last one sent; the queue summary every few seconds) while the page is open.
  Nothing is computed while nobody watches: the history (admin/history.py) only appends per event.
- /dashboard/api/v1/...: the admin API's own routes (admin/api.py), called in-process with the admin
  token, for the buttons (drain, enable, queue flush, hold, release) and a message's history. The
  admin API's bearer check is unchanged; this is the one door from the cookie to it, and it wants a
  header a cross-site form cannot send (X-Postmux-Dashboard) besides the SameSite cookie.

The charts are uPlot (MIT), vendored into static/vendor/ (see static/vendor/README.md): served by
postmux itself, with no CDN and no build step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from postmux.admin.api import ADMIN_PREFIX
from postmux.admin.control import Control
from postmux.admin.history import History
from postmux.admin.queue import criteria
from postmux.balancing.pool import Pool
from postmux.ingress.http import json_error

COOKIE = "postmux_session"
COOKIE_MAX_AGE_S = 12 * 3600
CSRF_HEADER = "x-postmux-dashboard"
TICK_S = 1.0  # a snapshot a second while a page is open
QUEUE_EVERY_S = 5.0  # the queue summary reads the spool: less often
EVENTS_PER_TICK = 300  # the page keeps its own ring; a burst past this shows its newest events
_LIVE_STATES = ("up", "ramping")


def session_value(token: str) -> str:
    """What the cookie holds: derived from the token (so a new token ends every session), not the token."""
    return hmac.new(token.encode(), b"postmux dashboard session v1", hashlib.sha256).hexdigest()


def capacity_per_min(member: Mapping[str, Any], peak_per_min: int) -> float:
    """What a member can carry per minute, as far as the node knows: the most it carried in a minute of
    the hour, or what its connection cap allows at its EWMA attempt latency (Little's law: throughput =
    concurrency / latency), whichever is more. Without a latency sample, only the observed peak."""
    latency_s = member["ewma_latency_ms"] / 1000
    by_latency = member["max_connections"] * 60 / latency_s if latency_s > 0 else 0.0
    return max(float(peak_per_min), by_latency)


def redundancy(pool: str, members: list[Mapping[str, Any]], peak_per_min: int) -> dict[str, Any]:
    """N+1 at a glance: does the pool still carry its busiest minute of the hour if its biggest member
    that is up fails? `n_plus_1` is None while the pool carried nothing this hour (nothing to judge)."""
    up = [m for m in members if m["state"] in _LIVE_STATES]
    capacities = [m["capacity_per_min"] for m in up]
    without_biggest = sum(capacities) - max(capacities, default=0.0)
    return {
        "pool": pool,
        "members": len(members),
        "up": len(up),
        "peak_per_min": peak_per_min,
        "capacity_per_min": round(sum(capacities), 1),
        "without_biggest_per_min": round(without_biggest, 1),
        "n_plus_1": None if peak_per_min == 0 else without_biggest >= peak_per_min,
    }


def zones(members: Sequence[Mapping[str, Any]], node_zone: str | None) -> list[dict[str, Any]]:
    """A pool's members by zone: how many are up of all, and the share of the last minute's attempts
    (recipient outcomes) that went to each zone. The node's zone comes first, members without a zone
    (near to every node, balancing/zones.py) last; `share` is None while the pool had no attempt."""
    by_zone: dict[str, dict[str, Any]] = {}
    for m in members:
        zone = m["zone"]
        row = by_zone.setdefault(
            zone,
            {
                "zone": zone,
                "local": node_zone is not None and zone in (node_zone, ""),
                "members": 0,
                "up": 0,
                "attempts_last_min": 0.0,
            },
        )
        row["members"] += 1
        row["up"] += m["state"] in _LIVE_STATES
        row["attempts_last_min"] += m["attempts_last_min"]
    total = sum(r["attempts_last_min"] for r in by_zone.values())
    for r in by_zone.values():
        r["share"] = round(r["attempts_last_min"] / total, 4) if total else None
        r["attempts_last_min"] = round(r["attempts_last_min"], 1)
    return sorted(by_zone.values(), key=lambda r: (r["zone"] != node_zone, r["zone"] == "", r["zone"]))


def zone_routing(pool: Pool, now: float) -> dict[str, Any]:
    """Where the node's picks of the pool go, by zone (Pool.zone_routing), as the page shows it."""
    r = pool.zone_routing(now)
    return {
        "state": r.state,
        "local_share": None if r.local_share is None else round(r.local_share, 4),
        "local_health": None if r.local_health is None else round(r.local_health, 4),
        "local_threshold": r.local_threshold,
    }


class Dashboard:
    def __init__(
        self,
        control: Control,
        history: History,
        token: str | None,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
    ) -> None:
        self.control = control
        self.history = history
        self.token = token
        self.clock = clock
        self.tick_s = tick_s
        self.watching = 0  # pages connected now (the bench and tests read it)
        # Set at shutdown: an open page's stream ends, so the HTTP server's shutdown does not wait on it.
        self._closing = asyncio.Event()

    async def close(self) -> None:
        """End the open pages' streams (before the HTTP listener stops: it waits for its responses)."""
        self._closing.set()

    # -- the session ---------------------------------------------------------------------------------

    def signed_in(self, request: Request) -> bool:
        if self.token is None:
            return False
        given = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), session_value(self.token).encode())

    # -- what the page shows -------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        history = self.history
        pools = self.control.node.pools
        rows = []
        for row in self.control.members():
            pool, name = row["pool"], row["member"]
            member = pools[pool].member(name) if pool in pools else None
            peak = history.member_peak(pool, name)
            rate = history.member_error_rate(pool, name)
            rows.append(
                {
                    **row,
                    "why": history.why.get((pool, name), "") or row["recent_error"],
                    "ejections": member.ejections if member else 0,
                    "error_rate": None if rate is None else round(rate, 4),
                    "peak_per_min": peak,
                    "attempts_last_min": round(history.member_last_minute(pool, name), 1),
                    "capacity_per_min": round(capacity_per_min(row, peak), 1),
                }
            )
        return rows

    def node(self) -> dict[str, Any]:
        """The node's own name ([node] name, "" when unset) and zone ([node] zone, None when unset)."""
        settings = self.control.node.settings
        node = settings().node if settings is not None else None
        return {"name": node.name if node else "", "zone": node.zone if node else None}

    def pools(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for name, pool in self.control.node.pools.items():
            mine: list[Mapping[str, Any]] = [m for m in members if m["pool"] == name]
            out.append(
                {
                    **redundancy(name, mine, self.history.pool_peak(name)),
                    "zone_routing": zone_routing(pool, now),
                    "zones": zones(mine, pool.zone),
                }
            )
        return out

    async def queue(self) -> dict[str, Any]:
        try:
            return await self.control.queue.summary(criteria({}))
        except Exception as e:  # the page says so and goes on; the next read may work
            return {"error": f"the spool could not answer: {e}", "destinations": []}

    async def snapshot(
        self, after_seq: int, with_queue: bool, events: int = EVENTS_PER_TICK
    ) -> dict[str, Any]:
        members = self.members()
        out: dict[str, Any] = {
            "now": self.clock(),
            "node": self.node(),
            "members": members,
            "pools": self.pools(members),
            "series": self.history.series(),
            "lanes": self.control.shaping(),
            "events": self.history.events_after(after_seq, events),
            "seq": self.history.seq,
        }
        if with_queue:
            out["queue"] = await self.queue()
        return out

    async def stream(self, request: Request) -> AsyncIterator[dict[str, str]]:
        """A snapshot a tick while the page is connected; nothing once it goes."""
        seq, last_queue = 0, -QUEUE_EVERY_S
        self.watching += 1
        try:
            while not self._closing.is_set() and not await request.is_disconnected():
                now = time.monotonic()
                with_queue = now - last_queue >= QUEUE_EVERY_S
                if with_queue:
                    last_queue = now
                # The first snapshot brings the whole ring (1,000 events), later ones what is new.
                limit = EVENTS_PER_TICK if seq else self.history.recent.maxlen or EVENTS_PER_TICK
                snap = await self.snapshot(seq, with_queue, limit)
                seq = snap["seq"]
                yield {"event": "snapshot", "data": json.dumps(snap, separators=(",", ":"))}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.tick_s)
        finally:
            self.watching -= 1

    # -- the routes ----------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        static = resources.files("postmux.admin") / "static"
        app.mount("/dashboard/static", StaticFiles(directory=str(static)), name="dashboard-static")

        @app.get("/", include_in_schema=False)
        async def index(request: Request) -> Response:
            if not self.signed_in(request):
                return _login_page(self.token is not None)
            return HTMLResponse((static / "dashboard.html").read_text(), headers=_NO_STORE)

        @app.post("/login", include_in_schema=False)
        async def login(request: Request) -> Response:
            return await self.login(request)

        @app.post("/logout", include_in_schema=False)
        async def logout() -> Response:
            response = RedirectResponse("/", status_code=303)
            response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
            return response

        @app.get("/dashboard/stream", include_in_schema=False)
        async def stream(request: Request) -> Response:
            if not self.signed_in(request):
                return json_error(401, "sign in at / first")
            return EventSourceResponse(self.stream(request), ping=15, headers=_NO_STORE)

        @app.get("/dashboard/state", include_in_schema=False)
        async def state(request: Request) -> Response:
            if not self.signed_in(request):
                return json_error(401, "sign in at / first")
            return Response(json.dumps(await self.snapshot(0, True)), media_type="application/json")

        # The same snapshot for the admin API's clients (`postmux top`), behind its bearer token like
        # every route under /api/v1 (admin/api.py's guard); without the events, which the page alone shows.
        @app.get(f"{ADMIN_PREFIX}/dashboard")
        async def dashboard_snapshot() -> dict[str, Any]:
            """The dashboard's snapshot: members, redundancy per pool, the hour's series, lanes, queue."""
            return await self.snapshot(self.history.seq, True)

        @app.api_route(
            "/dashboard" + ADMIN_PREFIX + "/{path:path}", methods=["GET", "POST"], include_in_schema=False
        )
        async def admin(path: str, request: Request) -> Response:
            return await self.call_admin(request, path)

    async def login(self, request: Request) -> Response:
        """The form's POST: the right token gets the session cookie and a redirect to /; else 401."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if self.token is None:
            return _login_page(False, status=403)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _login_page(True, "wrong token", status=401)
        # 303: the browser follows with a GET of /, so a reload does not post the token again.
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            session_value(self.token),
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def call_admin(self, request: Request, path: str) -> Response:
        """The admin API's route `path`, called in-process with the admin token on the page's behalf."""
        if not self.signed_in(request) or self.token is None:
            return json_error(401, "sign in at / first")
        if request.method == "POST" and request.headers.get(CSRF_HEADER) != "1":
            return json_error(403, f"the dashboard's changes carry the {CSRF_HEADER} header")
        if ".." in path.split("/"):  # an admin route, never a way out of /api/v1
            return json_error(404, "no such admin route")
        transport = httpx.ASGITransport(app=request.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://postmux") as client:
            answer = await client.request(
                request.method,
                f"{ADMIN_PREFIX}/{path}",
                params=request.query_params,
                content=await request.body(),
                headers={
                    "authorization": f"Bearer {self.token}",
                    "content-type": request.headers.get("content-type", "application/json"),
                },
            )
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))


_NO_STORE = {"Cache-Control": "no-store"}


def _login_page(enabled: bool, problem: str = "", status: int = 200) -> HTMLResponse:
    if not enabled:
        body = "<p>The dashboard is off: set <code>[http] admin_token</code> to turn it on.</p>"
        status = status if status != 200 else 403
    else:
        said = f'<p class="problem" id="problem">{html.escape(problem)}</p>' if problem else ""
        body = (
            f"{said}<form method=post action=/login>"
            "<label>Admin token <input type=password name=token autocomplete=current-password autofocus>"
            "</label> <button type=submit>Sign in</button></form>"
        )
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>postmux: sign in</title>"
        '<link rel=stylesheet href="/dashboard/static/dashboard.css"></head>'
        f'<body class="login"><h1>postmux</h1>{body}</body></html>'
    )
    return HTMLResponse(page, status_code=status, headers=_NO_STORE)
