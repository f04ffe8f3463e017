"""check-config catches an operator's mistake before it bites: every problem at once, as FILE: key: reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from postmux import __version__
from postmux.cli import app
from postmux.config import ConfigError, settings_from_dict

POOLS: list[dict[str, Any]] = [
    {"name": "default", "members": [{"name": "relay-a", "address": "127.0.0.1:2601"}]},
    {"name": "bulk", "members": [{"name": "bulk-1", "address": "127.0.0.1:2602"}]},
]


def no_provider(name: str, meant: str) -> str:
    return f"no provider named {name!r} (a domain has a dot); did you mean {meant!r}?"


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"pool": POOLS, **data}, "postmux.toml")
    return dict(caught.value.problems)


@pytest.mark.parametrize(
    "name", ["relay.test\r\n250 forged", "relay.test\n", "relay test", "relay_1.test", "-a.test"]
)
@pytest.mark.parametrize("key", ["smtp.hostname", "delivery.ehlo_hostname", "member"])
def test_a_host_name_that_would_break_the_greeting_or_ehlo_is_refused(key: str, name: str) -> None:
    if key == "member":
        pools = [
            {"name": "default", "members": [{"name": "a", "address": "127.0.0.1:1", "ehlo_hostname": name}]}
        ]
        found = problems({"pool": pools})
        key = "pool[0].members[0].ehlo_hostname"
    else:
        section, field = key.split(".")
        found = problems({section: {field: name}})
    assert "is not a host name" in found[key] and "RFC 5321" in found[key]


@pytest.mark.parametrize(
    "name", ["relay.example.com", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]", "a-1.b2.test"]
)
def test_a_domain_or_an_address_literal_is_a_host_name(name: str) -> None:
    settings = settings_from_dict(
        {"pool": POOLS, "smtp": {"hostname": name}, "delivery": {"ehlo_hostname": name}}
    )
    assert settings.ehlo_hostname == name


@pytest.mark.parametrize(
    "value", ["ops", "<ops@example.net>", "@a.test:ops@example.net", "ops@", "a b@example.net"]
)
def test_the_postmaster_is_an_address_with_a_domain(value: str) -> None:
    assert "is not an address with a domain" in problems({"smtp": {"postmaster": value}})["smtp.postmaster"]
    assert settings_from_dict({"pool": POOLS, "smtp": {"postmaster": "ops@example.net"}}).smtp.postmaster


@pytest.mark.parametrize("token", ["tökentökentökentöken", "a token with spaces in it"])
def test_an_admin_token_is_visible_ascii_as_an_http_header_carries_it(token: str) -> None:
    """A non-ASCII token turned the admin API on with no way in: every CLI verb died encoding it."""
    assert "visible ASCII" in problems({"http": {"admin_token": token}})["http.admin_token"]
    assert settings_from_dict(
        {"pool": POOLS, "http": {"admin_token": "t0ken/with+sym=bols~"}}
    ).http.admin_token


@pytest.mark.parametrize("value", ["yes", "no", "true", 1, 0])
def test_a_boolean_is_true_or_false_and_nothing_that_looks_like_one(value: object) -> None:
    found = problems({"smtp": {"auth_require_tls": value}, "spool": {"group_commit": value}})
    assert found["smtp.auth_require_tls"] == "Input should be a valid boolean"
    assert found["spool.group_commit"] == "Input should be a valid boolean"


def test_names_that_point_at_nothing_are_all_reported_with_what_was_meant() -> None:
    pools = [
        POOLS[0],
        {
            "name": "bulk",
            "members": [
                {
                    "name": "bulk-1",
                    "address": "127.0.0.1:2602",
                    "warmup": {
                        "start": "2026-01-01",
                        "days": [10],
                        "provider": {"yaho": [5]},
                        "overflow_pool": "defualt",
                    },
                }
            ],
        },
    ]
    found = problems(
        {
            "pool": pools,
            "route": [{"match": {"sender_domain": "news.test"}, "pool": "blk"}],
            "shaping": {
                "rule": [
                    {"destination": "gogle", "rate": "10/min"},
                    {"member": "relay-b", "max_connections": 2},
                    {"pool": "bulk", "member": "relay-a", "max_connections": 2},
                    {"pool": "bluk", "max_connections": 2},
                    {"destination": "gmail.com", "max_connections": 2},
                    {"destination": "Example.COM", "max_connections": 2},
                ],
                "reaction": [{"code": 421, "destination": "microsfot"}],
            },
        }
    )
    assert found == {
        "route[0].pool": "no pool named 'blk'; did you mean 'bulk'?",
        "pool[1].members[0].warmup.overflow_pool": "no other pool named 'defualt'; did you mean 'default'?",
        "pool[1].members[0].warmup.provider.yaho": no_provider("yaho", "yahoo"),
        "shaping.rule[0].destination": no_provider("gogle", "google"),
        "shaping.rule[1].member": "no member named 'relay-b'; did you mean 'relay-a'?",
        "shaping.rule[2].member": "no member named 'relay-a' in pool 'bulk'",
        "shaping.rule[3].pool": "no pool named 'bluk'; did you mean 'bulk'?",
        "shaping.rule[4].destination": (
            "'gmail.com' is shaped as provider 'google': name the provider instead"
        ),
        "shaping.rule[5].destination": (
            "write the domain as 'example.com': destinations are lower case, without a final dot"
        ),
        "shaping.reaction[0].destination": no_provider("microsfot", "microsoft"),
    }


def test_a_provider_of_the_files_own_is_a_destination_and_a_shipped_one_is_gone_when_turned_off() -> None:
    shaping = {
        "provider": [{"name": "corp", "domains": ["corp.test"]}],
        "rule": [{"destination": "corp", "rate": "1/s"}],
    }
    assert settings_from_dict({"pool": POOLS, "shaping": shaping}).shaping.rule[0].destination == "corp"
    found = problems(
        {"shaping": {"default_providers": False, "rule": [{"destination": "google", "rate": "1/s"}]}}
    )
    assert found["shaping.rule[0].destination"].startswith("no provider named 'google'")


def test_a_field_error_and_a_name_that_points_at_nothing_are_reported_in_one_run(tmp_path: Path) -> None:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        """
[smtp]
hostname = "relay.test\\r\\nX"
auth_require_tls = "yes"
[retry]
max_age = "forever"
[[pool]]
name = "default"
members = [{ name = "relay-a", address = "127.0.0.1:2601" }]
[[shaping.rule]]
destination = "gogle"
rate = "10/min"
"""
    )
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"{cfg}: smtp.hostname: 'relay.test\\r\\nX' is not a host name")
    assert lines[1] == f"{cfg}: smtp.auth_require_tls: Input should be a valid boolean"
    assert lines[2].startswith(f"{cfg}: retry.max_age: 'forever' is not a duration")
    assert lines[3] == f"{cfg}: shaping.rule[0].destination: {no_provider('gogle', 'google')}"


def check(tmp_path: Path, http: str) -> Any:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        f'{http}\n[[pool]]\nname = "default"\nmembers = [{{ name = "a", address = "127.0.0.1:1" }}]\n'
    )
    return cfg, CliRunner().invoke(app, ["check-config", "-c", str(cfg)])


def test_check_config_says_whether_the_admin_api_is_on_and_warns_of_a_listener_beyond_loopback(
    tmp_path: Path,
) -> None:
    cfg, result = check(tmp_path, "")
    assert result.exit_code == 0 and result.stdout == "OK\n"
    assert result.stderr == (
        f"{cfg}: note: [http] listen 127.0.0.1:8025: metrics and health; "
        "admin API off (set [http] admin_token to turn it on)\n"
    )
    cfg, result = check(tmp_path, '[http]\nlisten = "0.0.0.0:8025"\nadmin_token = "a-token-of-16-chars"')
    assert result.exit_code == 0 and result.stdout == "OK\n"
    assert f"{cfg}: note: [http] listen 0.0.0.0:8025: metrics and health; admin API on" in result.stderr
    assert (
        f"{cfg}: warning: [http] listen 0.0.0.0:8025 is not a loopback address: "
        "metrics, health and the admin API are open to the network"
    ) in result.stderr
    for loopback in ("[::1]:8025", "localhost:8025", "127.0.0.2:8025"):
        _, result = check(tmp_path, f'[http]\nlisten = "{loopback}"')
        assert "warning" not in result.stderr, loopback
    _, result = check(tmp_path, '[http]\nlisten = "metrics.example.test:8025"')
    assert "is not a loopback address" in result.stderr


def test_version_prints_the_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"postmux {__version__}\n"


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (["members", "--help"], ["[http] listen of -c", "[http] admin_token of -c"]),
        (["passwd", "--help"], ["[[smtp.users]] password_hash"]),
        (["resume", "--help"], ["--destination"]),
    ],
)
def test_help_keeps_words_in_square_brackets(command: list[str], words: list[str]) -> None:
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # help wraps lines
    for word in words:
        assert word in text, result.stdout


def test_sending_ips_must_be_addresses_and_belong_to_relays() -> None:
    pools = [
        {
            "name": "default",
            "members": [{"name": "a", "address": "127.0.0.1:1", "sending_ips": ["192.0.2.1", "mail.test"]}],
        },
        {
            "name": "direct",
            "members": [
                {"name": "s", "kind": "source", "source_address": "127.0.0.2", "sending_ips": ["192.0.2.2"]}
            ],
        },
    ]
    found = problems({"pool": pools})
    assert found["pool[0].members[0].sending_ips"] == "'mail.test' is not an IP address"
    assert found["pool[1].members[0]"] == "a source member sends from its source_address: no sending_ips"


def test_spf_choices_are_named_in_the_error() -> None:
    found = problems({"spf": {"enabled": True, "softfail": "maybe", "on_error": "retry"}})
    assert "'permitted' or 'not_permitted'" in found["spf.softfail"]
    assert "'open' or 'closed'" in found["spf.on_error"]
