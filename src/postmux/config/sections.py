"""The tables of the configuration file, and Settings, the whole file: frozen once loaded."""

from __future__ import annotations

import ipaddress
import re
import ssl
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from postmux.address import Malformed, parse_path
from postmux.config.values import (
    Duration,
    Hostname,
    HostPort,
    PositiveDuration,
    Rate,
    _Frozen,
    parse_duration,
    repeated,
    split_hostport,
)
from postmux.dkim import (
    DEFAULT_HEADERS,
    DEFAULT_OVERSIGN,
    NEVER_SIGNED,
    KeyProblem,
    PrivateKey,
    load_private_key,
)


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

    @model_validator(mode="after")
    def _a_certificate_and_its_key(self) -> SmtpTlsSettings:
        # Loaded here as the listener will load them: files that are not PEM, or a key that is not the
        # certificate's, passed check-config, then `serve` refused to start with an OpenSSL code that
        # named neither file ("[SSL] PEM lib").
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(
                f"cert_file {self.cert_file!r} and key_file {self.key_file!r} are not a PEM certificate "
                f"chain and its private key: {e}"
            ) from None
        return self


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
    # A message's text past this many octets goes to a file in the spool's directory as it arrives,
    # instead of staying in memory (ingress/kept.py): memory stays flat for large messages. 0: never.
    spill_bytes: int = Field(default=1_048_576, ge=0)
    # PROXY protocol v1/v2 (HAProxy's) before SMTP on every connection (ingress/proxy.py): the client's
    # address is the one the header names. Only peers in proxy_trusted are heard; the others are closed.
    proxy_protocol: StrictBool = False
    proxy_trusted: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # How long a proxy has to send its header after connecting (HAProxy sends it at once).
    proxy_timeout: PositiveDuration = 5.0
    # Where mail to the bare `<Postmaster>` goes (RFC 5321 4.5.1: a server that relays MUST take it, from
    # anyone): an address with a domain, delivered as any other mail. Unset, `<Postmaster>` is refused.
    postmaster: str | None = None

    @field_validator("postmaster")
    @classmethod
    def _postmaster(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path = parse_path(f"<{v}>")  # the one RFC 5321 parser, as the listener's
        if isinstance(path, Malformed) or path.mailbox is None or not path.mailbox.domain or path.route:
            raise ValueError(f"{v!r} is not an address with a domain (user@example.com)")
        return v

    @field_validator("trusted_networks", "proxy_trusted")
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

    def proxies(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.proxy_trusted]

    @model_validator(mode="after")
    def _proxied(self) -> SmtpSettings:
        if self.proxy_protocol and not self.proxy_trusted:
            raise ValueError("proxy_protocol = true needs the proxies' networks in proxy_trusted")
        return self

    @field_validator("users")
    @classmethod
    def _unique_users(cls, v: tuple[SmtpUser, ...]) -> tuple[SmtpUser, ...]:
        if dupes := repeated([u.name for u in v]):
            raise ValueError(f"user names must be unique; repeated: {dupes}")
        return v


class HttpSettings(_Frozen):
    listen: HostPort = "127.0.0.1:8025"
    # Bearer token for the admin API (/api/v1/...); without one the admin API refuses every call.
    admin_token: str | None = Field(default=None, min_length=16)

    @field_validator("admin_token")
    @classmethod
    def _visible_ascii(cls, v: str | None) -> str | None:
        # It travels in an Authorization header (RFC 6750 2.1): a space ends it, and a character outside
        # ASCII no HTTP client sends; such a token turned the admin API on with no way in (every CLI
        # verb died encoding it).
        if v is not None and not all("!" <= c <= "~" for c in v):
            raise ValueError("only visible ASCII characters (no spaces): it goes in an HTTP header")
        return v


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class ApiSettings(_Frozen):
    """The HTTP submission API (POST /api/v1/messages on the [http] listener; docs/api.md)."""

    # A request body larger than this is refused with 413 before it is read (Content-Length), or as soon
    # as that many octets have arrived (chunked). Base64 attachments take 4/3 of their size in JSON.
    max_request_size: int = Field(default=41_943_040, gt=0)
    # Messages in one request (a batch, or one message's recipients once split by their substitutions).
    max_batch: int = Field(default=1000, gt=0, le=100_000)
    # How long an Idempotency-Key is remembered (per API key): a replay within it gets the first answer.
    idempotency_ttl: PositiveDuration = 86_400.0


class ApiKey(_Frozen):
    """A client of the submission API: its name, the scrypt hash of its key (`postmux passwd`), and what
    it may do: send from these sender domains, by these pools, at this rate of messages."""

    name: str
    hash: str
    # Envelope sender (and From) domains the key may use: "example.com", or "*.example.com" for its
    # subdomains. Empty: any.
    sender_domains: tuple[str, ...] = ()
    # Pools the key may name; the first is used when a request names none. Empty: any pool, and the
    # routes choose when a request names none.
    pools: tuple[str, ...] = ()
    # Messages the key may submit, sustained (GCRA, scheduling/throttles.py); None: no limit.
    rate: Rate | None = None
    # Messages at once before the rate applies; a request of more messages than this is refused (422).
    burst: int = Field(default=1000, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _KEY_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a key name: letters, digits and '_.-', starting with a letter or digit"
            )
        return v

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        from postmux.passwords import parse_hash

        parse_hash(v)
        return v

    @field_validator("sender_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            bare = d.removeprefix("*.")
            if not bare or "@" in bare or any(c.isspace() for c in bare) or bare.startswith("."):
                raise ValueError(f"{d!r} is not a domain such as 'example.com' or '*.example.com'")
        return tuple(d.lower() for d in v)


class SpoolSettings(_Frozen):
    # sqlite: one node, the file at `path`. postgresql: one spool shared by several nodes, in the database
    # `dsn` names (spool/postgres.py); `path` then only places the node's own files (warmup.db,
    # drained.json, the spill directory) beside it.
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str = ""
    # The node's name as the owner of its leases (postgresql). Empty: host:PID, which a restarted node
    # does not share, so its leases are taken over once they run out; a stable name lets it take them back
    # at once.
    node_id: str = ""
    # How long a lease lasts unrenewed (postgresql): a node that dies holds its work this long at most.
    lease_ttl: PositiveDuration = 60.0
    # The longest the spool waits on PostgreSQL for one thing: a connection, a statement's answer, a
    # pooled connection, a turn at the writer. Past it the call fails (an accept gets 451 4.3.0) instead
    # of hanging on a stalled link.
    timeout: PositiveDuration = 10.0
    path: str = "var/spool.db"
    # Where the spool is, as a URL: "sqlite:///PATH" is the same as `path` (and sets it). Empty: `path`.
    url: str = ""
    # Many concurrent accepts share one fsync. Off means one fsync per message (for measuring only).
    group_commit: StrictBool = True
    max_batch: int = Field(default=1000, gt=0)
    # Under load (the last commit answered commit_siblings requests or more), the SQLite writer waits this
    # long for more before it commits, so one fsync answers more accepts (spool/sqlite.py). 0: it never does.
    commit_delay: Duration = Field(default=0.0, ge=0, le=1)
    commit_siblings: int = Field(default=4, gt=0)
    # Texts up to this many octets stay in their row; longer ones go to a segment file written with the
    # group commit (spool/bodies.py; bench/README.md measured the crossover at about 8 KB).
    inline_bytes: int = Field(default=8192, ge=0)

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
                "a PostgreSQL spool is set with backend = 'postgresql' and dsn = 'postgresql://...'"
            )
        path = sqlite_path_of(v)
        if path is None:
            # The value is not echoed: a URL may carry a password.
            raise ValueError("not a spool URL: write 'sqlite:///PATH' (sqlite:////PATH for an absolute path)")
        given = info.data.get("path")
        if given is not None and given != path:
            raise ValueError(f"names the file {path!r} but path names {given!r}: set one of them")
        return v

    @model_validator(mode="after")
    def _postgresql(self) -> SpoolSettings:
        if self.backend == "postgresql":
            scheme = self.dsn.partition(":")[0].lower()
            if scheme not in ("postgresql", "postgres"):
                # The value is not echoed: a DSN may carry a password.
                raise ValueError("backend = 'postgresql' needs dsn = 'postgresql://USER@HOST:PORT/DATABASE'")
        elif self.dsn:
            raise ValueError("dsn is for backend = 'postgresql'; a SQLite spool is `path`")
        return self


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


class WarmupSettings(_Frozen):
    """IP warm-up: day N of the schedule (day 1 is `start`) allows `days[N-1]` messages; after the
    last day the member is warm and has no cap. `provider` gives some providers a schedule of their own."""

    start: date
    days: tuple[int, ...] = Field(min_length=1)
    provider: dict[str, tuple[int, ...]] = {}  # noqa: RUF012 (pydantic copies field defaults)
    # Where mail goes once every member that could take it is at its cap; none: the pool's other members.
    overflow_pool: str | None = None

    @field_validator("days")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 0 for n in v):
            raise ValueError("a day's cap cannot be negative")
        return v


