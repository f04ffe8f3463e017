"""DMARC identifier alignment (postmux.dmarc): relaxed and strict modes over the Public Suffix List, the
From: field's problems, and the verdict from the DKIM signing domain or the MAIL FROM domain."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postmux.dmarc import aligned, author_domains, judge, organizational_domain

LABEL = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True)
# Registered domains under suffixes of one and two labels, a wildcard's exception (!city.kawasaki.jp), and a
# private suffix (the PSL's second part).
ORGS = st.sampled_from(
    ["example.com", "example.co.uk", "example.org", "shop.blogspot.com", "city.kawasaki.jp", "example.test"]
)


def under(org: str, labels: list[str]) -> str:
    return ".".join([*labels, org])


def test_organizational_domains_follow_the_public_suffix_list() -> None:
    assert organizational_domain("mail.news.example.com") == "example.com"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    # A private suffix: two customers of one host are two organizations (RFC 7489 3.2 with the full PSL).
    assert organizational_domain("x.shop.blogspot.com") == "shop.blogspot.com"
    assert organizational_domain("Example.COM.") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"  # a public suffix is its own
    assert organizational_domain("a.b.kawasaki.jp") == "a.b.kawasaki.jp"  # under *.kawasaki.jp
    assert organizational_domain("www.city.kawasaki.jp") == "city.kawasaki.jp"  # its exception


@given(ORGS, st.lists(LABEL, max_size=3), st.lists(LABEL, max_size=3))
def test_relaxed_aligns_any_two_names_of_one_organization_and_strict_only_the_same_name(
    org: str, left: list[str], right: list[str]
) -> None:
    a, b = under(org, left), under(org, right)
    assert aligned(a, b, "relaxed") and aligned(b, a, "relaxed")
    assert aligned(a, b, "strict") == (a == b)
    assert aligned(a.upper(), b + ".", "relaxed")


@given(ORGS, ORGS, st.lists(LABEL, max_size=2), st.lists(LABEL, max_size=2))
def test_names_of_two_organizations_never_align(
    org1: str, org2: str, left: list[str], right: list[str]
) -> None:
    if org1 == org2:
        return
    a, b = under(org1, left), under(org2, right)
    assert not aligned(a, b, "relaxed") and not aligned(a, b, "strict")


def test_a_suffix_shared_by_two_customers_does_not_align_them() -> None:
    assert not aligned("a.blogspot.com", "b.blogspot.com", "relaxed")
    assert not aligned("example.co.uk", "other.co.uk", "relaxed")
    assert not aligned("example.com", "", "relaxed")


def test_the_from_fields_problems_are_named() -> None:
    assert author_domains(b"To: a@b.test\r\n\r\n")[1].startswith("the message has no From: field")
    two = b"From: a@x.test\r\nFrom: b@y.test\r\n\r\n"
    assert "2 From: fields" in author_domains(two)[1]
    assert "has no domain" in author_domains(b"From: undisclosed\r\n\r\n")[1]
    assert author_domains(b"From: A <a@News.Example.com>, b@example.com, c@news.example.com\r\n\r\n") == (
        ["news.example.com", "example.com"],
        "",
    )
    # A U-label domain is compared in A-labels, as d= is written (RFC 8616 4).
    assert author_domains("From: a@bücher.example\r\n\r\n".encode())[0] == ["xn--bcher-kva.example"]


def test_judge_aligns_by_dkim_then_by_the_mail_from_domain() -> None:
    head = b"From: News <news@mail.example.com>\r\n\r\n"
    assert judge(head, "example.com", "").via == "dkim"
    assert not judge(head, "example.com", "", dkim_mode="strict").aligned
    assert judge(head, "", "bounces.example.com").via == "spf"
    assert not judge(head, "", "bounces.example.com", spf_mode="strict").aligned
    assert not judge(head, "", "bounces.example.com", count_spf=False).aligned
    verdict = judge(head, "esp.test", "esp.test")
    assert not verdict.aligned
    assert verdict.reason == (
        "From: domain mail.example.com aligns with neither DKIM d=esp.test (relaxed) nor MAIL FROM domain"
        " esp.test (relaxed) (RFC 7489 3.1)"
    )


def test_every_author_domain_must_align() -> None:
    head = b"From: a@example.com, b@other.test\r\n\r\n"
    verdict = judge(head, "example.com", "")
    assert not verdict.aligned and "other.test" in verdict.reason
    assert judge(head, "example.com", "other.test").aligned  # one by DKIM, the other by SPF


def test_no_from_field_never_aligns() -> None:
    verdict = judge(b"Subject: x\r\n\r\n", "example.com", "example.com")
    assert not verdict.aligned and "RFC 5322 3.6" in verdict.reason


def test_a_from_field_with_white_space_before_its_colon_counts() -> None:
    # RFC 5322 4.5 obs-optional: `From :` is a From field to readers and DKIM verifiers alike; missing it
    # let a second, unaligned author through `refuse` next to an aligned `From:`.
    for head in (
        b"From :ceo@bank.example\r\nFrom: app@example.test\r\n\r\n",
        b"From: app@example.test\r\nFrom\t :ceo@bank.example\r\n\r\n",
    ):
        verdict = judge(head, "example.test", "example.test")
        assert not verdict.aligned and "2 From: fields" in verdict.reason
    assert author_domains(b"From :a@x.test\r\n\r\n") == (["x.test"], "")
    assert judge(b"Fromage: a@x.test\r\nFrom: b@y.test\r\n\r\n", "y.test", "").aligned
