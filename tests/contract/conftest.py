"""The backends every contract suite here runs against, unchanged: SQLite now, PostgreSQL next (issue 17).

A backend is a `spool_factory`: each call gives a new handle onto the one store of the test, so a test
can close a handle and open another on what it left (a restart). A backend added here (PostgreSQL: a
schema per test on a server named by an environment variable, skipped without one) only has to pass
the suites as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from postmux.spool.base import SpoolBackend
from postmux.spool.sqlite import SqliteSpool


class SpoolFactory(Protocol):
    def __call__(self, *, owner: str | None = None, lease_ttl_s: float | None = None) -> SpoolBackend: ...


@dataclass(frozen=True)
class SqliteBackend:
    path: Path

    def __call__(self, *, owner: str | None = None, lease_ttl_s: float | None = None) -> SpoolBackend:
        return SqliteSpool(self.path, owner=owner, lease_ttl_s=lease_ttl_s)


BACKENDS: dict[str, Callable[[Path], SpoolFactory]] = {
    "sqlite": lambda tmp_path: SqliteBackend(tmp_path / "spool.db"),
}


@pytest.fixture(params=sorted(BACKENDS))
def spool_factory(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolFactory:
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
async def spool(spool_factory: SpoolFactory) -> AsyncIterator[SpoolBackend]:
    """An open handle with the backend's defaults, closed after the test (closing twice is harmless)."""
    handle = spool_factory()
    await handle.open()
    yield handle
    await handle.close()
