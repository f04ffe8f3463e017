"""The reputation tables: [bounces] and [suppression] (how failure replies are classed, who gets no more
mail), [blocklists] and [breaker] (what takes a sending IP out of service), [verp] (where returned mail
goes)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, StrictBool, field_validator, model_validator

from postmux.config.values import Duration, Hostname, PositiveDuration, _Frozen
from postmux.reply import Reply
from postmux.reputation.bounces import KNOWN_CLASSES, BounceClassifier, BounceRulesError


class BounceSettings(_Frozen):
    """Bounce classes (postmux.reputation.bounces): the shipped rule table, with an operator's rules file
    checked before it. The file is read and compiled when the configuration loads, at start and at each
    reload, so a broken rule is a config error, never a surprise at the first bounce."""

    # A TOML file of [[rule]] tables (class, code, enhanced, text), checked before the shipped ones.
    rules_file: str | None = None
    # false: only the rules_file's rules (a reply none matches is Uncategorized).
    default_rules: StrictBool = True
    # Classes of a 5xx reply that refuse the member that sent (its IP is listed), not the recipient: the
    # recipient goes to another member of the pool that has not tried it, and bounces at the last one
    # (scheduling/verdicts.py). []: every 5xx bounces where it is given.
    try_other_members: tuple[str, ...] = ("SpamBlock",)
    _classifier: BounceClassifier | None = PrivateAttr(default=None)

    @field_validator("rules_file")
    @classmethod
    def _rules(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                BounceClassifier.load(v, shipped=False)
            except BounceRulesError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _compile(self) -> BounceSettings:
        # The file was checked above; read again here, a file that changed in between is refused still.
        try:
            self._classifier = BounceClassifier.load(self.rules_file, shipped=self.default_rules)
        except BounceRulesError as e:
            raise ValueError(f"rules_file: {e}") from None
        named = KNOWN_CLASSES | {rule.bounce_class for rule in self._classifier.rules}
        for name in self.try_other_members:
            if name not in named:
                # A misspelt class would match no reply, silently: every such 5xx would bounce at once.
                known = ", ".join(sorted(named))
                raise ValueError(f"try_other_members: {name!r} is not a bounce class ({known})")
        return self

    @property
    def classifier(self) -> BounceClassifier:
        assert self._classifier is not None  # set by _compile, or the settings were refused
        return self._classifier

    @property
    def refuses_member(self) -> Callable[[Reply], bool] | None:
        """Whether a 5xx refuses the member rather than the recipient (`try_other_members`); None when
        no class does, so a verdict classes nothing it need not."""
        if not self.try_other_members:
            return None
        classify, classes = self.classifier.classify, frozenset(self.try_other_members)
        return lambda reply: classify(reply) in classes


SuppressedAction = Literal["refuse", "drop"]


class SuppressionSettings(_Frozen):
    """The suppression list (postmux.reputation.suppression), kept in the spool."""

    # Look recipients up at all; false: the list is kept (and added to) but nothing is refused or dropped.
    enabled: StrictBool = True
    # What a suppressed recipient gets: "refuse" answers RCPT (or the API's recipient) 550 5.7.1; "drop"
    # accepts it and drops it with a Suppressed event, so a sender's tools see one outcome per recipient.
    action: SuppressedAction = "refuse"
    # A bounce of class InvalidRecipient, BadDomain or InactiveMailbox adds its recipient.
    hard_bounces: StrictBool = True
    # How long an entry from a hard bounce lasts; 0: until removed.
    hard_bounce_expiry: Duration = 0.0
    # A complaint (an ARF report matched through [verp]) adds its recipient: who called it spam gets no more.
    complaints: StrictBool = True


# Spamhaus answers 127.255.255.252-255 for a query it refuses (a typo in the zone, a public resolver, too
# many queries): an error about the query, never a listing of the address.
_DNSBL_ERRORS = ipaddress.ip_network("127.255.255.0/24")
_DNSBL_ANSWERS = ipaddress.ip_network("127.0.0.0/8")  # RFC 5782 2.1: a DNSxL answers in 127.0.0.0/8


class BlocklistZone(_Frozen):
    """One DNS blocklist (RFC 5782): `zone` is asked `<reversed IP>.zone` (or `<domain>.zone` for a domain
    list); an A answer in `listed` means listed. Empty `listed`: any 127.0.0.0/8 answer. Either way an answer
    in 127.255.255.0/24 or outside 127.0.0.0/8 is an error answer (RFC 5782 2.1), never a verdict."""

    zone: Hostname
    listed: tuple[str, ...] = ()

    @field_validator("listed")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or network") from None
        return v

    def means_listed(self, answer: str) -> bool | None:
        """True: `answer` lists the subject; False: it does not; None: it is an error answer."""
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            return None
        # An error answer says nothing about the listing, whatever `listed` holds: checked first, or a zone
        # with `listed` would read Spamhaus's 127.255.255.254 as "not listed" and delist a listed IP.
        if address not in _DNSBL_ANSWERS or address in _DNSBL_ERRORS:
            return None
        if self.listed:
            return any(address in ipaddress.ip_network(n, strict=False) for n in self.listed)
        return True


def _zones(v: Any) -> Any:
    """A zone may be given as its name alone."""
    if isinstance(v, (list, tuple)):
        return [{"zone": z} if isinstance(z, str) else z for z in v]
    return v


class BlocklistSettings(_Frozen):
    """Blocklist watch: each member's sending IPs asked of `zones`, the sending domains of `domain_zones`,
    every `interval`; a member with a listed IP is out of rotation until it is delisted."""

    zones: tuple[BlocklistZone, ...] = ()
    domain_zones: tuple[BlocklistZone, ...] = ()
    # Domains checked against domain_zones besides the [[dkim]] signing domains.
    domains: tuple[Hostname, ...] = ()
    # Public lists ask for restraint (Spamhaus: cache, do not hammer): their listings change in minutes.
    interval: PositiveDuration = 600.0
    # A receiver's reply that names a blocklist suspends that member x destination this long; 0: do not.
    reply_suspend: Duration = 3600.0

    @field_validator("zones", "domain_zones", mode="before")
    @classmethod
    def _zone_names(cls, v: Any) -> Any:
        return _zones(v)

    @property
    def enabled(self) -> bool:
        return bool(self.zones or self.domain_zones)


class BreakerSettings(_Frozen):
    """The reputation breaker: a sending IP x destination whose hard-bounce or complaint rate over `window`
    passes its threshold is paused (suspended) for `cooldown`, or until an operator resumes it."""

    # Which members' lanes it watches: "sources" (direct-to-MX members, whose IP's reputation is postmux's
    # own), "all" (relays too, each relay by its name), "off".
    members: Literal["off", "sources", "all"] = "sources"
    window: PositiveDuration = 3600.0
    # No verdict on fewer recipients (delivered + bounced) in the window: three bounces of five say little.
    min_messages: int = Field(default=100, gt=0)
    # Mailbox providers start to distrust a sender past a few percent of dead addresses; ESPs suspend
    # customers near 5-10%. Gmail and Yahoo's bulk-sender rules ask for a spam complaint rate under 0.3%.
    hard_bounce_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    complaint_rate: float = Field(default=0.003, gt=0.0, le=1.0)
    cooldown: PositiveDuration = 4 * 3600.0


class VerpSettings(_Frozen):
    """VERP return paths: mail of the chosen pools goes out with an envelope sender that names the message
    and the recipient (signed), at `domain`, whose mail postmux takes itself: DSNs and ARF complaints
    sent there are matched to what was sent (reputation/returns.py)."""

    domain: Hostname | None = None  # the return-path domain; its MX must point at postmux's [smtp] listener
    secret_file: str | None = None  # the signing key of the return paths (16 octets or more)
    pools: tuple[str, ...] = ()  # pools whose mail goes out with VERP return paths; empty: every pool
    _secret: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _load(self) -> VerpSettings:
        if self.domain is None:
            return self
        if self.secret_file is None:
            raise ValueError("a VERP domain needs a secret_file (its return paths are signed)")
        try:
            secret = Path(self.secret_file).read_bytes().strip()
        except OSError as e:
            raise ValueError(f"secret_file: {self.secret_file!r} cannot be read: {e.strerror}") from None
        if len(secret) < 16:
            raise ValueError(f"secret_file: {self.secret_file!r} holds {len(secret)} octets; 16 or more")
        self._secret = secret
        return self

    @property
    def secret(self) -> bytes:
        return self._secret

    def applies_to(self, pool: str) -> bool:
        return self.domain is not None and (not self.pools or pool in self.pools)
