"""The DNS doctor against a loopback zone: one domain whose records are all good passes every check, and
each broken domain, good but for one thing, fails (or warns) in that check alone; then the CLI's JSON and
exit code, and the admin API's route on a running node."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from typer.testing import CliRunner

from postmux.admin.client import print_doctor
from postmux.app import App
from postmux.cli import app as cli
from postmux.config import Settings
from postmux.dkim import generate_key
from postmux.reputation.doctor import CHECKS, Report, worst
from postmux.reputation.doctor_dns import DnsDoctor
from tests.dns_server import LoopbackDns
from tests.support import make_settings

SOURCE_IP = "192.0.2.10"  # the default pool's source member; its PTR is mail.postmux.test
EHLO = "mail.postmux.test"


class Keys:
    """An RSA-2048 and an Ed25519 key, each domain's selectors rsa and ed; another RSA key; a 1024-bit one."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.records: dict[str, str] = {}
        for name, algorithm, bits in (
            ("rsa", "rsa-sha256", 2048),
            ("ed", "ed25519-sha256", 0),
            ("other", "rsa-sha256", 2048),
            ("small", "rsa-sha256", 1024),
        ):
            pem, key = generate_key(algorithm, rsa_bits=bits or 2048)  # type: ignore[arg-type]
            (directory / f"{name}.key").write_bytes(pem)
            self.records[name] = key.record()

    def entry(self, domain: str, rsa: str = "rsa") -> dict[str, Any]:
        return {
            "domain": domain,
            "selectors": [
                {"name": "rsa", "key_file": str(self.dir / f"{rsa}.key")},
                {"name": "ed", "algorithm": "ed25519-sha256", "key_file": str(self.dir / "ed.key")},
            ],
        }


