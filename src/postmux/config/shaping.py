"""The [dns], [spf], [shaping] and [throttles] tables: how source members find mail servers, which members
a sender's SPF record permits, the limits per destination, and where the limits shared between nodes are
kept."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import (
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from postmux.config.values import (
    Duration,
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
