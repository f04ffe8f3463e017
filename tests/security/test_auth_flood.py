"""Password guessing over many connections (issue 10 B5): budgets per client address and per user name
across connections (ingress/anvil.py), and scrypt checks that a guesser cannot pile up (ingress/logins.py)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from structlog.testing import capture_logs

from postmux.passwords import hash_password
from tests.security.client import RawClient
from tests.security.conftest import StartGateway

# postmux passwd's cost is n=2^15; 2^14 keeps the test short and each check still tens of milliseconds.
USERS = [
    {"name": "billing", "password_hash": hash_password("s3cret", n=2**14)},
    {"name": "reports", "password_hash": hash_password("r3ports", n=2**14)},
]
INVALID = "535 5.7.8 Authentication credentials invalid"
ADDRESS_THROTTLED = (
    "421 4.7.0 postmux.test Error: too many failed authentications from your address, try again later"
)
USER_THROTTLED = "454 4.7.0 Too many failed authentications for this user, try again later"
OK = "235 2.7.0 Authentication successful"


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def _login(port: int, source: str, user: str, password: str) -> tuple[str, float]:
    """One connection, one login: the reply and how long it took."""
    client = await RawClient.connect(port, local_addr=source)
    await client.cmd("EHLO client.test")
    started = time.monotonic()
    reply = await client.cmd(plain(user, password))
    took = time.monotonic() - started
    await client.close()
    return reply, took


async def _guess(port: int, source: str, n: int) -> list[str]:
    """One connection that guesses `n` passwords, or until it is shown the door."""
    client = await RawClient.connect(port, local_addr=source)
    await client.cmd("EHLO client.test")
    replies = []
    for i in range(n):
        await client.send(f"{plain('billing', f'guess-{i}')}\r\n".encode())
        reply = await client.reply(timeout=30)
        replies.append(reply)
        if reply != INVALID:
            break
    await client.close()
    return replies


def _events(logged: list[dict[str, Any]], event: str, **fields: str) -> list[dict[str, Any]]:
    return [e for e in logged if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]


async def test_parallel_guessing_from_one_address_is_cut_off_while_a_real_user_logs_in_fast(
    gateway: StartGateway,
) -> None:
    app = await gateway(
        users=USERS,
        auth_require_tls=False,
        auth_failure_delay=0.1,
        max_auth_failures=3,
        max_auth_failures_per_address=10,
    )
    with capture_logs() as logged:
        attack = asyncio.gather(*(_guess(app.smtp_port, "127.0.0.5", 3) for _ in range(60)))
        await asyncio.sleep(0.2)  # the guessing is under way
        real = [await _login(app.smtp_port, "127.0.0.6", "billing", "s3cret") for _ in range(3)]
        replies = [r for conn in await attack for r in conn]
    # Ten guesses were checked; every other attempt got the 421 before any scrypt work.
    assert replies.count(INVALID) == 10
    assert len(_events(logged, "authentication failed", client="127.0.0.5")) == 10
    assert replies.count(ADDRESS_THROTTLED) == len(replies) - 10 >= 50
    assert _events(logged, "authentication throttled", client="127.0.0.5", scope="address")
    assert [reply for reply, _ in real] == [OK] * 3
    assert max(took for _, took in real) < 1.0, real
    # The address stays refused for the window, even with the right password, on a new connection.
    assert (await _login(app.smtp_port, "127.0.0.5", "billing", "s3cret"))[0] == ADDRESS_THROTTLED


async def test_a_user_guessed_from_many_addresses_is_refused_from_new_ones_but_its_application_logs_in(
    gateway: StartGateway,
) -> None:
    app = await gateway(
        users=USERS,
        auth_require_tls=False,
        auth_failure_delay=0,
        max_auth_failures_per_address=3,
        max_auth_failures_per_user=5,
    )
    port = app.smtp_port
    assert (await _login(port, "127.0.0.30", "billing", "s3cret"))[0] == OK  # the application, earlier
    with capture_logs() as logged:
        guesses = [(await _login(port, f"127.0.0.{40 + i}", "billing", "wrong"))[0] for i in range(8)]
    assert guesses == [INVALID] * 5 + [USER_THROTTLED] * 3  # one guess an address: no address budget is hit
    assert len(_events(logged, "authentication failed")) == 5
    assert _events(logged, "authentication throttled", user="billing", scope="user")
    assert (await _login(port, "127.0.0.30", "billing", "s3cret"))[0] == OK
    assert (await _login(port, "127.0.0.60", "billing", "s3cret"))[0] == USER_THROTTLED
    assert (await _login(port, "127.0.0.60", "reports", "r3ports"))[0] == OK


async def test_a_throttled_user_does_not_end_the_session(gateway: StartGateway) -> None:
    app = await gateway(
        users=USERS, auth_require_tls=False, auth_failure_delay=0, max_auth_failures_per_user=1
    )
    assert (await _login(app.smtp_port, "127.0.0.70", "billing", "wrong"))[0] == INVALID
    client = await RawClient.connect(app.smtp_port, local_addr="127.0.0.71")
    await client.cmd("EHLO client.test")
    assert await client.cmd(plain("billing", "s3cret")) == USER_THROTTLED
    assert await client.cmd(plain("reports", "r3ports")) == OK
    await client.close()