def txt(value: str) -> str:
    """A TXT value in quoted strings of at most 255 octets (RFC 1035 3.3.14)."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def good_records(d: str, keys: Keys) -> dict[str, str]:
    """Each record of a good domain by its role; a case replaces or removes some."""
    return {
        "mx": f"{d}. 300 IN MX 10 mx.{d}.",
        "mx-host": f"mx.{d}. 300 IN A 192.0.2.25",
        "spf": f'{d}. 300 IN TXT "v=spf1 ip4:{SOURCE_IP} include:_spf.{d} -all"',
        "spf-include": f'_spf.{d}. 300 IN TXT "v=spf1 ip4:198.51.100.0/24 -all"',
        "dkim-rsa": f"rsa._domainkey.{d}. 300 IN TXT {txt(keys.records['rsa'])}",
        "dkim-ed": f"ed._domainkey.{d}. 300 IN TXT {txt(keys.records['ed'])}",
        "dmarc": f'_dmarc.{d}. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@{d}"',
        "mta-sts": f'_mta-sts.{d}. 300 IN TXT "v=STSv1; id=20240101T000000"',
        "tls-rpt": f'_smtp._tls.{d}. 300 IN TXT "v=TLSRPTv1; rua=mailto:tls@{d}"',
    }


@dataclass
class Case:
    """A domain good but for `records` (role -> line with {d}, or None: removed) and `extra` lines; with a
    [[dkim]] entry of its own unless `unsigned`, and routed to `pool` when given."""

    name: str
    check: str
    status: str
    records: dict[str, str | None] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    pool: str | None = None
    dkim_key: str = "rsa"
    unsigned: bool = False
    servfail: tuple[str, str] | None = None  # (name with {d}, type) answered SERVFAIL

    @property
    def domain(self) -> str:
        return f"{self.name}.test"


CASES = [
    Case("mx-none", "mx", "fail", {"mx": None, "mx-host": None}),
    Case("mx-host-unresolved", "mx", "fail", {"mx-host": None}),
    Case("mx-null", "mx", "warn", {"mx": "{d}. 300 IN MX 0 ."}),
    Case("mx-null-and-real", "mx", "fail", extra=["{d}. 300 IN MX 0 ."]),  # RFC 7505 3 forbids the mix
    Case("spf-none", "spf", "fail", {"spf": None}),
    Case("spf-two", "spf", "fail", extra=['{d}. 300 IN TXT "v=spf1 -all"']),
    Case("spf-syntax", "spf", "fail", {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.300 -all"'}),
    # Eleven includes, each nested in the one before: one lookup more than RFC 7208 4.6.4 allows.
    Case(
        "spf-lookups",
        "spf",
        "fail",
        {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.10 include:i0.{d} -all"'},
        [f'i{i}.{{d}}. 300 IN TXT "v=spf1 include:i{i + 1}.{{d}} -all"' for i in range(10)]
        + ['i10.{d}. 300 IN TXT "v=spf1 -all"'],
    ),
    Case(
        "spf-voids",
        "spf",
        "fail",
        {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.10 a:n1.{d} a:n2.{d} a:n3.{d} -all"'},
    ),
    Case("spf-ip-not-listed", "spf", "fail", {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.99 -all"'}),
    Case("spf-plus-all", "spf", "fail", {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.10 +all"'}),
    # RFC 7208 5.2: an include whose record passes every IP (+all, or a bare all) makes the domain's pass
    # every IP; one that ends in ?all (neutral: no match) does not. Also through a nested include.
    Case("spf-include-plus-all", "spf", "fail", {"spf-include": '_spf.{d}. 300 IN TXT "v=spf1 +all"'}),
    Case(
        "spf-include-bare-all",
        "spf",
        "fail",
        {"spf-include": '_spf.{d}. 300 IN TXT "v=spf1 ip4:198.51.100.0/24 include:deep.{d} -all"'},
        ['deep.{d}. 300 IN TXT "v=spf1 all"'],
    ),
    Case("spf-include-neutral", "spf", "pass", {"spf-include": '_spf.{d}. 300 IN TXT "v=spf1 ?all"'}),
    Case("dkim-unpublished", "dkim", "fail", {"dkim-rsa": None}),
    Case("dkim-other-key", "dkim", "fail", {"dkim-rsa": "rsa._domainkey.{d}. 300 IN TXT {other}"}),
    Case(
        "dkim-revoked", "dkim", "fail", {"dkim-ed": 'ed._domainkey.{d}. 300 IN TXT "v=DKIM1; k=ed25519; p="'}
    ),
    Case("dkim-testing", "dkim", "warn", {"dkim-rsa": "rsa._domainkey.{d}. 300 IN TXT {testing}"}),
    Case(
        "dkim-1024", "dkim", "warn", {"dkim-rsa": "rsa._domainkey.{d}. 300 IN TXT {small}"}, dkim_key="small"
    ),
    Case("dkim-unsigned", "dkim", "fail", unsigned=True),
    Case("dmarc-none", "dmarc", "fail", {"dmarc": None}),
    Case(
        "dmarc-p-none",
        "dmarc",
        "warn",
        {"dmarc": '_dmarc.{d}. 300 IN TXT "v=DMARC1; p=none; rua=mailto:d@{d}"'},
    ),
    Case("dmarc-no-rua", "dmarc", "warn", {"dmarc": '_dmarc.{d}. 300 IN TXT "v=DMARC1; p=quarantine"'}),
    Case(
        "dmarc-no-policy", "dmarc", "fail", {"dmarc": '_dmarc.{d}. 300 IN TXT "v=DMARC1; rua=mailto:d@{d}"'}
    ),
    # RFC 7489 6.4's values are ABNF quoted strings: case-insensitive (RFC 5234 2.3).
    Case(
        "dmarc-upper-case",
        "dmarc",
        "pass",
        {"dmarc": '_dmarc.{d}. 300 IN TXT "v=DMARC1; p=Reject; adkim=S; aspf=R; rua=mailto:d@{d}"'},
    ),
    Case(
        "dmarc-upper-none",
        "dmarc",
        "warn",
        {"dmarc": '_dmarc.{d}. 300 IN TXT "v=DMARC1; p=NONE; rua=mailto:d@{d}"'},
    ),
    Case("dmarc-two", "dmarc", "fail", extra=['_dmarc.{d}. 300 IN TXT "v=DMARC1; p=none"']),
    Case("dmarc-servfail", "dmarc", "fail", servfail=("_dmarc.{d}", "TXT")),
    Case(
        "fcrdns-no-ptr",
        "fcrdns",
        "fail",
        {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.66 -all"'},
        pool="noptr",
    ),
    Case(
        "fcrdns-unconfirmed",
        "fcrdns",
        "fail",
        {"spf": '{d}. 300 IN TXT "v=spf1 ip4:192.0.2.67 -all"'},
        pool="unconfirmed",
    ),
    Case("fcrdns-ehlo", "fcrdns", "warn", pool="otherehlo"),
    Case("mta-sts-none", "mta-sts", "warn", {"mta-sts": None}),
    Case("mta-sts-no-id", "mta-sts", "fail", {"mta-sts": '_mta-sts.{d}. 300 IN TXT "v=STSv1;"'}),
    Case("tls-rpt-none", "tls-rpt", "warn", {"tls-rpt": None}),
    Case("tls-rpt-no-rua", "tls-rpt", "fail", {"tls-rpt": '_smtp._tls.{d}. 300 IN TXT "v=TLSRPTv1;"'}),
]

SHARED = f"""
10.2.0.192.in-addr.arpa. 300 IN PTR {EHLO}.
{EHLO}. 300 IN A {SOURCE_IP}
67.2.0.192.in-addr.arpa. 300 IN PTR {EHLO}.
"""

POOLS = [
    {
        "name": "default",
        "members": [{"name": "direct", "kind": "source", "source_address": SOURCE_IP, "ehlo_hostname": EHLO}],
    },
    {
        "name": "noptr",
        "members": [{"name": "n", "kind": "source", "source_address": "192.0.2.66", "ehlo_hostname": EHLO}],
    },
    {
        "name": "unconfirmed",
        "members": [{"name": "u", "kind": "source", "source_address": "192.0.2.67", "ehlo_hostname": EHLO}],
    },
    {
        "name": "otherehlo",
        "members": [
            {
                "name": "o",
                "kind": "source",
                "source_address": SOURCE_IP,
                "ehlo_hostname": "other.postmux.test",
            }
        ],
    },
]


def zone_text(keys: Keys) -> str:
    lines = [SHARED, *good_records("good.test", keys).values()]
    words = {
        "other": txt(keys.records["other"]),
        "small": txt(keys.records["small"]),
        "testing": txt(keys.records["rsa"].replace("v=DKIM1; ", "v=DKIM1; t=y; ")),
    }
    for case in CASES:
        d = case.domain
        records: dict[str, str | None] = {**good_records(d, keys), **case.records}
        for line in [*records.values(), *case.extra]:
            if line is not None:
                lines.append(line.replace("{d}", d).format(**words) if "{" in line else line)
    return "\n".join(lines)


@dataclass
class Doctor:
    dns: LoopbackDns
    settings: Settings

    async def examine(self, domain: str) -> Report:
        return await DnsDoctor(self.settings).examine(domain)


def doctor_settings(tmp: Path, keys: Keys, nameserver: str, **sections: Any) -> Settings:
    dkim = [keys.entry("good.test")] + [keys.entry(c.domain, c.dkim_key) for c in CASES if not c.unsigned]
    routes = [{"match": {"sender_domain": c.domain}, "pool": c.pool} for c in CASES if c.pool]
    return make_settings(
        tmp,
        POOLS,
        dns={"nameservers": [nameserver], "timeout": "2s"},
        dkim=dkim,
        route=routes,
        **sections,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("doctor-keys"))


@pytest.fixture(scope="module")
def doctor(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doctor]:
    with LoopbackDns(zone_text(keys)) as dns:
        for case in CASES:
            if case.servfail:
                dns.zone.fail_types.add((case.servfail[0].replace("{d}", case.domain), case.servfail[1]))
        yield Doctor(dns, doctor_settings(tmp_path_factory.mktemp("doctor"), keys, dns.address))


def statuses(report: Report) -> dict[str, str]:
    return {c: worst(f for f in report.checks if f.check == c) for c in CHECKS}


async def test_a_domain_with_every_record_right_passes_every_check(doctor: Doctor) -> None:
    report = await doctor.examine("good.test")
    assert statuses(report) == dict.fromkeys(CHECKS, "pass"), [f for f in report.checks if f.status != "pass"]
    assert report.ok
    by_requirement = {r.requirement: r.status for r in report.bulk_sender}
    assert all(s == "pass" for r, s in by_requirement.items() if "unsubscribe" not in r and "spam" not in r)
    assert by_requirement["spam rate below 0.3%"] == "unchecked"
    assert by_requirement["one-click unsubscribe (RFC 8058)"] == "unchecked"
    dkim = [f for f in report.checks if f.check == "dkim"]
    assert {f.subject for f in dkim} == {"selector rsa", "selector ed"}
    # The SPF row of the member is pyspf's evaluation through the loopback zone.
    assert any(f.subject == f"member default/direct {SOURCE_IP}" and f.found == "pass" for f in report.checks)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_domain_broken_in_one_way_fails_in_that_check_alone(doctor: Doctor, case: Case) -> None:
    report = await doctor.examine(case.domain)
    expected = dict.fromkeys(CHECKS, "pass") | {case.check: case.status}
    assert statuses(report) == expected, [f for f in report.checks if f.status != "pass"]
    assert report.ok == (case.status != "fail")
    for finding in report.checks:
        assert finding.found
        assert (finding.fix == "") == (finding.status == "pass"), finding


async def test_the_bulk_sender_table_follows_the_checks(doctor: Doctor) -> None:
    table = {r.requirement: r for r in (await doctor.examine("spf-none.test")).bulk_sender}
    assert table["SPF"].status == "fail" and "v=spf1" in table["SPF"].fix
    assert table["DKIM"].status == "pass"
    table = {r.requirement: r for r in (await doctor.examine("dkim-unsigned.test")).bulk_sender}
    assert table["DKIM"].status == "fail" and "[[dkim]]" in table["DKIM"].fix
    table = {r.requirement: r for r in (await doctor.examine("fcrdns-no-ptr.test")).bulk_sender}
    assert table["forward-confirmed reverse DNS"].status == "fail"


async def test_every_lookup_goes_to_the_configured_nameserver(doctor: Doctor) -> None:
    before = sum(doctor.dns.queries.values())
    await doctor.examine("good.test")
    asked = {name for name, _ in doctor.dns.queries}
    assert sum(doctor.dns.queries.values()) > before
    for name in (
        "good.test",
        "_spf.good.test",
        "rsa._domainkey.good.test",
        "_dmarc.good.test",
        "mx.good.test",
    ):
        assert name in asked
    assert "10.2.0.192.in-addr.arpa" in asked and EHLO in asked


async def test_a_nameserver_that_never_answers_gives_failed_checks_in_bounded_time(
    keys: Keys, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        settings = doctor_settings(tmp_path, keys, f"127.0.0.1:{silent.getsockname()[1]}")
        settings = settings.model_copy(update={"dns": settings.dns.model_copy(update={"timeout": 0.3})})
        started = time.monotonic()
        report = await DnsDoctor(settings).examine("good.test")
        elapsed = time.monotonic() - started
    assert elapsed < 5.0
    assert not report.ok
    failed = {f.check for f in report.checks if f.status == "fail"}
    assert {"mx", "spf", "dkim", "dmarc", "fcrdns", "mta-sts", "tls-rpt"} <= failed
    assert any("no answer within 0.3 s" in f.found for f in report.checks)


# -- the edges: CLI and admin API -------------------------------------------------------------------------


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """`postmux doctor --local` sets up logging as a command does; the test process gets its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("cli_logging")
def test_the_cli_prints_the_report_as_json_and_exits_1_on_a_failure(
    doctor: Doctor, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "postmux.toml"
    config.write_text(toml_config(tmp_path, keys, doctor.dns.address))
    good = CliRunner().invoke(cli, ["doctor", "good.test", "--local", "-c", str(config), "--json"])
    assert good.exit_code == 0, good.output
    body = json.loads(good.stdout)
    assert body["domain"] == "good.test" and body["ok"] is True
    assert {f["check"] for f in body["checks"]} == set(CHECKS)
    assert set(body["checks"][0]) == {"check", "subject", "status", "found", "fix"}
    assert set(body["bulk_sender"][0]) == {"requirement", "status", "found", "fix"}
    bad = CliRunner().invoke(cli, ["doctor", "spf-none.test", "--local", "-c", str(config), "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["ok"] is False
    # Off a terminal the output is JSON; the tables are what a terminal gets of the same body.
    assert print_doctor(body, as_json=False) == 0
    shown = capsys.readouterr().out
    assert "bulk sender rules" in shown and "selector rsa" in shown and "nothing fails" in shown
    assert print_doctor(json.loads(bad.stdout), as_json=False) == 1
    assert "[[dkim]]" not in shown and "something fails" in capsys.readouterr().out


@pytest.mark.usefixtures("cli_logging")
def test_the_cli_refuses_what_is_not_a_domain(doctor: Doctor, keys: Keys, tmp_path: Path) -> None:
    config = tmp_path / "postmux.toml"
    config.write_text(toml_config(tmp_path, keys, doctor.dns.address))
    result = CliRunner().invoke(cli, ["doctor", "not a domain", "--local", "-c", str(config)])
    assert result.exit_code == 2
    assert "not a domain" in result.stderr


def toml_config(tmp: Path, keys: Keys, nameserver: str, admin: str = "") -> str:
    return f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "postmux.test"
[http]
listen = "127.0.0.1:0"
{admin}
[spool]
path = "{tmp / "spool.db"}"
[events]
log = "{tmp / "events.jsonl"}"
[dns]
nameservers = ["{nameserver}"]
timeout = "2s"
[[pool]]
name = "default"
members = [{{ name = "direct", kind = "source", source_address = "{SOURCE_IP}", ehlo_hostname = "{EHLO}" }}]
[[dkim]]
domain = "good.test"
selectors = [
  {{ name = "rsa", key_file = "{keys.dir / "rsa.key"}" }},
  {{ name = "ed", algorithm = "ed25519-sha256", key_file = "{keys.dir / "ed.key"}" }},
]
"""


def printed(stdout: str) -> Any:
    """The JSON document the CLI printed (the node in this process logs to the same stdout meanwhile)."""
    found = re.search(r"^\{$.*^\}$", stdout, re.MULTILINE | re.DOTALL)
    assert found, stdout
    return json.loads(found.group(0))


async def test_the_admin_api_examines_a_domain_behind_the_admin_token(doctor: Doctor, tmp_path: Path) -> None:
    settings = doctor.settings.model_copy(
        update={"http": doctor.settings.http.model_copy(update={"admin_token": "doctor-token"})}
    )
    settings = settings.model_copy(
        update={"spool": settings.spool.model_copy(update={"path": str(tmp_path / "spool.db")})}
    )
    async with App(settings) as node:
        base = f"http://127.0.0.1:{node.http_port}/api/v1/doctor"
        auth = {"Authorization": "Bearer doctor-token"}
        async with httpx.AsyncClient(timeout=30) as client:
            good = await client.get(f"{base}/good.test", headers=auth)
            bad = await client.get(f"{base}/dkim-unpublished.test", headers=auth)
            refused = await client.get(f"{base}/good.test")
            nonsense = await client.get(f"{base}/not_a..domain", headers=auth)
        # The CLI without --local asks the node: the same report, and the same exit codes.
        url = f"http://127.0.0.1:{node.http_port}"
        words = ["--url", url, "--token", "doctor-token", "--json"]
        by_cli = await asyncio.to_thread(CliRunner().invoke, cli, ["doctor", "good.test", *words])
        failing = await asyncio.to_thread(CliRunner().invoke, cli, ["doctor", "dmarc-none.test", *words])
        unexamined = await asyncio.to_thread(CliRunner().invoke, cli, ["doctor", "a..b", *words])
    assert good.status_code == 200, good.text
    assert good.json()["ok"] is True and good.json()["domain"] == "good.test"
    assert bad.status_code == 200 and bad.json()["ok"] is False
    assert any(f["check"] == "dkim" and f["status"] == "fail" for f in bad.json()["checks"])
    assert refused.status_code == 401
    assert nonsense.status_code == 400 and "not a domain" in nonsense.json()["error"]
    assert by_cli.exit_code == 0 and printed(by_cli.stdout) == good.json()
    assert failing.exit_code == 1 and printed(failing.stdout)["ok"] is False
    assert unexamined.exit_code == 2 and "not a domain" in unexamined.stderr
