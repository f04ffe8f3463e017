"""Bounce classes: what a failure reply says about the recipient, the sender or the mail, in a few words.

Receivers word the same failure a hundred ways ("550 5.1.1 User unknown", "552 1 Requested mail action
aborted, mailbox not found", "550 5.1.10 RESOLVER.ADR.RecipientNotFound"), and use enhanced codes their
own way. As KumoMTA's bounce classifier does, postmux maps every failure reply (code, enhanced code, text;
from an attempt, or later from a DSN) to one class of a short list (InvalidRecipient, BadDomain, ...) by
an ordered table of rules: the first that matches names the class, none gives Uncategorized. The table
ships with postmux (bounce_rules.toml beside this module); an operator's file of rules of the same shape
is checked first, so it overrides a shipped rule without copying the table.

Cost: the rules are compiled once into one regular expression, one named alternative per rule, matched
against one line "CODE ENHANCED TEXT": a classification is one `re.match` (bench/bounce_classify.py
measures it; bench/README.md has the figure: about 30 µs on a corpus of real replies, so the last 4,096
distinct replies are remembered, as receivers repeat themselves).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from postmux.reply import Reply, bounded

UNCATEGORIZED = "Uncategorized"
ADMIN_BOUNCE = "AdminBounce"  # bounced by an operator (`postmux bounce`), not by a receiver

# The classes KumoMTA names (its PreDefinedBounceClass), which the shipped table uses; an operator's rules
# may name others (a class is a metric label, so their number stays that of the rules).
KNOWN_CLASSES = frozenset(
    {
        "InvalidRecipient",
        "BadDomain",
        "InactiveMailbox",
        "InvalidSender",
        "QuotaIssues",
        "NoAnswerFromHost",
        "BadConnection",
        "DNSFailure",
        "RoutingErrors",
        "RelayDenied",
        "RelayingIssues",
        "TransientFailure",
        "MessageExpired",
        "ProtocolErrors",
        "AuthenticationFailed",
        "PolicyRelated",
        "SpamBlock",
        "SpamContent",
        "SpamRelated",
        "ContentRelated",
        "VirusRelated",
        "ProhibitedAttachment",
        "BadConfiguration",
        UNCATEGORIZED,
        ADMIN_BOUNCE,
    }
)

# The classes that say the address will never take mail: a bounce of one of these suppresses the
# recipient (postmux.reputation.suppression), as Postal and KumoMTA users ask.
HARD_BOUNCE_CLASSES = frozenset({"InvalidRecipient", "BadDomain", "InactiveMailbox"})

_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_CODE = re.compile(r"[2-5][0-9x][0-9x]\Z")
_ENHANCED = re.compile(r"([245x])\.([0-9]{1,3}|x)\.([0-9]{1,3}|x)\Z")
# A rule's text is one alternative of a larger expression: its own group numbers would shift and its group
# names could clash with the rules' (a global flag such as (?i) fails to compile there, and says so).
_GROUP_REFERENCE = re.compile(r"\\[1-9]|\(\?P[=<]")
_SHIPPED = "bounce_rules.toml"


class BounceRulesError(ValueError):
    """A rules file that cannot be used; the message names the file, the rule and the reason."""


@dataclass(frozen=True, slots=True)
class BounceRule:
    """One line of the table: a reply matches when every field given matches (at least one is)."""

    bounce_class: str
    codes: tuple[str, ...] = ()  # "550", "5xx"
    enhanced: tuple[str, ...] = ()  # "5.1.1", "x.1.1", "5.7.x"
    text: str = ""  # searched anywhere in the reply's text, case-insensitive

    def pattern(self) -> str:
        """This rule as a regular expression over `_line(reply)`, anchored at its start."""
        code = _alternatives(c.replace("x", r"\d") for c in self.codes) or r"\d{3}"
        enhanced = _alternatives(_enhanced_pattern(e) for e in self.enhanced) or r"\S+"
        text = f"(?s:.*?)(?:{self.text})" if self.text else ""
        return f"{code} {enhanced} {text}"


def _alternatives(parts: Iterable[str]) -> str:
    parts = list(parts)
    return f"(?:{'|'.join(parts)})" if parts else ""


def _enhanced_pattern(code: str) -> str:
    m = _ENHANCED.match(code)
    assert m is not None  # checked by _rule
    klass, subject, detail = m.groups()
    return r"\.".join(
        (
            "[245]" if klass == "x" else klass,
            r"\d{1,3}" if subject == "x" else subject,
            r"\d{1,3}" if detail == "x" else detail,
        )
    )


_DIAGNOSTIC = re.compile(r"^\s*(?:[A-Za-z-]+\s*;)?\s*(\d{3})[ -]?(.*)$", re.DOTALL)


def reply_from_dsn(status: str, diagnostic_code: str = "") -> Reply:
    """The reply a DSN reports for one recipient (RFC 3464 2.3.4 Status, 2.3.6 Diagnostic-Code), to be
    classed as a synchronous reply is: "smtp; 550-5.1.1 The email account ..." gives 550, 5.1.1 and the
    words. Without a diagnostic (or one not in SMTP terms), the Status alone: 5.x.x as 550, 4.x.x as 450.
    """
    status = status.strip().split()[0] if status.strip() else ""
    m = _DIAGNOSTIC.match(" ".join(diagnostic_code.split()))
    if m:
        reply = Reply.parse(int(m.group(1)), m.group(2))
        if reply.enhanced_code:
            # A multi-line reply comes on one line, each of its lines' codes still in it (Postfix: "550-5.7.1
            # ... is 550-5.7.1 likely unsolicited mail ..."): they go, as Reply.parse drops them.
            repeats = re.compile(rf"\s{reply.code}[ -]{re.escape(reply.enhanced_code)}\b")
            reply = Reply(reply.code, reply.enhanced_code, repeats.sub("", reply.text))
        if reply.enhanced_code or not status:
            return reply
        return Reply(reply.code, status, reply.text)
    code = 450 if status.startswith("4") else 550
    return Reply(code, status, bounded(" ".join(diagnostic_code.split())))


def _line(reply: Reply) -> str:
    # A reply without an enhanced code gets "-", so a rule with `enhanced` never matches it by accident.
    return f"{reply.code} {reply.enhanced_code or '-'} {reply.text}"


class BounceClassifier:
    """The rules in order, compiled once into one expression; `classify` is one match, no I/O."""

    def __init__(self, rules: Sequence[BounceRule]) -> None:
        self.rules = tuple(rules)
        alternatives = "|".join(f"(?P<r{i}>{rule.pattern()})" for i, rule in enumerate(self.rules))
        # Only a rule that compiles alone gets here, so a failure now is postmux's own bug.
        self._expression = re.compile(f"(?:{alternatives})" if self.rules else r"(?!)", re.IGNORECASE)
        self._classes = {f"r{i}": rule.bounce_class for i, rule in enumerate(self.rules)}
        # Receivers repeat themselves: the same reply to many recipients of a batch, or of a blocked IP.
        self._classify_line = functools.lru_cache(maxsize=4096)(self.classify_line)

    def classify(self, reply: Reply) -> str:
        """The class of a failure reply: that of the first rule it matches, else Uncategorized."""
        return self._classify_line(_line(reply))

    def classify_line(self, line: str) -> str:
        """The class of "CODE ENHANCED TEXT" ("-" for no enhanced code), uncached."""
        m = self._expression.match(line)
        if m is None or m.lastgroup is None:
            return UNCATEGORIZED
        return self._classes[m.lastgroup]

    def rule_for(self, reply: Reply) -> int | None:
        """The index in `rules` of the rule that classes `reply`; None: Uncategorized (for tests, tools)."""
        m = self._expression.match(_line(reply))
        return None if m is None or m.lastgroup is None else int(m.lastgroup[1:])

    @classmethod
    def load(cls, rules_file: str | Path | None = None, *, shipped: bool = True) -> BounceClassifier:
        """The operator's rules from `rules_file` (if any), then the shipped table (unless `shipped` is
        False). Raises BounceRulesError naming the file, the rule and what is wrong."""
        rules: list[BounceRule] = []
        if rules_file is not None:
            rules.extend(read_rules(Path(rules_file)))
        if shipped:
            rules.extend(shipped_rules())
        return cls(rules)


def shipped_rules() -> list[BounceRule]:
    text = resources.files("postmux.reputation").joinpath(_SHIPPED).read_text(encoding="utf-8")
    return parse_rules(text, _SHIPPED)


def read_rules(path: Path) -> list[BounceRule]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BounceRulesError(f"{path}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str) -> list[BounceRule]:
    """The rules of a file's `[[rule]]` tables, in order; `source` names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BounceRulesError(f"{source}: {e}") from None
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise BounceRulesError(f"{source}: unknown key {unknown[0]!r} (rules are [[rule]] tables)")
    tables = data.get("rule", [])
    if not isinstance(tables, list):
        raise BounceRulesError(f"{source}: rule: an array of tables, [[rule]]")
    return [_rule(table, f"{source}: rule[{i}]") for i, table in enumerate(tables)]


