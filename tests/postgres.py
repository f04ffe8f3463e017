"""A PostgreSQL database of the test session's own, on the local server (issue 17).

POSTMUX_TEST_PG_DSN names the server (default the local one that .ci/run starts: 127.0.0.1:5432, user
postgres, trust auth). The session creates postmux_test_<random> there and drops it at the end (FORCE:
a handle a failed test left open does not keep it); `new_schema` gives each test a schema of its own in
it, as a DSN whose search_path is that schema, so tests never see each other's tables or rows.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

SERVER_DSN = os.environ.get("POSTMUX_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def with_database(dsn: str, database: str, query: str = "") -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, query, ""))


@dataclass
class TestDatabase:
    """postmux_test_<random> on the server: `dsn` is the database, `new_schema` a schema of one test."""

    __test__ = False  # not a test class, whatever its name says to pytest

    name: str = field(default_factory=lambda: f"postmux_test_{secrets.token_hex(4)}")
    server: str = SERVER_DSN
    _schemas: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def dsn(self) -> str:
        return with_database(self.server, self.name)

    def create(self) -> None:
        asyncio.run(self._admin(f"CREATE DATABASE {self.name}"))

    def drop(self) -> None:
        asyncio.run(self._admin(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))

    def new_schema(self) -> str:
        schema = f"t{next(self._schemas)}"
        asyncio.run(self._in_database(f"CREATE SCHEMA {schema}"))
        # asyncpg passes a DSN's unknown query parameters to the server as settings.
        return with_database(self.server, self.name, f"search_path={schema}")

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.server)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def _in_database(self, statement: str) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
