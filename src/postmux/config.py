"""TOML configuration: loaded once with tomllib, validated by pydantic, frozen, passed down.

Every error names the file, the key and the reason, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
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


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SmtpSettings(_Frozen):
    listen: str = "127.0.0.1:2525"
    hostname: str = "postmux.localdomain"
    max_message_size: int = Field(default=26_214_400, gt=0)
    max_recipients: int = Field(default=1000, gt=0)
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    timeout: Duration = 300.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_hostport(v)
        return v

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


class HttpSettings(_Frozen):
    listen: str = "127.0.0.1:8025"
    # Bearer token for the admin API (/api/v1/...); without one the admin API refuses every call.
    admin_token: str | None = Field(default=None, min_length=16)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_hostport(v)
        return v


class SpoolSettings(_Frozen):
    path: str = "var/spool.db"
    # Many concurrent accepts share one fsync. Off means one fsync per message (for measuring only).
    group_commit: bool = True
    max_batch: int = Field(default=1000, gt=0)


class RetrySettings(_Frozen):
    intervals: tuple[Duration, ...] = (60.0, 300.0, 900.0, 3600.0)
    max_age: Duration = 5 * 86400.0
    # Each wait is spread by +-jitter so a burst of deferrals does not come back as one burst.
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)

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
    ehlo_hostname: str | None = None


class EventSettings(_Frozen):
    log: str = "var/events.jsonl"


class MemberSettings(_Frozen):
    name: str = Field(min_length=1)
    address: str
    weight: int = Field(default=1, ge=0, le=10_000)
    max_connections: int = Field(default=10, gt=0)
    max_messages_per_connection: int | None = Field(default=None, gt=0)
    backup: bool = False
    priority: int = Field(default=0, ge=0)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        split_hostport(v)
        return v

    @property
    def host(self) -> str:
        return split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address)[1]


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

    enabled: bool = False
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
        return self


class RouteMatch(_Frozen):
    sender_domain: str | None = None
    recipient_domain: str | None = None
    client_network: str | None = None
    # The value of the message's X-Postmux-Pool header (which postmux removes before delivery).
    pool_header: str | None = None

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
        if not (self.sender_domain or self.recipient_domain or self.client_network or self.pool_header):
            raise ValueError(
                "a route needs at least one of sender_domain, recipient_domain, client_network, pool_header"
            )
        return self


class RouteSettings(_Frozen):
    match: RouteMatch
    pool: str


class Settings(_Frozen):
    smtp: SmtpSettings = SmtpSettings()
    http: HttpSettings = HttpSettings()
    spool: SpoolSettings = SpoolSettings()
    retry: RetrySettings = RetrySettings()
    delivery: DeliverySettings = DeliverySettings()
    events: EventSettings = EventSettings()
    pool: tuple[PoolSettings, ...] = Field(min_length=1)
    route: tuple[RouteSettings, ...] = ()

    @model_validator(mode="after")
    def _pools(self) -> Settings:
        names = [p.name for p in self.pool]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        for i, r in enumerate(self.route):
            if r.pool not in names:
                raise ValueError(f"route[{i}].pool: no pool named {r.pool!r}")
        if len(self.pool) > 1 and "default" not in names:
            raise ValueError("with several pools, one must be named 'default' to take mail no route matches")
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
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
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
        raise ConfigError(path, problems) from None


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
