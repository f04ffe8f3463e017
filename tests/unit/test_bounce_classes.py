"""Bounce classes (issue 15, part 1): real-world-shaped failure replies and the class the shipped table
gives each; an operator's rules over the shipped ones; rules files refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from postmux.delivery.pipelining import take_reply
from postmux.reply import MAX_TEXT, Reply
from postmux.reputation.bounces import (
    KNOWN_CLASSES,
    UNCATEGORIZED,
    BounceClassifier,
    BounceRulesError,
    reply_from_dsn,
    shipped_rules,
)

CORPUS_FILE = Path(__file__).with_name("bounce_replies.txt")


def read_corpus(path: Path = CORPUS_FILE) -> list[tuple[str, str, str]]:
    """(who says it, the reply's first line, the class it must get), from the table's rows."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            who, bounce_class, reply = (cell.strip() for cell in line.split("|", 2))
            rows.append((who, reply, bounce_class))
    return rows


CORPUS = read_corpus()


def reply_of(line: str) -> Reply:
    code, _, rest = line.partition(" ")
    return Reply.parse(int(code), rest)


@pytest.fixture(scope="module")
def shipped() -> BounceClassifier:
    return BounceClassifier.load()


@pytest.mark.parametrize(
    ("who", "line", "expected"), CORPUS, ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(CORPUS)]
)
def test_a_real_world_reply_gets_its_class(
    shipped: BounceClassifier, who: str, line: str, expected: str
) -> None:
    assert shipped.classify(reply_of(line)) == expected


def test_the_shipped_table_names_only_known_classes() -> None:
    assert {r.bounce_class for r in shipped_rules()} <= KNOWN_CLASSES


def test_every_shipped_rule_classifies_some_reply_of_the_corpus_or_is_a_code_rule(
    shipped: BounceClassifier,
) -> None:
    # A text rule nothing in the corpus reaches is untested: the corpus grows with the table.
    reached = {shipped.rule_for(reply_of(line)) for _, line, _ in CORPUS}
    untested = [r for i, r in enumerate(shipped.rules) if r.text and i not in reached]
    assert not untested, untested


def test_an_operator_rule_overrides_a_shipped_one(tmp_path: Path) -> None:
    rules = tmp_path / "bounces.toml"
    rules.write_text(
        '[[rule]]\nclass = "InactiveMailbox"\nenhanced = "5.1.1"\ntext = "mailbox retired"\n'
        '[[rule]]\nclass = "CorporateFilter"\ncode = "55x"\ntext = "ACME gateway"\n'
    )
    classifier = BounceClassifier.load(rules)
    assert classifier.classify(Reply(550, "5.1.1", "mailbox retired on 2026-01-01")) == "InactiveMailbox"
    assert classifier.classify(Reply(550, "5.1.1", "user unknown")) == "InvalidRecipient"  # shipped still
    assert classifier.classify(Reply(554, "5.7.1", "refused by the acme Gateway")) == "CorporateFilter"
    assert BounceClassifier.load().classify(Reply(550, "5.1.1", "mailbox retired")) == "InvalidRecipient"


def test_without_the_shipped_table_only_the_operators_rules_count(tmp_path: Path) -> None:
    rules = tmp_path / "bounces.toml"
    rules.write_text('[[rule]]\nclass = "Gone"\ncode = "5xx"\n')
    classifier = BounceClassifier.load(rules, shipped=False)
    assert classifier.classify(Reply(550, "5.1.1", "user unknown")) == "Gone"
    assert classifier.classify(Reply(451, "4.4.5", "busy")) == UNCATEGORIZED


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[[rule]]\ncode = "550"\n', "rule[0].class: a class name"),
        ('[[rule]]\nclass = "X"\n', "rule[0]: a rule needs at least one of code, enhanced, text"),
        ('[[rule]]\nclass = "X"\ncode = "650"\n', "rule[0].code: '650' is not a reply code"),
        ('[[rule]]\nclass = "X"\nenhanced = ["5.1"]\n', "rule[0].enhanced: '5.1' is not an enhanced code"),
        ('[[rule]]\nclass = "X"\ntext = "user (unknown"\n', "rule[0].text: not a regular expression"),
        ('[[rule]]\nclass = "X"\ntext = "(a)\\\\1"\n', "rule[0].text: backreferences"),
        ('[[rule]]\nclass = "X"\ntext = "(?i)x"\n', "rule[0].text: not a regular expression"),
        ('[[rule]]\nclass = "X"\ntext = "x"\ncolour = "red"\n', "rule[0]: unknown key 'colour'"),
        ("[rules]\nX = ['a']\n", "unknown key 'rules'"),
        ("[[rule]\n", "Expected"),
    ],
)
def test_a_bad_rules_file_is_refused_naming_the_file_rule_and_reason(
    tmp_path: Path, text: str, reason: str
) -> None:
    rules = tmp_path / "bounces.toml"
    rules.write_text(text)
    with pytest.raises(BounceRulesError) as e:
        BounceClassifier.load(rules)
    assert str(e.value).startswith(f"{rules}: ")
    assert reason in str(e.value)


