"""The doctor's deciding, pure over answers in hand: SPF terms and their counting, the DMARC tree walk,
what is asked next, which pools a domain's mail may take, and what counts as a domain."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from postmux.reputation.doctor import (
    Answer,
    DkimKey,
    DoctorInputs,
    Sender,
    aligned,
    check_dmarc,
    diagnose,
    doctor_domain,
    pools_for,
    walk_spf,
    wanted,
)
from postmux.reputation.records import RecordProblem, SpfTerm, mailto_domains, spf_term, spf_terms, tag_list
from tests.support import make_settings


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("-all", SpfTerm("-", "all")),
        ("a", SpfTerm("+", "a")),
        ("a/24", SpfTerm("+", "a")),
        ("~mx:mail.example.com//64", SpfTerm("~", "mx", "mail.example.com")),
        ("ip6:2001:db8::/32", SpfTerm("+", "ip6", "2001:db8::/32")),
        ("?include:_spf.example.com", SpfTerm("?", "include", "_spf.example.com")),
        ("exists:%{i}._spf.example.com", SpfTerm("+", "exists", "%{i}._spf.example.com")),
        ("redirect=_spf.example.com", SpfTerm("=", "redirect", "_spf.example.com")),
        ("unknown-modifier=whatever", SpfTerm("=", "unknown-modifier", "whatever")),
    ],
)
def test_spf_terms_are_read_as_rfc_7208_writes_them(text: str, term: SpfTerm) -> None:
    assert spf_term(text) == term


@pytest.mark.parametrize(
    "text",
    [
        "ip4:192.0.2.300",
        "ip4:2001:db8::1",
        "ip6:192.0.2.1",
        "include",
        "a/33",
        "all:x",
        "foo:bar",
        "include:nodot",
        "exists:%{z}.example.com",
        "mx:mail..example.com",
    ],
)
def test_spf_terms_that_are_not_terms_are_refused(text: str) -> None:
    with pytest.raises(RecordProblem):
        spf_term(text)


def test_a_modifier_given_twice_is_a_problem() -> None:
    with pytest.raises(RecordProblem, match="redirect"):
        spf_terms("v=spf1 redirect=a.example.com redirect=b.example.com")


def txt(*records: str) -> Answer:
    return Answer(records)


def test_the_walk_counts_every_lookup_through_includes_and_a_redirect() -> None:
    answers = {
        ("d.test", "TXT"): txt("v=spf1 a mx ptr include:i.test redirect=r.test"),
        ("d.test", "A"): txt("192.0.2.1"),
        ("d.test", "AAAA"): Answer(),
        ("d.test", "MX"): txt("10 mx.d.test"),
        ("i.test", "TXT"): txt("v=spf1 exists:e.test -all"),
        ("e.test", "A"): Answer(error="nxdomain"),
        ("r.test", "TXT"): txt("v=spf1 a:gone.test -all"),
        ("gone.test", "A"): Answer(error="nxdomain"),
        ("gone.test", "AAAA"): Answer(error="nxdomain"),
    }
    walk = walk_spf("d.test", answers)
    # a, mx, ptr, include, redirect; exists in the include; a in the redirect's record.
    assert walk.lookups == 7
    assert walk.voids == ["e.test", "gone.test"]
    assert walk.all_qualifier == "-"  # the redirect's
    assert not walk.problems and not walk.missing
    assert any("ptr" in n for n in walk.notes)


def test_a_redirect_beside_all_is_ignored_and_not_counted() -> None:
    walk = walk_spf("d.test", {("d.test", "TXT"): txt("v=spf1 ~all redirect=r.test")})
    assert walk.lookups == 0 and walk.all_qualifier == "~" and not walk.missing


def test_an_include_without_a_record_or_in_a_loop_is_a_permerror() -> None:
    answers = {
        ("d.test", "TXT"): txt("v=spf1 include:none.test include:loop.test -all"),
        ("none.test", "TXT"): txt("some other text"),
        ("loop.test", "TXT"): txt("v=spf1 include:d.test -all"),
    }
    problems = walk_spf("d.test", answers).problems
    assert any("none.test has no SPF record" in p for p in problems)
    assert any("loops back" in p for p in problems)


def test_the_walk_says_what_it_still_needs_one_round_at_a_time() -> None:
    walk = walk_spf("d.test", {("d.test", "TXT"): txt("v=spf1 include:i.test -all")})
    assert walk.missing and ("i.test", "TXT") in walk.asked
    assert ("j.test", "TXT") not in walk.asked


def test_a_failed_lookup_is_a_finding_not_a_missing_answer() -> None:
    walk = walk_spf("d.test", {("d.test", "TXT"): Answer(error="SERVFAIL")})
    assert walk.failed == ["TXT of d.test: SERVFAIL"] and not walk.missing


def inputs(domain: str = "sub.good.test", signing: str | None = "good.test") -> DoctorInputs:
    sender = Sender("default", "direct", "source", ("192.0.2.10",), "mail.good.test", "opportunistic")
    return DoctorInputs(domain, (), signing, (sender,))


def test_dmarc_falls_back_to_the_parent_record_and_its_subdomain_policy() -> None:
    answers = {
        ("_dmarc.sub.good.test", "TXT"): Answer(error="nxdomain"),
        ("_dmarc.good.test", "TXT"): txt("v=DMARC1; p=reject; sp=none; rua=mailto:d@good.test"),
    }
    rows = {f.subject: f for f in check_dmarc(inputs(), answers)}
    assert rows["record"].status == "pass" and "the parent's" in rows["record"].found
    assert rows["policy"].status == "warn" and rows["policy"].found.startswith("sp=none")
    assert rows["alignment"].status == "pass"


def test_the_dmarc_walk_asks_a_parent_only_when_the_domain_has_no_record() -> None:
    assert ("_dmarc.good.test", "TXT") not in wanted(inputs(), {})
    found = {("_dmarc.sub.good.test", "TXT"): txt("v=DMARC1; p=none")}
    assert ("_dmarc.good.test", "TXT") not in wanted(inputs(), found)
    missing = {("_dmarc.sub.good.test", "TXT"): Answer(error="nxdomain")}
    assert ("_dmarc.good.test", "TXT") in wanted(inputs(), missing)
    assert ("_dmarc.test", "TXT") not in wanted(inputs(), missing)  # never a top-level domain's


def test_a_ptr_names_forward_lookup_is_asked_once_the_ptr_is_known() -> None:
    ptr = ("10.2.0.192.in-addr.arpa", "PTR")
    assert ptr in wanted(inputs(), {})
    assert ("mail.good.test", "A") not in wanted(inputs(), {})
    assert {("mail.good.test", "A"), ("mail.good.test", "AAAA")} <= wanted(
        inputs(), {ptr: txt("mail.good.test")}
    )


def test_alignment_relaxed_takes_a_parent_strict_only_the_same_name() -> None:
    assert aligned("good.test", "news.good.test") and aligned("news.good.test", "good.test")
    assert not aligned("good.test", "news.good.test", strict=True)
    assert not aligned("other.test", "good.test")
    assert not aligned("od.test", "good.test")  # a suffix of letters is not a parent


def test_the_pools_of_a_domain_follow_the_routes_up_to_one_that_takes_all_its_mail(tmp_path: Path) -> None:
    pools = [
        {"name": n, "members": [{"name": f"{n}-m", "address": "127.0.0.1:2525"}]}
        for n in ("default", "b", "c", "d")
    ]
    routes = [
        {"match": {"sender_domain": "other.test"}, "pool": "b"},
        {"match": {"sender_domain": "news.test", "recipient_domain": "gmail.com"}, "pool": "c"},
        {"match": {"sender_domain": "news.test"}, "pool": "d"},
    ]
    settings = make_settings(tmp_path, pools, route=routes)
    assert pools_for(settings, "news.test") == ["c", "d"]
    assert pools_for(settings, "plain.test") == ["default"]
    assert pools_for(settings, "other.test") == ["b"]


@pytest.mark.parametrize(
    ("text", "domain"), [("Example.COM.", "example.com"), ("bücher.example", "xn--bcher-kva.example")]
)
def test_a_domain_is_taken_in_a_labels(text: str, domain: str) -> None:
    assert doctor_domain(text) == domain


@pytest.mark.parametrize(
    "text", ["", "localhost", "not a domain", "a..b", "-a.example", "x" * 64 + ".example"]
)
def test_what_is_not_a_domain_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a domain"):
        doctor_domain(text)


def test_tag_lists_refuse_a_repeated_tag_and_join_a_split_value() -> None:
    assert tag_list("v=DKIM1; p=MIIB AQAB ;") == {"v": "DKIM1", "p": "MIIBAQAB"}
    with pytest.raises(RecordProblem):
        tag_list("p=a; p=b")
    assert mailto_domains("mailto:a@x.test!10m, https://r.test/, mailto:b@Y.test") == ["x.test", "y.test"]


def test_a_member_sending_in_clear_fails_the_tls_rule_and_a_relay_without_ips_is_not_judged() -> None:
    relay = Sender("bulk", "relay-a", "relay", (), "postmux.test", "none")
    report = diagnose(DoctorInputs("good.test", (), "good.test", (relay,)), {}, {})
    rules = {r.requirement: r for r in report.bulk_sender}
    assert rules["TLS"].status == "fail" and "bulk/relay-a" in rules["TLS"].found
    assert rules["forward-confirmed reverse DNS"].status == "unchecked"  # no source member
    spf = [f for f in report.checks if f.subject == "member bulk/relay-a"]
    assert [f.status for f in spf] == ["warn"] and "sending_ips" in spf[0].fix
    assert not report.ok


def test_nothing_answered_is_a_failure_of_every_check_never_an_exception() -> None:
    key = DkimKey("good.test", "s1", "ed25519-sha256", b"AAAA", 256, "s1.key")
    report = diagnose(replace(inputs(), keys=(key,)), {}, {})
    assert {f.check for f in report.checks if f.status == "fail"} == {
        "mx",
        "spf",
        "dkim",
        "dmarc",
        "fcrdns",
        "mta-sts",
        "tls-rpt",
    }
    assert all("not looked up" in f.found for f in report.checks if f.check in ("mx", "dmarc", "fcrdns"))


def test_the_unsubscribe_requirement_follows_the_unsubscribe_table(tmp_path: Path) -> None:
    from postmux.config import settings_from_dict
    from postmux.reputation.doctor import doctor_inputs

    secret = tmp_path / "unsubscribe.key"
    secret.write_bytes(b"k" * 32)
    pools = [
        {"name": "default", "members": [{"name": "a", "address": "127.0.0.1:2601"}]},
        {"name": "bulk", "members": [{"name": "b", "address": "127.0.0.1:2602"}]},
    ]
    table = {"url": "https://u.good.test/unsubscribe/", "secret_file": str(secret)}

    def covered(domain: str, **entry: object) -> bool | None:
        data: dict[str, object] = {
            "pool": pools,
            "route": [{"match": {"sender_domain": "news.test"}, "pool": "bulk"}],
        }
        if entry:
            data["unsubscribe"] = {**table, **entry}
        return doctor_inputs(settings_from_dict(data), domain).unsubscribe

    assert covered("news.test") is None  # no [unsubscribe]: the application may add its own
    assert covered("news.test", pools=["bulk"]) is True  # all its mail goes through bulk
    assert covered("good.test", pools=["bulk"]) is None  # the default pool is not opted in
    assert covered("mail.good.test", sender_domains=["*.good.test"]) is True
    # And alignment in the doctor is the accept-time check's: the Public Suffix List's organizations.
    assert not aligned("a.blogspot.com", "b.blogspot.com")
