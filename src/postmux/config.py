"""TOML configuration: loaded once with tomllib, validated by pydantic, frozen, passed down.

Every error names the file, the key and the reason, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """'90s', '5m', '1h', '5d' or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m', '1h' or '5d'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration such as '30s', '5m', '1h' or '5d'")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def split_hostport(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not host:port (use [addr]:port for IPv6)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def _hostport(value: str) -> str:
    split_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_hostport)]  # "host:port" or "[v6]:port", checked at load

# RFC 5321 4.1.2: Domain = sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str]; RFC 1035 2.3.4:
# at most 63 octets a label.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _hostname(value: str) -> str:
    """The name postmux gives in its greeting and EHLO: a domain, or an address literal such as [192.0.2.1].

    Anything else would break the line it is written into: a CR or LF splits the greeting (every client
    and every member then sees a broken reply), a space adds a word to EHLO.
    """
    if value.startswith("[") and value.endswith("]"):
        literal = value[1:-1].removeprefix("IPv6:")
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            raise ValueError(f"{value!r} is not an address literal such as [192.0.2.1]") from None
        return value
    if len(value) > 255 or not all(_LABEL.fullmatch(label) for label in value.split(".")):
        raise ValueError(
            f"{value!r} is not a host name: letters, digits and hyphens in labels separated by dots "
            "(RFC 5321 4.1.2), or an address literal such as [192.0.2.1]"
        )
    return value


Hostname = Annotated[str, AfterValidator(_hostname)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class SmtpUser(_Frozen):
    """An SMTP AUTH user: a name and a scrypt hash made by `postmux passwd` (never the password itself)."""

    name: str = Field(min_length=1)
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        from postmux.passwords import parse_hash

        parse_hash(v)
        return v


class SmtpTlsSettings(_Frozen):
    """STARTTLS on the listener (RFC 3207): a PEM certificate chain and its private key."""

    cert_file: str
    key_file: str
    # Refuse every command but EHLO, STARTTLS, NOOP and QUIT until the client has started TLS.
    required: StrictBool = False

    @field_validator("cert_file", "key_file")
    @classmethod
    def _readable(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"{v!r} is not a readable file")
        return v


class SmtpSettings(_Frozen):
    listen: HostPort = "127.0.0.1:2525"
    # SMTP sessions in this many worker processes (0: in the main process). The main process keeps the
    # spool and delivery; see ingress/workers.py.
    workers: int = Field(default=0, ge=0, le=64)
    hostname: Hostname = "postmux.localdomain"
    max_message_size: int = Field(default=26_214_400, gt=0)
    max_recipients: int = Field(default=1000, gt=0)
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    timeout: PositiveDuration = 300.0
    # A whole connection, however busy, ends after this long (a client dribbling bytes resets `timeout`).
    session_timeout: PositiveDuration = 3600.0
    # "reject" refuses a message or command with a bare CR or LF (SMTP smuggling); "normalize" repairs
    # the message's line ends to CRLF instead. Command lines are always held to CRLF.
    line_endings: Literal["reject", "normalize"] = "reject"
    # A message that already passed this many relays (Received fields) is looping (RFC 5321 6.3).
    max_hops: int = Field(default=50, gt=0)
    max_connections: int = Field(default=1000, gt=0)
    max_connections_per_ip: int = Field(default=100, gt=0)
    # Error replies (4xx, 5xx) one connection may earn before it is closed with 421.
    max_errors: int = Field(default=20, gt=0)
    users: tuple[SmtpUser, ...] = ()
    # AUTH is offered only inside TLS unless this is false (RFC 4954 4: never send passwords in clear).
    # StrictBool (every boolean here): "yes", "no" or 1 is reported, never guessed at.
    auth_require_tls: StrictBool = True
    auth_failure_delay: Duration = 1.0
    max_auth_failures: int = Field(default=3, gt=0)
    tls: SmtpTlsSettings | None = None
    # A text line over 1000 octets (RFC 5321 4.5.3.1.6): "fold" takes the message and breaks the line as
    # Postfix's smtp_line_length_limit does (ingress/folding.py); "refuse" answers 500 5.5.2 after the dot.
    long_lines: Literal["fold", "refuse"] = "fold"
    # 452s for recipients past max_recipients that do not count toward max_errors (Postfix's
    # smtpd_recipient_overshoot_limit): a client that pipelines its RCPTs learns of the limit late.
    recipient_overshoot_limit: int = Field(default=1000, ge=0)
    # Connections the kernel holds for postmux to accept (listen(2)); asyncio's default of 100 drops a
    # burst while the loop is busy. Linux caps it at net.core.somaxconn (4096 since 5.4).
    listen_backlog: int = Field(default=1024, gt=0, le=65535)
    # Failed logins across connections within auth_failure_window, per client address and per user name
    # (Postfix's anvil); an attempt over either budget is refused before any password is checked.
    auth_failure_window: PositiveDuration = 300.0
    max_auth_failures_per_address: int = Field(default=10, gt=0)
    max_auth_failures_per_user: int = Field(default=20, gt=0)
    # scrypt checks (32 MiB and tens of ms of CPU each) running at once, for the whole listener.
    max_concurrent_auth_checks: int = Field(default=4, gt=0)

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"{net!r} is not a network: {e}") from None
        return v

    def trusted(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_networks]

    @field_validator("users")
    @classmethod
    def _unique_users(cls, v: tuple[SmtpUser, ...]) -> tuple[SmtpUser, ...]:
        names = [u.name for u in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"user names must be unique; repeated: {', '.join(dupes)}")
        return v