def test_a_missing_rules_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BounceRulesError, match="cannot be read"):
        BounceClassifier.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("status", "diagnostic", "reply", "expected"),
    [
        (
            "5.1.1",
            "smtp; 550-5.1.1 The email account that you tried to reach does not exist.",
            Reply(550, "5.1.1", "The email account that you tried to reach does not exist."),
            "InvalidRecipient",
        ),
        (
            "5.0.0 (permanent failure)",
            "SMTP; 552 1 Requested mail action aborted, mailbox not found",
            Reply(552, "5.0.0", "1 Requested mail action aborted, mailbox not found"),
            "InvalidRecipient",
        ),
        ("4.2.2", "", Reply(450, "4.2.2", ""), "QuotaIssues"),
        ("5.7.1", "X-Unix; mailbox on fire", Reply(550, "5.7.1", "X-Unix; mailbox on fire"), "PolicyRelated"),
    ],
)
def test_a_dsns_status_and_diagnostic_code_are_classed_as_a_reply(
    shipped: BounceClassifier, status: str, diagnostic: str, reply: Reply, expected: str
) -> None:
    # RFC 3464 2.3.4 and 2.3.6: what a later DSN (asynchronous bounce) says about one recipient.
    assert reply_from_dsn(status, diagnostic) == reply
    assert shipped.classify(reply) == expected


# Multi-line replies as receivers send them (RFC 5321 4.2.1), whose words are on the later lines.
MULTI_LINE = [
    (
        "550-5.7.1 [192.0.2.1      12] Our system has detected that this message is\r\n"
        "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
        "550-5.7.1 this message has been blocked. Please visit\r\n"
        "550-5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError\r\n"
        "550 5.7.1  for more information. a1si1234567.89 - gsmtp\r\n",
        "SpamContent",
        "[192.0.2.1      12] Our system has detected that this message is likely unsolicited mail. To reduce "
        "the amount of spam sent to Gmail, this message has been blocked. Please visit "
        "https://support.google.com/mail/?p=UnsolicitedMessageError for more information. "
        "a1si1234567.89 - gsmtp",
    ),
    (
        "550-5.7.1 [192.0.2.1] Our system has detected that this message is\r\n"
        "550-5.7.1 likely suspicious due to the very low reputation of the sending\r\n"
        "550-5.7.1 domain. To best protect our users from spam, the message has been\r\n"
        "550 5.7.1 blocked. https://support.google.com/mail/answer/188131 - gsmtp\r\n",
        "SpamBlock",
        "[192.0.2.1] Our system has detected that this message is likely suspicious due to the very low "
        "reputation of the sending domain. To best protect our users from spam, the message has been "
        "blocked. https://support.google.com/mail/answer/188131 - gsmtp",
    ),
    (
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
        "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
        "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser\r\n",
        "InvalidRecipient",
        "The email account that you tried to reach does not exist. Please try double-checking the "
        "recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser",
    ),
    (  # Exim's sender verification: the later lines quote the sender's address, not the recipient's
        "550-Verification failed for <news@sender.test>\r\n550-Unrouteable address\r\n"
        "550 Sender verify failed\r\n",
        "InvalidSender",
        "Verification failed for <news@sender.test> Unrouteable address Sender verify failed",
    ),
    (
        "550-Verification failed for <news@sender.test>\r\n550-Called:   192.0.2.9\r\n"
        "550-Sent:     RCPT TO:<news@sender.test>\r\n"
        "550-Response: 550 5.1.1 <news@sender.test>: Recipient address rejected: User unknown\r\n"
        "550 Sender verify failed\r\n",
        "InvalidSender",
        "Verification failed for <news@sender.test> Called:   192.0.2.9 Sent:     RCPT TO:<news@sender.test> "
        "Response: 550 5.1.1 <news@sender.test>: Recipient address rejected: User unknown "
        "Sender verify failed",
    ),
]


@pytest.mark.parametrize(
    ("wire", "expected", "text"),
    MULTI_LINE,
    ids=["gmail-unsolicited", "gmail-reputation", "gmail-no-such-user", "exim-sender-verify", "exim-callout"],
)
def test_a_multi_line_reply_is_read_and_classed_whole(
    shipped: BounceClassifier, wire: str, expected: str, text: str
) -> None:
    """The reply as it comes off the wire (delivery/pipelining.py reads it as aiosmtplib does: each line's
    code taken off, the lines joined with newlines): its lines joined with single spaces, the enhanced code
    each line repeats taken off (the spaces within a line stay as the receiver wrote them), and classed on
    all its words."""
    response = take_reply(bytearray(wire.encode()))
    assert response is not None
    reply = Reply.parse(response.code, response.message)
    assert reply == Reply(response.code, reply.enhanced_code, text)
    assert shipped.classify(reply) == expected
    # The same reply with each line's code still on it (as a DSN or a test may hand it over) reads alike.
    assert Reply.parse(response.code, wire.partition(" ")[2] if wire[3] == " " else wire[4:]) == reply


def test_a_dsns_diagnostic_of_a_multi_line_reply_loses_the_codes_its_lines_repeated(
    shipped: BounceClassifier,
) -> None:
    """Postfix writes a multi-line reply into the Diagnostic-Code on one line, each line's code in it."""
    diagnostic = (
        "smtp; 550-5.7.1 [192.0.2.1] Our system has detected that this message is 550-5.7.1 likely "
        "unsolicited mail. To reduce the amount of spam sent to Gmail, 550 5.7.1 this message has been "
        "blocked."
    )
    reply = reply_from_dsn("5.7.1", diagnostic)
    assert reply == Reply(
        550,
        "5.7.1",
        "[192.0.2.1] Our system has detected that this message is likely unsolicited mail. To reduce the "
        "amount of spam sent to Gmail, this message has been blocked.",
    )
    assert shipped.classify(reply) == "SpamContent"


def test_a_reply_text_is_bounded() -> None:
    lines = "\n".join(f"5.7.1 line {i} " + "x" * 70 for i in range(40))
    reply = Reply.parse(550, lines)
    assert reply.enhanced_code == "5.7.1" and reply.text.startswith("line 0 x")
    assert len(reply.text) == MAX_TEXT and reply.text.endswith("...")