# A zone's name: also a metric label (postmux_member_up{zone}), so short and plain.
Zone = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class NodeSettings(_Frozen):
    """This node's own identity among several sharing a spool and limits (issue 17)."""

    # How the node names itself to the others (leases, heartbeats, events); empty: its host's name.
    name: str = Field(default="", max_length=253)
    # Where the node runs: it prefers pool members of the same zone (balancing/zones.py). Unset: none.
    zone: Zone | None = None


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
    # A relay's own outbound IPs, which receivers see: SPF-aware routing ([spf]) judges the relay by them.
    # A relay without them is not judged; a source member is judged by its source_address.
    sending_ips: tuple[str, ...] = ()
    # Where the member is (a site, a rack, a region): a node prefers members in its own [node] zone
    # (balancing/zones.py). Unset: no zone, so no node prefers it or passes it over.
    zone: Zone | None = None

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

    @field_validator("sending_ips")
    @classmethod
    def _sending_ips(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ip in v:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"{ip!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _kind(self) -> MemberSettings:
        if self.kind == "relay" and self.address is None:
            raise ValueError("a relay member needs an address (host:port)")
        if self.kind == "source" and self.source_address is None:
            raise ValueError("a source member needs a source_address (a local IP to send from)")
        if self.kind == "source" and self.address is not None:
            raise ValueError("a source member delivers to each domain's MX: it takes no address")
        if self.kind == "source" and self.sending_ips:
            raise ValueError("a source member sends from its source_address: no sending_ips")
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
    def spf_ips(self) -> tuple[str, ...]:
        """The IPs receivers see this member's mail come from; empty: not known, so not judged by SPF."""
        if self.kind == "source" and self.source_address is not None:
            return (self.source_address,)
        return self.sending_ips

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


class ZoneRoutingSettings(_Frozen):
    """How a node keeps its mail in its own zone (Envoy's zone aware routing; balancing/zones.py)."""

    enabled: StrictBool = True
    # While at least this share of the local zone's capacity (members' weight, within the tier) is healthy,
    # all mail stays in the zone; below it, the zone keeps healthy / local_threshold of it (each healthy
    # local member takes at most 1 / local_threshold of its usual load) and the rest goes to other zones.
    local_threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    # Below this healthy share, other zones take all of it (a zone that far gone is not trusted).
    local_minimum: float = Field(default=0.0, ge=0.0, le=1.0)
    # When every local member is at its connection cap or its lane is busy, the mail goes to another
    # zone rather than waiting (false: it waits, as for members of one zone).
    spill_when_full: StrictBool = True

    @model_validator(mode="after")
    def _order(self) -> ZoneRoutingSettings:
        if self.local_minimum > self.local_threshold:
            raise ValueError("local_minimum must not be above local_threshold")
        return self


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
    # Below this pool health (the tiers' healthy shares, summed), the tier in use is used whole, healthy
    # or not: better some failed attempts than piling all mail on the last one standing because of a
    # burst of false ejections (Pool._panic_tier says which tier).
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
    zone_routing: ZoneRoutingSettings = ZoneRoutingSettings()

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


# The event types a webhook may ask for (events/types.py EventType, by value), and the default: every
# event about a message. Member and shaping events are the operator's, asked for by name.
WebhookEventName = Literal[
    "Reception",
    "Delivery",
    "TransientFailure",
    "Bounce",
    "Expiration",
    "Held",
    "Complaint",
    "Feedback",
    "Suppressed",
    "Unsubscribe",
    "MemberDown",
    "MemberUp",
    "ShapingChanged",
    "BlocklistChanged",
    "ThrottlesBackendChanged",
]
MESSAGE_EVENT_NAMES: tuple[WebhookEventName, ...] = (
    "Reception",
    "Delivery",
    "TransientFailure",
    "Bounce",
    "Expiration",
    "Held",
    "Suppressed",
    "Unsubscribe",
)
_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def webhook_secret(value: str) -> str:
    """A Standard Webhooks secret: `whsec_` then the base64 of the key, which the spec asks to be 24 to 64
    random bytes. Checked here, because the package's own decoding skips characters it does not know."""
    import base64
    import binascii

    text = value.strip()
    if not text.startswith("whsec_"):
        raise ValueError("a Standard Webhooks secret starts with 'whsec_' (then the base64 of the key)")
    try:
        key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"the key is {len(key)} bytes; Standard Webhooks asks for 24 to 64 random bytes")
    return text