def _rule(table: Any, where: str) -> BounceRule:
    if not isinstance(table, dict):
        raise BounceRulesError(f"{where}: a table, [[rule]]")
    unknown = sorted(set(table) - {"class", "code", "enhanced", "text", "note"})
    if unknown:
        raise BounceRulesError(f"{where}: unknown key {unknown[0]!r}")
    name = table.get("class")
    if not isinstance(name, str) or not _CLASS_NAME.match(name):
        raise BounceRulesError(f"{where}.class: a class name such as 'InvalidRecipient' is needed")
    codes = _strings(table.get("code", ()), f"{where}.code")
    for code in codes:
        if not _CODE.match(code):
            raise BounceRulesError(f"{where}.code: {code!r} is not a reply code ('550', '55x', '5xx')")
    enhanced = _strings(table.get("enhanced", ()), f"{where}.enhanced")
    for e in enhanced:
        if not _ENHANCED.match(e):
            raise BounceRulesError(f"{where}.enhanced: {e!r} is not an enhanced code ('5.1.1', 'x.1.1')")
    text = table.get("text", "")
    if not isinstance(text, str):
        raise BounceRulesError(f"{where}.text: a regular expression (a string)")
    if not (codes or enhanced or text):
        raise BounceRulesError(f"{where}: a rule needs at least one of code, enhanced, text")
    rule = BounceRule(name, tuple(codes), tuple(e.lower() for e in enhanced), text)
    _check_compiles(rule, where)
    return rule


def _strings(value: Any, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise BounceRulesError(f"{where}: a string or a list of strings")
    return [v.strip().lower() for v in values]


def _check_compiles(rule: BounceRule, where: str) -> None:
    if _GROUP_REFERENCE.search(rule.text):
        raise BounceRulesError(f"{where}.text: backreferences and named groups are not supported")
    try:
        re.compile(f"(?:(?P<r0>{rule.pattern()}))", re.IGNORECASE)
    except re.error as e:
        raise BounceRulesError(f"{where}.text: not a regular expression: {e}") from None
