from __future__ import annotations

import gc
import os
import sys

# Tests run against the source tree even when the package is not installed in editable mode.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from postmux.testing import Behaviour, Upstream, accept
from tests.postgres import TestDatabase
from tests.resolver_guard import GUARD
from tests.support import StartUpstream

# Installed as soon as the tests are collected, so nothing imported later can keep an unguarded resolver.
GUARD.install()


@pytest.fixture(autouse=True, scope="session")
def _resolve_only_loopback() -> Iterator[None]:
    """Session-wide: every lookup of a name other than localhost or a loopback address is refused."""
    GUARD.install()
    yield
    GUARD.uninstall()


@pytest.fixture(autouse=True)
def _no_lookup_went_unnoticed() -> Iterator[None]:
    """Fails the test that made a refused lookup, even when the code under test swallowed the error."""
    GUARD.take()
    yield
    attempts = GUARD.take()
    if attempts:
        pytest.fail("this test asked a resolver about names that are not loopback: " + ", ".join(attempts))


@pytest.fixture(autouse=True)
def _leaks_show_in_the_test_that_made_them() -> Iterator[None]:
    """A socket or file left open is reported (ResourceWarning, an error here) by the test that left it.

    Without a collection here, the garbage collector finds it whenever it next runs, in some later test
    that then fails for what another did.
    """
    yield
    gc.collect(1)  # the young generations: what the test just made, cheaply


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[TestDatabase]:
    """A database of this session's own on the local PostgreSQL, dropped at the end (tests/postgres.py)."""
    database = TestDatabase()
    database.create()
    yield database
    database.drop()


@pytest.fixture
def postgres_dsn(postgres_database: TestDatabase) -> str:
    """A schema of this test's own in the session's database, as a DSN whose search_path it is."""
    return postgres_database.new_schema()


@pytest.fixture
async def upstream() -> AsyncIterator[StartUpstream]:
    """Start upstream SMTP servers that are stopped (sockets closed) even when the test fails."""
    started: list[Upstream] = []

    async def start(name: str = "up", behaviour: Behaviour = accept, **options: Any) -> Upstream:
        up = await Upstream(name, behaviour, **options).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()