class WebhookSettings(_Frozen):
    """One endpoint that is told of events over HTTP(S), signed as Standard Webhooks (events/webhooks.py)."""

    name: str
    url: str
    events: tuple[WebhookEventName, ...] = MESSAGE_EVENT_NAMES
    # 1: one record per request, as a JSON object; more: up to this many records per request, as an array.
    batch_size: int = Field(default=1, ge=1, le=1000)
    # How long a batch that is not full waits for more records, counted from its oldest record.
    batch_wait: Duration = 0.0
    secret: SecretStr | None = None
    secret_file: str | None = None
    timeout: PositiveDuration = 10.0
    # A failed request is retried after a wait that doubles from min_backoff up to max_backoff, with jitter.
    min_backoff: PositiveDuration = 1.0
    max_backoff: PositiveDuration = 600.0
    _signing_secret: str | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _WEBHOOK_NAME.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a webhook name: 1-64 letters, digits, '_', '.' or '-', starting with a letter"
                " or digit (it is a metric label and a CLI word)"
            )
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 (raises ValueError for a port out of range)
        except ValueError as e:
            raise ValueError(f"not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host is needed")
        if any(c.isspace() for c in v):
            raise ValueError("a URL has no spaces")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one event type is needed (leave the key out for every message event)")
        return v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            webhook_secret(v.get_secret_value())  # the value is never echoed
        return v

    @field_validator("secret_file")
    @classmethod
    def _secret_file(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                webhook_secret(_read_secret_file(v))
            except ValueError as e:
                raise ValueError(f"{v!r} does not hold a usable secret: {e}") from None
        return v

    @model_validator(mode="after")
    def _signing(self) -> WebhookSettings:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff is longer than max_backoff")
        if self.secret is not None:
            self._signing_secret = webhook_secret(self.secret.get_secret_value())
        elif self.secret_file is not None:
            self._signing_secret = webhook_secret(_read_secret_file(self.secret_file))
        return self

    @property
    def signing_secret(self) -> str | None:
        """The `whsec_...` secret requests are signed with (`secret` or `secret_file`); None: unsigned."""
        return self._signing_secret


def _read_secret_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} cannot be read: {e}") from None


