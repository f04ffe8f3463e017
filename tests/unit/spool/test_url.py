"""`[spool] url` beside `path`: a sqlite:/// URL is the same as `path`, anything else is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from postmux.cli import app
from postmux.config import ConfigError, settings_from_dict
from postmux.envelope import Envelope, new_message_id
from postmux.spool.base import Selector
from postmux.spool.factory import make_spool
from postmux.spool.sqlite import SqliteSpool

POOLS: list[dict[str, Any]] = [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]}]


def spool_problems(spool: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"pool": POOLS, "spool": spool}, "postmux.toml")
    return dict(caught.value.problems)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/spool.db", "var/spool.db"),
        ("sqlite:////var/lib/postmux/spool.db", "/var/lib/postmux/spool.db"),
        ("SQLite:///spool%20files/s.db", "spool files/s.db"),
    ],
)
def test_a_sqlite_url_names_the_spool_file_as_path_does(url: str, path: str) -> None:
    spool = settings_from_dict({"pool": POOLS, "spool": {"url": url}}).spool
    assert (spool.url, spool.path) == (url, path)


def test_a_url_and_a_path_that_agree_are_both_accepted() -> None:
    spool = settings_from_dict({"pool": POOLS, "spool": {"url": "sqlite:///a.db", "path": "a.db"}}).spool
    assert spool.path == "a.db"


def test_a_url_and_a_path_naming_different_files_are_refused_under_url() -> None:
    found = spool_problems({"url": "sqlite:///a.db", "path": "b.db"})
    assert found == {"spool.url": "names the file 'a.db' but path names 'b.db': set one of them"}


@pytest.mark.parametrize(
    "url", ["mysql://u:secret@db/postmux", "sqlite://host/a.db", "sqlite:///a.db?mode=ro", "var/spool.db"]
)
def test_a_url_that_names_no_sqlite_file_is_refused_without_echoing_it(url: str) -> None:
    found = spool_problems({"url": url})
    assert found == {
        "spool.url": "not a spool URL: write 'sqlite:///PATH' (sqlite:////PATH for an absolute path)"
    }


def test_check_config_points_a_postgresql_url_to_backend_and_dsn_naming_file_and_key(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        '[spool]\nurl = "postgresql://postmux:secret@db.example.test/postmux"\n\n'
        '[[pool]]\nname = "default"\nmembers = [{ name = "a", address = "127.0.0.1:2601" }]\n'
    )
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"{cfg}: spool.url: a PostgreSQL spool is set with backend = 'postgresql'"
        " and dsn = 'postgresql://...'"
    )
    assert "secret" not in result.output


async def test_the_factory_opens_a_sqlite_spool_on_the_urls_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/by-url/spool.db"  # tmp_path is absolute: sqlite:////tmp/...
    spool = make_spool(settings_from_dict({"pool": POOLS, "spool": {"url": url}}).spool)
    assert isinstance(spool, SqliteSpool)
    await spool.open()
    mid = new_message_id()
    await spool.store(mid, Envelope("a@x.test", ("b@y.test",), b"\r\n"), {"b@y.test": "default"}, 1.0)
    page = await spool.list_queue(Selector(), 1.0)
    await spool.close()
    assert [m.message_id for m in page.messages] == [mid]
    assert (tmp_path / "by-url" / "spool.db").exists()
