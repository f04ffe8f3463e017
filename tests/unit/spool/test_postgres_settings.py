"""`[spool] backend = "postgresql"`: its keys checked at load, the spool the factory builds from them, and
`postmux migrate` on a real database (the schema's version: created, up to date, newer refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from postmux.cli import app
from postmux.config import ConfigError, settings_from_dict
from postmux.spool.base import SpoolError
from postmux.spool.factory import make_spool
from postmux.spool.postgres import PostgresSpool
from postmux.spool.postgres_schema import LATEST

POOLS: list[dict[str, Any]] = [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]}]


def spool_problems(spool: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"pool": POOLS, "spool": spool}, "postmux.toml")
    return dict(caught.value.problems)


def test_a_postgresql_backend_needs_a_postgresql_dsn_and_never_echoes_it() -> None:
    assert spool_problems({"backend": "postgresql"}) == {
        "spool": "backend = 'postgresql' needs dsn = 'postgresql://USER@HOST:PORT/DATABASE'"
    }
    problems = spool_problems({"backend": "postgresql", "dsn": "mysql://u:secret@h/db"})
    assert "secret" not in str(problems) and list(problems) == ["spool"]
    assert spool_problems({"dsn": "postgresql://h/db"}) == {
        "spool": "dsn is for backend = 'postgresql'; a SQLite spool is `path`"
    }
    assert list(spool_problems({"backend": "postgresql", "dsn": "postgresql://h/db", "lease_ttl": "0s"})) == [
        "spool.lease_ttl"
    ]


def test_the_factory_builds_a_postgresql_spool_with_the_nodes_id_and_lease_time(tmp_path: Path) -> None:
    spool = make_spool(
        settings_from_dict(
            {
                "pool": POOLS,
                "spool": {
                    "backend": "postgresql",
                    "dsn": "postgresql://postgres@127.0.0.1:5432/postmux",
                    "node_id": "node-a",
                    "lease_ttl": "90s",
                    "path": str(tmp_path / "spool.db"),
                },
            }
        ).spool
    )
    assert isinstance(spool, PostgresSpool)
    assert (spool.owner, spool.lease_ttl_s, spool.spill_dir) == ("node-a", 90.0, tmp_path / "spill")


def config_file(tmp_path: Path, dsn: str) -> Path:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        f'[spool]\nbackend = "postgresql"\ndsn = "{dsn}"\n\n'
        '[[pool]]\nname = "default"\nmembers = [{ name = "a", address = "127.0.0.1:2601" }]\n'
    )
    return cfg


def last_line(output: str) -> str:
    """What the command said last (the log lines of the steps it applied come before it)."""
    return output.strip().splitlines()[-1]


def test_migrate_creates_the_schema_then_finds_it_up_to_date(tmp_path: Path, postgres_dsn: str) -> None:
    cfg = config_file(tmp_path, postgres_dsn)
    first = CliRunner().invoke(app, ["migrate", "-c", str(cfg)])
    assert (first.exit_code, last_line(first.stdout)) == (0, f"spool schema: version 0 -> {LATEST}")
    again = CliRunner().invoke(app, ["migrate", "-c", str(cfg)])
    assert (again.exit_code, last_line(again.stdout)) == (0, f"spool schema: version {LATEST}, up to date")


def test_migrate_on_a_sqlite_spool_has_nothing_to_do(tmp_path: Path) -> None:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text('[[pool]]\nname = "default"\nmembers = [{ name = "a", address = "127.0.0.1:2601" }]\n')
    result = CliRunner().invoke(app, ["migrate", "-c", str(cfg)])
    assert result.exit_code == 0 and "nothing to migrate" in result.stdout


def test_migrate_says_in_one_line_when_the_server_cannot_be_reached(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, "postgresql://postgres@127.0.0.1:1/postmux")  # nothing listens on port 1
    result = CliRunner().invoke(app, ["migrate", "-c", str(cfg)])
    assert result.exit_code == 1
    assert result.stderr.startswith("postmux: cannot migrate the spool: ")


async def test_a_node_refuses_a_schema_newer_than_it_knows(postgres_dsn: str) -> None:
    spool = PostgresSpool(postgres_dsn)
    await spool.open()
    await spool.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("INSERT INTO postmux_schema (version) VALUES ($1)", LATEST + 1)
    finally:
        await conn.close()
    with pytest.raises(SpoolError, match=f"version {LATEST + 1}, newer than this postmux"):
        await PostgresSpool(postgres_dsn).open()