# RFC 5322 3.6.8: a field name is printable US-ASCII but ":".
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z", re.ASCII)
# RFC 6376 3.1: a selector is one or more DNS labels.
_SELECTOR = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*\Z"
)


class DkimSelectorSettings(_Frozen):
    """One selector of a signing domain: its name in DNS, its algorithm, and the file of its private key
    (never the key itself here). The key is read when the file is loaded, at start and at each reload."""

    name: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    key_file: str
    _key: PrivateKey | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _selector(cls, v: str) -> str:
        if not _SELECTOR.match(v) or len(v) > 63:
            raise ValueError(f"{v!r} is not a selector (DNS labels, RFC 6376 3.1)")
        return v.lower()

    @model_validator(mode="after")
    def _load(self) -> DkimSelectorSettings:
        try:
            self._key = load_private_key(self.key_file, self.algorithm)
        except KeyProblem as e:
            raise ValueError(f"key_file: {e}") from None
        return self

    @property
    def key(self) -> PrivateKey:
        assert self._key is not None  # set by _load, or the settings were refused
        return self._key


def _field_names(v: tuple[str, ...]) -> tuple[str, ...]:
    for name in v:
        if not _FIELD_NAME.match(name):
            raise ValueError(f"{name!r} is not a header field name")
        if name.lower() in NEVER_SIGNED:
            raise ValueError(f"{name} changes on the way and must not be signed (RFC 6376 5.4)")
    return v


