"""The backends every contract suite here runs against, unchanged: SQLite and PostgreSQL (issue 17).

A backend is a `spool_factory`: each call gives a new handle onto the one store of the test, so a test
can close a handle and open another on what it left (a restart). PostgreSQL: the server named by
POSTMUX_TEST_PG_DSN (default the local one, 127.0.0.1:5432, which .ci/run starts); the session creates a
database of its own (postmux_test_<random>) and drops it at the end, and each test gets a schema of its
own in it (the spool's search_path), so tests never see each other's rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from postmux.spool.base import SpoolBackend
from postmux.spool.postgres import PostgresSpool
from postmux.spool.sqlite import SqliteSpool
from tests.postgres import TestDatabase


class SpoolFactory(Protocol):
    def __call__(self, *, owner: str | None = None, lease_ttl_s: float | None = None) -> SpoolBackend: ...


@dataclass(frozen=True)
class SqliteBackend:
    path: Path

    def __call__(self, *, owner: str | None = None, lease_ttl_s: float | None = None) -> SpoolBackend:
        return SqliteSpool(self.path, owner=owner, lease_ttl_s=lease_ttl_s)


@dataclass(frozen=True)
class PostgresBackend:
    dsn: str  # the test's database, with the test's schema as its search_path
    spill_dir: Path

    def __call__(self, *, owner: str | None = None, lease_ttl_s: float | None = None) -> SpoolBackend:
        return PostgresSpool(self.dsn, owner=owner, lease_ttl_s=lease_ttl_s, spill_dir=self.spill_dir)


BACKENDS = ("postgresql", "sqlite")


@pytest.fixture(params=BACKENDS)
def spool_factory(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolFactory:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "spool.db")
    database: TestDatabase = request.getfixturevalue("postgres_database")
    return PostgresBackend(database.new_schema(), tmp_path / "spill")


@pytest.fixture
async def spool(spool_factory: SpoolFactory) -> AsyncIterator[SpoolBackend]:
    """An open handle with the backend's defaults, closed after the test (closing twice is harmless)."""
    handle = spool_factory()
    await handle.open()
    yield handle
    await handle.close()
