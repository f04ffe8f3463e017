"""The [dns], [spf], [blocklists], [breaker], [verp], [shaping] and [throttles] tables: how source members
find mail servers, what the sender's and the sending IPs' standing allows, where returned mail goes, the
limits per destination, and where the limits shared between nodes are kept."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    StrictBool,
    field_validator,
    model_validator,
)

from postmux.config.values import (
    Duration,
    Hostname,
    HostPort,
    PositiveDuration,
    Rate,
    _Frozen,
    split_hostport,
)


class DnsSettings(_Frozen):
    """How source members find a domain's mail servers."""

    # Resolvers to ask, "ip" or "ip:port"; empty: the system's (/etc/resolv.conf).
    nameservers: tuple[str, ...] = ()
    timeout: Duration = 5.0
    # Answers are cached for their TTL, but at least min_ttl and at most max_ttl.
    min_ttl: Duration = 30.0
    max_ttl: Duration = 3600.0
    # A domain that does not exist is remembered this long (RFC 2308's negative caching).
    negative_ttl: Duration = 300.0
    # The port MX hosts listen on (25; another for tests and private networks).
    mx_port: int = Field(default=25, gt=0, le=65535)
    # domain -> the mail servers to use instead of asking DNS, "host:port", best first.
    overrides: dict[str, tuple[HostPort, ...]] = {}  # noqa: RUF012 (pydantic copies field defaults)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ns in v:
            host = split_hostport(ns)[0] if ns.count(":") == 1 or ns.startswith("[") else ns
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{ns!r}: a nameserver is an IP address, optionally with :port") from None
        return v

    @field_validator("overrides", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k.lower().rstrip("."): [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    @field_validator("overrides")
    @classmethod
    def _hostports(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for domain, hosts in v.items():
            if not hosts:
                raise ValueError(f"{domain}: at least one host:port is needed")
        return v


SpfSoftfail = Literal["permitted", "not_permitted"]
SpfOnError = Literal["open", "closed"]


class SpfSettings(_Frozen):
    """SPF-aware routing: a member whose sending IPs the sender domain's SPF record does not permit is not
    used for that domain's mail (postmux.reputation.spf evaluates, postmux.scheduling.gate judges)."""

    enabled: StrictBool = False
    # "~all": a receiver marks the mail but rarely refuses it; it is still no SPF pass, so DMARC does not
    # align on it. An operator who routes by SPF wants a pass: softfail counts as not permitted.
    softfail: SpfSoftfail = "not_permitted"
    # temperror (DNS failed) or permerror (a broken record): "open" uses every member, as if the domain
    # published nothing; "closed" uses none, and the mail waits until the record evaluates.
    on_error: SpfOnError = "open"
    # The longest one evaluation may take, every lookup of every include and redirect together
    # (RFC 7208 4.6.4 suggests at least 20 s); each lookup also stops at [dns] timeout.
    timeout: Duration = 20.0
    # How long a verdict that met a temperror is kept before asking again.
    error_ttl: Duration = 60.0


# Spamhaus answers 127.255.255.252-255 for a query it refuses (a typo in the zone, a public resolver, too
# many queries): an error about the query, never a listing of the address.
_DNSBL_ERRORS = ipaddress.ip_network("127.255.255.0/24")
_DNSBL_ANSWERS = ipaddress.ip_network("127.0.0.0/8")  # RFC 5782 2.1: a DNSxL answers in 127.0.0.0/8


class BlocklistZone(_Frozen):
    """One DNS blocklist (RFC 5782): `zone` is asked `<reversed IP>.zone` (or `<domain>.zone` for a domain
    list); an A answer in `listed` means listed. Empty `listed`: any 127.0.0.0/8 answer but 127.255.255.x."""

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
        if self.listed:
            return any(address in ipaddress.ip_network(n, strict=False) for n in self.listed)
        if address not in _DNSBL_ANSWERS or address in _DNSBL_ERRORS:
            return None
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


class ProviderSettings(_Frozen):
    """A mailbox provider: destinations whose MX hosts end in one of `mx_suffixes` share one queue and one
    set of limits (as KumoMTA's sites do); `domains` names its own domains, so relay pools, which never
    look up MX records, can tell them too."""

    name: str = Field(min_length=1)
    mx_suffixes: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


# The large mailbox providers. Suffixes are matched on label boundaries: "google.com" matches
# "aspmx.l.google.com" but not "notgoogle.com".
DEFAULT_PROVIDERS: tuple[ProviderSettings, ...] = (
    ProviderSettings(
        name="google",
        mx_suffixes=("google.com", "googlemail.com"),
        domains=("gmail.com", "googlemail.com"),
    ),
    ProviderSettings(
        name="microsoft",
        mx_suffixes=("outlook.com", "hotmail.com"),
        domains=("outlook.com", "hotmail.com", "live.com", "msn.com", "hotmail.co.uk", "live.co.uk"),
    ),
    ProviderSettings(
        name="yahoo",
        mx_suffixes=("yahoodns.net",),
        domains=("yahoo.com", "ymail.com", "rocketmail.com", "aol.com", "yahoo.co.uk", "yahoo.fr"),
    ),
    ProviderSettings(name="apple", mx_suffixes=("icloud.com",), domains=("icloud.com", "me.com", "mac.com")),
    ProviderSettings(name="comcast", mx_suffixes=("comcast.net",), domains=("comcast.net",)),
    ProviderSettings(name="gmx", mx_suffixes=("gmx.net", "web.de"), domains=("gmx.net", "gmx.de", "web.de")),
    ProviderSettings(name="yandex", mx_suffixes=("yandex.net", "yandex.ru"), domains=("yandex.ru", "ya.ru")),
    ProviderSettings(name="mailru", mx_suffixes=("mail.ru",), domains=("mail.ru", "inbox.ru", "bk.ru")),
    ProviderSettings(name="zoho", mx_suffixes=("zoho.com", "zoho.eu"), domains=("zohomail.com",)),
    ProviderSettings(name="proton", mx_suffixes=("protonmail.ch",), domains=("proton.me", "protonmail.com")),
    ProviderSettings(name="fastmail", mx_suffixes=("messagingengine.com",), domains=("fastmail.com",)),
)


class ShapingRule(_Frozen):
    """Limits for traffic from a member to a destination. More specific rules win key by key:
    member and destination, then destination, then member, then '*'."""

    destination: str = "*"  # a provider's name, a domain, or '*' for every destination
    pool: str | None = None
    member: str | None = None
    max_connections: int | None = Field(default=None, gt=0)
    max_messages_per_connection: int | None = Field(default=None, gt=0)
    max_recipients: int | None = Field(default=None, gt=0)
    rate: Rate | None = None
    # Messages that may go at once before the rate applies; 1 spaces them evenly.
    burst: int = Field(default=1, gt=0)


ReactionAction = Literal["suspend", "throttle"]


class ReactionRule(_Frozen):
    """What to do when a receiver answers a certain way (PowerMTA's backoff, KumoMTA's TSA rules).
    Every given field must match: code, enhanced_code, text (a case-insensitive regex)."""

    code: int | None = Field(default=None, ge=200, le=599)
    enhanced_code: str | None = None
    text: str | None = None
    destination: str = "*"
    # suspend: this member sends nothing to this destination for `duration`; its mail goes to the other
    # members. throttle: the allowed rate and connections are multiplied by `factor`.
    action: ReactionAction = "suspend"
    duration: Duration = 300.0
    factor: float = Field(default=0.5, gt=0.0, lt=1.0)

    @field_validator("text")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _something(self) -> ReactionRule:
        if self.code is None and self.enhanced_code is None and self.text is None:
            raise ValueError("a reaction needs at least one of code, enhanced_code, text")
        return self


class ShapingSettings(_Frozen):
    default_providers: StrictBool = True  # the shipped table of large mailbox providers
    default_reactions: StrictBool = True
    # Automatic backoff: a deferral halves the allowed connections and rate of that member x destination;
    # each delivery adds `aimd_increase` back, up to the configured limits, never below the floors.
    # "sources": only lanes of source members, whose 4xx come from receivers; a relay's 4xx is more often
    # about the relay itself, which passive health handles. "all" adapts relay lanes too.
    aimd: Literal["off", "sources", "all"] = "sources"
    aimd_increase: Rate = 1 / 60
    min_connections: int = Field(default=1, gt=0)
    min_rate: Rate = 10 / 60
    rule: tuple[ShapingRule, ...] = ()
    reaction: tuple[ReactionRule, ...] = ()
    provider: tuple[ProviderSettings, ...] = ()


class ThrottlesSettings(_Frozen):
    """Where shaping's shared state lives (scheduling/throttles.py): this process's memory, or a Redis that
    several nodes share (scheduling/redis_throttles.py) so their limits toward a destination add up to one."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # Every key postmux writes starts with this: several farms (or tests) may share one Redis.
    prefix: str = Field(default="postmux:", min_length=1)
    # How long a call may block the event loop before the node falls back to its share of each limit.
    timeout: PositiveDuration = 0.1

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
            # The value is not echoed: a URL may carry a password.
            raise ValueError(
                "not a Redis URL: write 'redis://HOST:PORT/DB', 'rediss://...' or 'unix:///PATH'"
            )
        return v
