from __future__ import annotations

import random
from pathlib import Path

import pytest

from postmux.config import ConfigError, RetrySettings, load_config, parse_duration, settings_from_dict
from postmux.scheduling.retry import RetrySchedule
from postmux.scheduling.router import Router

MINIMAL = {"pool": [{"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]}]}


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("250ms", 0.25), (12, 12)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("retry", "intervals", [float("nan")]),
        ("retry", "max_age", float("inf")),
        ("pool", "hash_balance_factor", None),
    ],
)
def test_nan_and_inf_are_no_duration_or_number(section: str, key: str, value: object) -> None:
    """TOML has nan and inf: `retry.intervals = [nan]` left a deferred message leased for ever."""
    if value is None:  # a plain float field, not a duration: a pool's hash_balance_factor (>= 1)
        pool = {**MINIMAL["pool"][0], "hash_balance_factor": float("inf")}  # type: ignore[dict-item]
        data: dict[str, object] = {"pool": [pool]}
        where = "pool[0].hash_balance_factor"
    else:
        data = {**MINIMAL, section: {key: value}}
        where = f"{section}.{key}"
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(data)
    assert where in str(refused.value), str(refused.value)


def test_retry_intervals_repeat_the_last_and_jitter_stays_in_bounds() -> None:
    schedule = RetrySchedule(
        RetrySettings(intervals=(60, 300, 900), max_age=86400, jitter=0.2), random.Random(1)
    )
    for rounds, base in [(1, 60), (2, 300), (3, 900), (9, 900)]:
        for _ in range(50):
            assert base * 0.8 <= schedule.interval(rounds) <= base * 1.2


def test_last_retry_is_brought_forward_to_max_age_then_expiry() -> None:
    schedule = RetrySchedule(RetrySettings(intervals=(3600,), max_age=5000, jitter=0))
    assert schedule.next_due(1, created=0, now=100) == 3700
    assert schedule.next_due(2, created=0, now=3700) == 5000
    assert schedule.next_due(3, created=0, now=5000) is None


def test_max_local_errors_is_three_by_default_and_at_least_one() -> None:
    assert settings_from_dict(MINIMAL).retry.max_local_errors == 3
    with pytest.raises(ConfigError) as refused:
        settings_from_dict({**MINIMAL, "retry": {"max_local_errors": 0}}, path="p.toml")
    assert [key for key, _ in refused.value.problems] == ["retry.max_local_errors"]


def test_routes_first_match_wins_and_default_takes_the_rest() -> None:
    settings = settings_from_dict(
        {
            "pool": [
                {"name": "default", "members": [{"name": "a", "address": "127.0.0.1:1"}]},
                {"name": "bulk", "members": [{"name": "b", "address": "127.0.0.1:2"}]},
                {"name": "internal", "members": [{"name": "c", "address": "127.0.0.1:3"}]},
            ],
            "route": [
                {"match": {"sender_domain": "News.Example.com"}, "pool": "bulk"},
                {"match": {"client_network": "10.1.0.0/16"}, "pool": "internal"},
                {"match": {"recipient_domain": "corp.test"}, "pool": "internal"},
            ],
        }
    )
    router = Router(settings)
    assert router.pool_for("news.example.com", "corp.test", "10.1.2.3") == "bulk"
    assert router.pool_for("app.example.com", "x.test", "10.1.2.3") == "internal"
    assert router.pool_for("app.example.com", "corp.test", "127.0.0.1") == "internal"
    assert router.pool_for("app.example.com", "x.test", "127.0.0.1") == "default"


def test_config_errors_name_file_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[smtp]
listen = "nowhere"
[retry]
intervals = ["1m", "soon"]
[[pool]]
name = "default"
policy = "fastest"
members = [{ name = "a", address = "127.0.0.1:1", weight = -1 }]
[[route]]
match = { sender_domain = "x.test" }
pool = "missing"
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    text = str(caught.value)
    for key in ("smtp.listen", "retry.intervals[1]", "pool[0].policy", "pool[0].members[0].weight"):
        assert f"{bad}: {key}: " in text, text


def test_cross_checks_route_pool_and_default_pool() -> None:
    with pytest.raises(ConfigError, match="no pool named 'missing'"):
        settings_from_dict({**MINIMAL, "route": [{"match": {"sender_domain": "x"}, "pool": "missing"}]})
    two = {"pool": [{"name": n, "members": [{"name": "a", "address": "127.0.0.1:1"}]} for n in ("x", "y")]}
    with pytest.raises(ConfigError, match="named 'default'"):
        settings_from_dict(two)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[smtp\nlisten=1")
    with pytest.raises(ConfigError, match=r"broken.toml: \(syntax\)"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"absent.toml: \(file\)"):
        load_config(tmp_path / "absent.toml")


def test_settings_are_frozen() -> None:
    settings = settings_from_dict(MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        settings.smtp.hostname = "x"  # type: ignore[misc]


def test_a_byte_order_mark_is_read_past_and_nesting_too_deep_is_a_syntax_error(tmp_path: Path) -> None:
    """An editor's BOM gave "invalid statement" at line 1; tables nested thousands deep, a traceback."""
    marked = tmp_path / "marked.toml"
    marked.write_bytes(
        b'\xef\xbb\xbf[[pool]]\nname = "default"\nmembers = [{ name = "a", address = "127.0.0.1:1" }]\n'
    )
    assert load_config(marked).pool[0].name == "default"
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.toml: \(syntax\): nested too deeply"):
        load_config(deep)