class HttpSettings(_Frozen):
    listen: HostPort = "127.0.0.1:8025"
    # Bearer token for the admin API (/api/v1/...); without one the admin API refuses every call.
    admin_token: str | None = Field(default=None, min_length=16)


class SpoolSettings(_Frozen):
    path: str = "var/spool.db"
    # Where the spool is, as a URL: "sqlite:///PATH" is the same as `path` (and sets it); a PostgreSQL
    # spool shared by several nodes is issue 17's. Empty: `path`.
    url: str = ""
    # Many concurrent accepts share one fsync. Off means one fsync per message (for measuring only).
    group_commit: StrictBool = True
    max_batch: int = Field(default=1000, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _path_from_url(cls, data: Any) -> Any:
        # Before the fields, so `path` (which app.py and the files kept beside the spool go by) is the
        # URL's file; a URL that names none is left for _url to refuse, under its own key.
        if isinstance(data, dict) and "path" not in data and isinstance(data.get("url"), str):
            path = sqlite_path_of(data["url"])
            if path is not None:
                return {**data, "path": path}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        scheme = v.partition(":")[0].lower()
        if scheme in ("postgresql", "postgres"):
            raise ValueError(
                "a PostgreSQL spool is not supported yet (issue 17); use path, or url = 'sqlite:///PATH'"
            )
        path = sqlite_path_of(v)
        if path is None:
            # The value is not echoed: a URL may carry a password.
            raise ValueError("not a spool URL: write 'sqlite:///PATH' (sqlite:////PATH for an absolute path)")
        given = info.data.get("path")
        if given is not None and given != path:
            raise ValueError(f"names the file {path!r} but path names {given!r}: set one of them")
        return v


def sqlite_path_of(url: str) -> str | None:
    """'sqlite:///var/spool.db' -> 'var/spool.db', 'sqlite:////var/lib/x.db' -> '/var/lib/x.db' (as
    SQLAlchemy writes them); None when the URL names no SQLite file (another scheme, a host, a query)."""
    m = re.fullmatch(r"sqlite:///([^?#]+)", url.strip(), re.IGNORECASE)
    return unquote(m.group(1)) if m else None


class RetrySettings(_Frozen):
    intervals: tuple[Duration, ...] = (60.0, 300.0, 900.0, 3600.0)
    max_age: Duration = 5 * 86400.0
    # Each wait is spread by +-jitter so a burst of deferrals does not come back as one burst.
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    # Attempts in a row that crashed postmux's own code before a message is held (set aside until an
    # operator releases it): a message that breaks the sending code breaks it on every member and day.
    max_local_errors: int = Field(default=3, gt=0)

    @field_validator("intervals")
    @classmethod
    def _nonempty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("at least one interval is needed")
        return v


class DeliverySettings(_Frozen):
    connect_timeout: Duration = 30.0
    # RFC 5321 4.5.3.2 gives 5 min for MAIL/RCPT and 10 min after the final dot; a relay farm on a LAN
    # answers in milliseconds, so shorter defaults keep a hung member from holding mail for long.
    command_timeout: Duration = 60.0
    data_timeout: Duration = 120.0
    max_messages_per_connection: int = Field(default=100, gt=0)
    idle_timeout: Duration = 10.0
    ehlo_hostname: Hostname | None = None


class EventSettings(_Frozen):
    log: str = "var/events.jsonl"


class ShutdownSettings(_Frozen):
    # How long attempts in flight (and SMTP sessions, with ingress workers) may take to finish after
    # SIGTERM before they are cancelled; their work stays in the spool for the next start.
    drain_timeout: Duration = 10.0


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(value: Any) -> float:
    """'300/min', '10000/h', '5/s' -> messages per second."""
    m = _RATE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} is not a rate such as '300/min', '10000/h' or '5/s'")
    per_s = float(m.group(1)) / _RATE_UNITS[m.group(2)[0]]
    if per_s <= 0:
        raise ValueError("a rate must be above 0")
    return per_s


