"""TOML configuration: loaded once with tomllib, validated by pydantic, frozen, passed down.

Every error names the file, the key and the reason, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from postmux.config.references import (
    ReferenceProblems,
    api_key_problems,
    http_notes,
    reference_problems,
    unsubscribe_problems,
    zone_notes,
)
from postmux.config.reputation import (
    BlocklistSettings,
    BlocklistZone,
    BounceSettings,
    BreakerSettings,
    SuppressedAction,
    SuppressionSettings,
    VerpSettings,
)
from postmux.config.sections import (
    ApiKey,
    ApiSettings,
    CheckSettings,
    DeliverySettings,
    DkimSelectorSettings,
    DkimSettings,
    DmarcSettings,
    EventSettings,
    HashKey,
    HealthSettings,
    HttpSettings,
    MemberKind,
    MemberSettings,
    MemberTls,
    NodeSettings,
    PolicyName,
    PoolSettings,
    RetrySettings,
    RouteMatch,
    RouteSettings,
    ShutdownSettings,
    SmtpSettings,
    SmtpTlsSettings,
    SmtpUser,
    SpoolSettings,
    UnsubscribeSettings,
    WarmupSettings,
    WebhookSettings,
    Zone,
    ZoneRoutingSettings,
    dkim_problems,
    sqlite_path_of,
)
from postmux.config.shaping import (
    DEFAULT_PROVIDERS,
    DnsSettings,
    ProviderSettings,
    ReactionAction,
    ReactionRule,
    ShapingRule,
    ShapingSettings,
    SpfSettings,
    ThrottlesSettings,
)
from postmux.config.values import (
    Duration,
    Hostname,
    HostPort,
    PositiveDuration,
    Rate,
    _Frozen,
    parse_duration,
    parse_rate,
    repeated,
    split_hostport,
)


class Settings(_Frozen):
    node: NodeSettings = NodeSettings()
    smtp: SmtpSettings = SmtpSettings()
    http: HttpSettings = HttpSettings()
    spool: SpoolSettings = SpoolSettings()
    retry: RetrySettings = RetrySettings()
    delivery: DeliverySettings = DeliverySettings()
    events: EventSettings = EventSettings()
    pool: tuple[PoolSettings, ...] = Field(min_length=1)
    route: tuple[RouteSettings, ...] = ()
    dns: DnsSettings = DnsSettings()
    spf: SpfSettings = SpfSettings()
    blocklists: BlocklistSettings = BlocklistSettings()
    breaker: BreakerSettings = BreakerSettings()
    verp: VerpSettings = VerpSettings()
    shaping: ShapingSettings = ShapingSettings()
    throttles: ThrottlesSettings = ThrottlesSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    api: ApiSettings = ApiSettings()
    api_key: tuple[ApiKey, ...] = ()
    webhook: tuple[WebhookSettings, ...] = ()
    dkim: tuple[DkimSettings, ...] = ()
    bounces: BounceSettings = BounceSettings()
    suppression: SuppressionSettings = SuppressionSettings()
    dmarc: DmarcSettings = DmarcSettings()
    unsubscribe: UnsubscribeSettings | None = None

    @field_validator("dkim")
    @classmethod
    def _dkim_entries(cls, v: tuple[DkimSettings, ...]) -> tuple[DkimSettings, ...]:
        problem = dkim_problems(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("webhook")
    @classmethod
    def _unique_webhooks(cls, v: tuple[WebhookSettings, ...]) -> tuple[WebhookSettings, ...]:
        # Each endpoint's backlog is kept under its name: two with one name would share one.
        if dupes := repeated([w.name for w in v]):
            raise ValueError(f"webhook names must be unique; repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = (
            reference_problems(self.pool, self.route, self.shaping)
            + api_key_problems(self.pool, self.api_key)
            + unsubscribe_problems(self.pool, self.unsubscribe)
        )
        names = {p.name for p in self.pool}
        problems += [
            (f"verp.pools[{i}]", f"no pool named {name!r}")
            for i, name in enumerate(self.verp.pools)
            if name not in names
        ]
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
        # "utf-8-sig": an editor's byte-order mark is no character of the file (tomllib took it for one,
        # and said only "invalid statement" at line 1).
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), [("(file)", f"not UTF-8: {e}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [("(syntax)", str(e))]) from None
    except RecursionError:  # tables or arrays nested thousands deep: a traceback before
        raise ConfigError(str(p), [("(syntax)", "nested too deeply to read")]) from None
    return settings_from_dict(data, str(p))


__all__ = [
    "DEFAULT_PROVIDERS",
    "ApiKey",
    "ApiSettings",
    "BlocklistSettings",
    "BlocklistZone",
    "BounceSettings",
    "BreakerSettings",
    "CheckSettings",
    "ConfigError",
    "DeliverySettings",
    "DkimSelectorSettings",
    "DkimSettings",
    "DmarcSettings",
    "DnsSettings",
    "Duration",
    "EventSettings",
    "HashKey",
    "HealthSettings",
    "HostPort",
    "Hostname",
    "HttpSettings",
    "MemberKind",
    "MemberSettings",
    "MemberTls",
    "NodeSettings",
    "PolicyName",
    "PoolSettings",
    "PositiveDuration",
    "ProviderSettings",
    "Rate",
    "ReactionAction",
    "ReactionRule",
    "ReferenceProblems",
    "RetrySettings",
    "RouteMatch",
    "RouteSettings",
    "Settings",
    "ShapingRule",
    "ShapingSettings",
    "ShutdownSettings",
    "SmtpSettings",
    "SmtpTlsSettings",
    "SmtpUser",
    "SpfSettings",
    "SpoolSettings",
    "SuppressedAction",
    "SuppressionSettings",
    "ThrottlesSettings",
    "UnsubscribeSettings",
    "VerpSettings",
    "WarmupSettings",
    "WebhookSettings",
    "Zone",
    "ZoneRoutingSettings",
    "http_notes",
    "load_config",
    "parse_duration",
    "parse_rate",
    "reference_problems",
    "settings_from_dict",
    "split_hostport",
    "sqlite_path_of",
    "zone_notes",
]