class DkimSettings(_Frozen):
    """A signing domain (d=): mail whose From: domain is it (or, with `subdomains`, below it; or any
    domain without an entry, with `fallback`) is signed once per selector: several selectors, several
    signatures (RSA and Ed25519 side by side, RFC 8463 5)."""

    domain: Hostname
    selectors: tuple[DkimSelectorSettings, ...] = Field(min_length=1)
    subdomains: StrictBool = False
    fallback: StrictBool = False
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN

    @field_validator("domain")
    @classmethod
    def _a_labels(cls, v: str) -> str:
        import idna

        try:
            # d= is written in A-labels (RFC 8616 4).
            return idna.encode(v.rstrip("."), uts46=True).decode("ascii").lower()
        except idna.IDNAError as e:
            raise ValueError(f"{v!r} is not a domain: {e}") from None

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        _field_names(v)
        if "from" not in {h.lower() for h in v}:
            raise ValueError("From must be signed (RFC 6376 5.4)")
        return v

    @field_validator("oversign")
    @classmethod
    def _oversign(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _field_names(v)

    @field_validator("selectors")
    @classmethod
    def _unique_selectors(cls, v: tuple[DkimSelectorSettings, ...]) -> tuple[DkimSelectorSettings, ...]:
        if dupes := repeated([s.name for s in v]):
            raise ValueError(f"selector names must be unique in a domain; repeated: {dupes}")
        return v

    @property
    def keys(self) -> tuple[DkimSelectorSettings, ...]:
        return self.selectors


def dkim_problems(entries: tuple[DkimSettings, ...]) -> str:
    """What is wrong across [[dkim]] entries ("" when nothing): a domain twice, or two fallbacks."""
    if dupes := repeated([d.domain for d in entries]):
        return f"each domain has one entry; repeated: {dupes}"
    fallbacks = [d.domain for d in entries if d.fallback]
    if len(fallbacks) > 1:
        return f"one entry at most is the fallback; these are: {', '.join(fallbacks)}"
    return ""


class DmarcSettings(_Frozen):
    """DMARC alignment at accept (RFC 7489 3.1; postmux.dmarc): whether the From: domain aligns with the
    DKIM signing domain postmux will use, or with the MAIL FROM domain."""

    # off: not looked at; warn: taken, its Reception events tagged dmarc=fail (and the reason);
    # refuse: 550 5.7.26 at the end of DATA, 422 from the HTTP API, nothing stored.
    alignment: Literal["off", "warn", "refuse"] = "off"
    # adkim= and aspf= of RFC 7489 6.3, as the domains publish them (postmux does not read the records
    # at accept: set what your domains publish; relaxed is DMARC's default).
    dkim_mode: Literal["relaxed", "strict"] = "relaxed"
    spf_mode: Literal["relaxed", "strict"] = "relaxed"
    # Whether an aligned MAIL FROM domain counts (the receiver's SPF result depends on the sending IP,
    # unknown at accept; [spf] enabled makes routing use only IPs it permits). false: DKIM alone.
    count_spf: StrictBool = True


class UnsubscribeSettings(_Frozen):
    """One-click unsubscribe (RFC 8058): List-Unsubscribe and List-Unsubscribe-Post added at accept,
    before signing, to mail of the pools or sender domains named here; served at POST /unsubscribe/TOKEN
    on the [http] listener."""

    # The public HTTPS prefix that reaches the [http] listener's /unsubscribe/ (through a reverse proxy):
    # the token is appended. RFC 8058 3.1: an HTTPS URI.
    url: str
    # The HMAC secret that signs tokens, in a file (never in this file): at least 32 random bytes.
    secret_file: str
    # Earlier secrets whose tokens are still honoured after a rotation (mail already sent carries them).
    previous_secret_files: tuple[str, ...] = ()
    # The address for the RFC 2369 mailto URI ("" for none); taking that mail in is not postmux's.
    mailto: str = ""
    # Which mail gets the fields: that of these pools, or whose envelope sender domain is one of these
    # ("example.com", "*.example.com" for its subdomains). Both empty: none (the feature is opt-in).
    pools: tuple[str, ...] = ()
    sender_domains: tuple[str, ...] = ()
    # How long a token is honoured after the mail was accepted; 0: always.
    max_age: Duration = 365 * 86400.0
    _secrets: tuple[bytes, ...] = PrivateAttr(default=())

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
        except ValueError as e:
            raise ValueError(f"not a URL: {e}") from None
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("an https:// URL with a host is needed (RFC 8058 3.1)")
        if not v.isascii() or any(c.isspace() or c in '<>,"' for c in v) or parts.query or parts.fragment:
            raise ValueError("a URL of ASCII without spaces, <>, commas, quotes, query or fragment")
        if len(v) > 200:
            # The token follows it on one line of at most 998 octets (RFC 5322 2.1.1).
            raise ValueError(f"a URL of at most 200 characters (this one has {len(v)})")
        return v if v.endswith("/") else v + "/"

    @field_validator("mailto")
    @classmethod
    def _mailto(cls, v: str) -> str:
        local, at, domain = v.rpartition("@")
        if v and (not at or not local or not domain or not v.isascii() or any(c in v for c in ' <>,?"')):
            raise ValueError(f"{v!r} is not a plain ASCII address such as 'unsubscribe@example.com'")
        return v

    @field_validator("sender_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return ApiKey._domains(v)

    @model_validator(mode="after")
    def _load(self) -> UnsubscribeSettings:
        from postmux.unsubscribe import SecretProblem, load_secret

        secrets = []
        for path in (self.secret_file, *self.previous_secret_files):
            try:
                secrets.append(load_secret(path))
            except SecretProblem as e:
                raise ValueError(f"secret_file: {e}") from None
        self._secrets = tuple(secrets)
        return self

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """The current secret first (new tokens), then the earlier ones (still honoured)."""
        return self._secrets