Rate = Annotated[float, BeforeValidator(parse_rate)]


class WarmupSettings(_Frozen):
    """IP warm-up: day N of the schedule (day 1 is `start`) allows `days[N-1]` messages; after the
    last day the member is warm and has no cap. `provider` gives some providers a schedule of their own."""

    start: date
    days: tuple[int, ...] = Field(min_length=1)
    provider: dict[str, tuple[int, ...]] = {}
    # Where mail goes once every member that could take it is at its cap; none: the pool's other members.
    overflow_pool: str | None = None

    @field_validator("days")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 0 for n in v):
            raise ValueError("a day's cap cannot be negative")
        return v


MemberKind = Literal["relay", "source"]
# Outbound STARTTLS toward a member (RFC 3207), in the spirit of Postfix's smtp_tls_security_level:
# opportunistic = "may", required = "encrypt", verify = "secure" (certificate and name checked).
MemberTls = Literal["none", "opportunistic", "required", "verify"]


class MemberSettings(_Frozen):
    name: str = Field(min_length=1)
    # relay: hand mail to the SMTP server at `address`; source: deliver straight to each domain's MX,
    # connecting from the local `source_address`.
    kind: MemberKind = "relay"
    address: HostPort | None = None
    source_address: str | None = None
    # The EHLO name this member gives (a source IP's name should match its PTR record); else [delivery]'s.
    ehlo_hostname: Hostname | None = None
    weight: int = Field(default=1, ge=0, le=10_000)
    max_connections: int = Field(default=10, gt=0)
    max_messages_per_connection: int | None = Field(default=None, gt=0)
    backup: StrictBool = False
    priority: int = Field(default=0, ge=0)
    warmup: WarmupSettings | None = None
    # Unset: "opportunistic", or "required" for a member with credentials (never AUTH in clear).
    tls: MemberTls | None = None
    # "verify": trust only the CAs in this PEM file instead of the system's.
    tls_ca_file: str | None = None
    # "verify": the name the certificate must carry, when it is not the relay's host (an IP, say).
    tls_server_name: str | None = Field(default=None, min_length=1)
    # SMTP AUTH (RFC 4954) toward a relay that wants it.
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None  # SecretStr: never shown in a repr, a log or a dump

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"{v!r} is not a readable file")
        return v

    @field_validator("source_address")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _kind(self) -> MemberSettings:
        if self.kind == "relay" and self.address is None:
            raise ValueError("a relay member needs an address (host:port)")
        if self.kind == "source" and self.source_address is None:
            raise ValueError("a source member needs a source_address (a local IP to send from)")
        if self.kind == "source" and self.address is not None:
            raise ValueError("a source member delivers to each domain's MX: it takes no address")
        self._check_tls()
        return self

    def _check_tls(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and self.kind == "source":
            raise ValueError("a source member delivers to MX hosts, which take no AUTH: no username")
        if self.username is not None and self.tls == "opportunistic":
            # RFC 4954 4: a password must not cross the network in clear; opportunistic TLS may not happen.
            raise ValueError(
                'a member with a username needs tls = "required" or "verify" (or "none" to send the '
                "password in clear on a private network)"
            )
        if self.tls != "verify" and (self.tls_ca_file is not None or self.tls_server_name is not None):
            raise ValueError('tls_ca_file and tls_server_name apply only with tls = "verify"')
        if self.kind == "source" and self.tls_server_name is not None:
            raise ValueError("a source member checks each MX host's own name: no tls_server_name")

    @property
    def tls_mode(self) -> MemberTls:
        """The effective mode: opportunistic unless set, required when a password must be protected."""
        if self.tls is not None:
            return self.tls
        return "required" if self.username is not None else "opportunistic"

    @property
    def target(self) -> str:
        """Where this member sends: its relay's host:port, or 'MX from <source address>'."""
        return self.address or f"MX from {self.source_address}"

    @property
    def host(self) -> str:
        return split_hostport(self.address or "")[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address or "")[1]


PolicyName = Literal["round_robin", "weighted", "least_connections", "least_latency", "hash", "priority"]
HashKey = Literal["sender_domain", "recipient_domain", "client_ip"]


class HealthSettings(_Frozen):
    """Passive health: outlier ejection from real traffic, on Envoy's model."""

    # Local failures in a row (refused, timeout, reset, dropped): the member is unreachable or broken.
    consecutive_failures: int = Field(default=5, gt=0)
    # Attempts in a row answered only with 4xx (421, 451 to everything): up, but not taking mail.
    consecutive_4xx: int = Field(default=10, gt=0)
    # Success-rate rule (Envoy's success_rate outlier detection): every `success_rate_interval`, members
    # with at least `success_rate_min_attempts` attempts in that interval whose success rate is below
    # mean - stdev_factor x stdev of the pool's rates are ejected. Needs `success_rate_min_members`.
    success_rate_interval: Duration = 10.0
    success_rate_min_attempts: int = Field(default=50, gt=0)
    # Envoy's default: with fewer members one outlier cannot fall 1.9 stdev below the mean (at most
    # sqrt(n - 1) stdev), so the rule could never fire.
    success_rate_min_members: int = Field(default=5, gt=1)
    success_rate_stdev_factor: float = Field(default=1.9, gt=0)
    # At most this share of a pool's members is ejected at once (at least one may always be).
    max_ejection_percent: float = Field(default=50.0, ge=0.0, le=100.0)
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    # Below this share of usable members, every member is used: better some failed attempts than
    # piling all mail on the last one standing because of a burst of false ejections.
    panic_threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class CheckSettings(_Frozen):
    """Active health checks, in HAProxy's `check inter rise fall timeout` words: connect, EHLO, NOOP, QUIT."""

    enabled: StrictBool = False
    interval: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 5.0
    timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 2.0
    rise: int = Field(default=2, gt=0)  # passes in a row to bring a member back
    fall: int = Field(default=3, gt=0)  # failures in a row to take it out


class PoolSettings(_Frozen):
    name: str = Field(min_length=1)
    policy: PolicyName = "round_robin"
    hash_key: HashKey = "sender_domain"
    # Consistent hashing with bounded load: no member takes more than this times the mean load.
    hash_balance_factor: float = Field(default=1.25, ge=1.0)
    members: tuple[MemberSettings, ...] = Field(min_length=1)
    health: HealthSettings = HealthSettings()
    check: CheckSettings = CheckSettings()
    # A member that comes back (or is added) ramps its weight and connections up over this time.
    slow_start: Duration = 0.0
    # least_latency: how fast the latency average forgets (Finagle's peak EWMA decay time).
    latency_decay: Duration = 10.0

    @model_validator(mode="after")
    def _unique_members(self) -> PoolSettings:
        seen: set[str] = set()
        for m in self.members:
            if m.name in seen:
                raise ValueError(f"member name {m.name!r} appears twice")
            seen.add(m.name)
        if not any(m.weight > 0 for m in self.members):
            raise ValueError("at least one member needs a weight above 0")
        if len({m.kind for m in self.members}) > 1:
            # A relay and a source IP reach different places for the same mail; one pool, one kind.
            raise ValueError("a pool's members are all relays or all sources, not both")
        return self

    @property
    def kind(self) -> MemberKind:
        return self.members[0].kind


class RouteMatch(_Frozen):
    sender_domain: str | None = None
    recipient_domain: str | None = None
    client_network: str | None = None
    # The value of the message's X-Postmux-Pool header (which postmux removes before delivery).
    pool_header: str | None = None
    # The user the client authenticated as (SMTP AUTH); unauthenticated mail never matches.
    auth_user: str | None = None

    @field_validator("client_network")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError as e:
                raise ValueError(f"{v!r} is not a network: {e}") from None
        return v

    @model_validator(mode="after")
    def _something(self) -> RouteMatch:
        if not (
            self.sender_domain
            or self.recipient_domain
            or self.client_network
            or self.pool_header
            or self.auth_user
        ):
            raise ValueError(
                "a route needs at least one of sender_domain, recipient_domain, client_network, "
                "pool_header, auth_user"
            )
        return self


class RouteSettings(_Frozen):
    match: RouteMatch
    pool: str


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
    overrides: dict[str, tuple[HostPort, ...]] = {}

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


class Settings(_Frozen):
    smtp: SmtpSettings = SmtpSettings()
    http: HttpSettings = HttpSettings()
    spool: SpoolSettings = SpoolSettings()
    retry: RetrySettings = RetrySettings()
    delivery: DeliverySettings = DeliverySettings()
    events: EventSettings = EventSettings()
    pool: tuple[PoolSettings, ...] = Field(min_length=1)
    route: tuple[RouteSettings, ...] = ()
    dns: DnsSettings = DnsSettings()
    shaping: ShapingSettings = ShapingSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = reference_problems(self.pool, self.route, self.shaping)
        if problems:
            # Not a ValueError: pydantic would fold every problem into one nameless error. This one
            # passes through, and settings_from_dict reports each problem under its own key.
            raise ReferenceProblems(problems)
        return self

    @property
    def ehlo_hostname(self) -> str:
        """The name postmux gives itself toward members: [delivery] ehlo_hostname, else [smtp] hostname."""
        return self.delivery.ehlo_hostname or self.smtp.hostname

    @property
    def default_pool(self) -> str:
        return "default" if any(p.name == "default" for p in self.pool) else self.pool[0].name

    def pool_named(self, name: str) -> PoolSettings:
        for p in self.pool:
            if p.name == name:
                return p
        raise KeyError(name)


class ReferenceProblems(Exception):
    """Names in the file that point at nothing: (key, reason) pairs, every one of them."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {r}" for k, r in problems))
        self.problems = problems


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def reference_problems(
    pools: Sequence[PoolSettings], routes: Sequence[RouteSettings], shaping: ShapingSettings
) -> list[tuple[str, str]]:
    """Every name that points at no pool, member or provider, as (key, reason); pure, all at once.

    A rule naming a misspelt member or provider is valid on its own and silently applies to nothing,
    which shows only when the mail it was written for goes out unshaped: so it is refused here.
    """
    names = [p.name for p in pools]
    problems: list[tuple[str, str]] = []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(("pool", f"pool names must be unique; repeated: {', '.join(dupes)}"))
    if len(pools) > 1 and "default" not in names:
        problems.append(
            ("pool", "with several pools, one must be named 'default' to take mail no route matches")
        )
    for i, r in enumerate(routes):
        if r.pool not in names:
            problems.append((f"route[{i}].pool", f"no pool named {r.pool!r}{_suggest(r.pool, names)}"))
    providers = _provider_domains(shaping)
    for i, p in enumerate(pools):
        for j, m in enumerate(p.members):
            if m.warmup is not None:
                problems += _warmup_problems(
                    f"pool[{i}].members[{j}].warmup", m.warmup, p.name, names, providers
                )
    problems += _rule_problems(shaping, {p.name: [m.name for m in p.members] for p in pools}, providers)
    for i, reaction in enumerate(shaping.reaction):
        key = f"shaping.reaction[{i}].destination"
        problems += _destination_problems(key, reaction.destination, providers)
    return problems


def _rule_problems(
    shaping: ShapingSettings, members: dict[str, list[str]], providers: dict[str, str | None]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names = list(members)
    everyone = [m for pool in members.values() for m in pool]
    for i, rule in enumerate(shaping.rule):
        key = f"shaping.rule[{i}]"
        if rule.pool is not None and rule.pool not in names:
            problems.append((f"{key}.pool", f"no pool named {rule.pool!r}{_suggest(rule.pool, names)}"))
        if rule.member is not None:
            scope = members.get(rule.pool, []) if rule.pool is not None else everyone
            if rule.member not in scope:
                where = f" in pool {rule.pool!r}" if rule.pool is not None else ""
                problems.append(
                    (f"{key}.member", f"no member named {rule.member!r}{where}{_suggest(rule.member, scope)}")
                )
        problems += _destination_problems(f"{key}.destination", rule.destination, providers)
    return problems


def _warmup_problems(
    key: str, warmup: WarmupSettings, pool: str, names: list[str], providers: dict[str, str | None]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    overflow = warmup.overflow_pool
    if overflow is not None and (overflow not in names or overflow == pool):
        others = [n for n in names if n != pool]
        problems.append(
            (f"{key}.overflow_pool", f"no other pool named {overflow!r}{_suggest(overflow, others)}")
        )
    for provider in warmup.provider:
        problems += _destination_problems(f"{key}.provider.{provider}", provider, providers)
    return problems


def _provider_domains(shaping: ShapingSettings) -> dict[str, str | None]:
    """Provider names (-> None) and the domains a provider claims (-> its name), as the shaper sees them."""
    table = {p.name: p for p in DEFAULT_PROVIDERS} if shaping.default_providers else {}
    table.update({p.name: p for p in shaping.provider})
    known: dict[str, str | None] = {d.lower().rstrip("."): p.name for p in table.values() for d in p.domains}
    known.update(dict.fromkeys(table))
    return known


def _destination_problems(key: str, value: str, providers: dict[str, str | None]) -> list[tuple[str, str]]:
    """A destination is '*', a provider's name, or a domain; it must be one a lane can carry.

    Lanes are named by provider, else by the lower-case domain (scheduling/providers.py), so a bare word
    that names no provider, a domain a provider claims, or a domain in capitals would match no lane.
    """
    if value == "*" or (value in providers and providers[value] is None):
        return []
    if "." not in value:
        names = [n for n, owner in providers.items() if owner is None]
        return [(key, f"no provider named {value!r} (a domain has a dot){_suggest(value, names)}")]
    clean = value.lower().rstrip(".")
    owner = providers.get(clean)
    if owner is not None:
        return [(key, f"{value!r} is shaped as provider {owner!r}: name the provider instead")]
    if clean != value:
        return [(key, f"write the domain as {clean!r}: destinations are lower case, without a final dot")]
    return []


def http_notes(http: HttpSettings) -> list[tuple[str, str]]:
    """What the HTTP listener exposes, as (level, words) for check-config and serve's start log."""
    host, _ = split_hostport(http.listen)
    admin = (
        "on (bearer token [http] admin_token)"
        if http.admin_token
        else "off (set [http] admin_token to turn it on)"
    )
    notes = [("note", f"[http] listen {http.listen}: metrics and health; admin API {admin}")]
    if not _loopback(host):
        exposed = "metrics, health and the admin API" if http.admin_token else "metrics and health"
        notes.append(
            (
                "warning",
                f"[http] listen {http.listen} is not a loopback address: {exposed} are open to the network",
            )
        )
    return notes


def _loopback(host: str) -> bool:
    """Whether a listen host is this machine only; a name other than localhost is not trusted to be."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """A configuration file that cannot be used; `problems` lists (key, reason) pairs."""

    def __init__(self, path: str, problems: Sequence[tuple[str, str]]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"{self.path}: {key}: {reason}" for key, reason in self.problems)


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def settings_from_dict(data: dict[str, Any], path: str = "<config>") -> Settings:
    """Every problem at once: the keys pydantic refuses, and names that point at nothing."""
    try:
        return Settings.model_validate(data)
    except ReferenceProblems as e:
        raise ConfigError(path, e.problems) from None
    except ValidationError as e:
        problems = _field_problems(e) + _references_of_valid_sections(data)
        raise ConfigError(path, problems) from None


def _field_problems(e: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    errors = e.errors(include_url=False)
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "(" in p))
        # pydantic adds "too short" for a list whose items all failed; the item errors say it better.
        if err["type"] == "too_short" and any(
            len(o["loc"]) > len(err["loc"]) and o["loc"][: len(err["loc"])] == err["loc"] for o in errors
        ):
            continue
        problems.append((_key(loc), err["msg"].removeprefix("Value error, ")))
    return problems


def _references_of_valid_sections(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Names to check even when another section failed, so one run reports both kinds of problem.

    Only when the sections that hold and take the names are valid themselves; else their own errors say
    what to fix first.
    """
    if not isinstance(data, dict) or "pool" not in data:
        return []
    try:
        pools = TypeAdapter(tuple[PoolSettings, ...]).validate_python(data["pool"])
        routes = TypeAdapter(tuple[RouteSettings, ...]).validate_python(data.get("route", ()))
        shaping = ShapingSettings.model_validate(data.get("shaping", {}))
    except ValidationError:
        return []
    return reference_problems(pools, routes, shaping)


def load_config(path: str | Path) -> Settings:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [("(file)", e.strerror or str(e))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), [("(file)", f"not UTF-8: {e}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [("(syntax)", str(e))]) from None
    return settings_from_dict(data, str(p))
