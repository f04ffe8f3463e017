"""LoginGuard: scrypt checks bounded for the whole listener, and never freed early (issue 10 B5)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postmux.ingress.logins import LoginGuard, LoginOutcome
from postmux.passwords import hash_password
from tests.support import make_settings, wait_until

POOLS = [{"name": "p", "members": [{"name": "m", "address": "127.0.0.1:9"}]}]


def _guard(tmp_path: Path, n: int = 2**13, **smtp: object) -> LoginGuard:
    user = {"name": "billing", "password_hash": hash_password("s3cret", n=n)}
    return LoginGuard(make_settings(tmp_path, POOLS, smtp={"users": [user], **smtp}).smtp)


async def _most_running(guard: LoginGuard, work: asyncio.Future[object]) -> int:
    most = 0
    while not work.done():
        most = max(most, guard.running)
        await asyncio.sleep(0.001)
    return most


async def test_checks_from_many_addresses_run_at_most_max_concurrent_auth_checks_at_once(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path, max_concurrent_auth_checks=2)
    work = asyncio.gather(*(guard.check(f"192.0.2.{i}", "billing", b"wrong") for i in range(12)))
    assert await _most_running(guard, work) == 2
    assert await work == [LoginOutcome.INVALID] * 12


async def test_one_address_runs_at_most_two_checks_whatever_its_connections(tmp_path: Path) -> None:
    guard = _guard(tmp_path, max_concurrent_auth_checks=8, max_auth_failures_per_address=100)
    work = asyncio.gather(*(guard.check("192.0.2.1", "billing", b"wrong") for _ in range(10)))
    assert await _most_running(guard, work) == 2
    assert await work == [LoginOutcome.INVALID] * 10


async def test_a_client_that_hangs_up_mid_check_keeps_its_slot_until_the_check_is_done(
    tmp_path: Path,
) -> None:
    # A check slow enough (n=2^16: 64 MiB, about 0.1-0.3 s here) to be seen running, polled often: with
    # n=2^13 the check could end between two 20 ms polls and the wait failed on a quiet machine.
    guard = _guard(tmp_path, n=2**16, max_concurrent_auth_checks=1)
    gone = asyncio.create_task(guard.check("192.0.2.1", "billing", b"wrong"))
    await wait_until(lambda: guard.running == 1, timeout=2.0, interval=0.001)
    gone.cancel()
    await asyncio.sleep(0)
    assert guard.checks.locked()  # the scrypt is still running in its thread
    assert await guard.check("192.0.2.2", "billing", b"s3cret") is LoginOutcome.OK  # waited for it
    assert guard.running == 0 and not guard.checks.locked()
    assert guard.throttle.addresses.failures("192.0.2.1") == 1  # hanging up did not save the attempt


async def test_an_unauthorized_login_fails_with_the_right_password_and_counts_as_a_wrong_one(
    tmp_path: Path,
) -> None:
    # AUTH PLAIN with an authorization identity the user may not act as (RFC 4616 2).
    guard = _guard(tmp_path)
    outcome = await guard.check("192.0.2.1", "billing", b"s3cret", authorized=False)
    assert outcome is LoginOutcome.INVALID
    assert guard.throttle.addresses.failures("192.0.2.1") == 1
    assert guard.throttle.users.failures("billing") == 1
    assert not guard.throttle.known  # the address is not one the user logged in from
    assert await guard.check("192.0.2.1", "billing", b"s3cret") is LoginOutcome.OK
