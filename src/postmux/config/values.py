"""Value types of the configuration: durations, rates, host names, addresses; each parsed at load."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)


def repeated(names: Sequence[str]) -> str:
    """The names given more than once, sorted and comma-separated ("" when each is unique): what every
    "must be unique" check of the configuration reports."""
    return ", ".join(sorted({n for n in names if names.count(n) > 1}))


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
    if not math.isfinite(seconds):
        raise ValueError("a duration is a finite number of seconds, not nan or inf")
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
    # TOML has nan and inf: as a duration, a weight or a ratio either is no number of anything, and
    # `retry.intervals = [nan]` left a deferred message leased for ever, never expired (review2/config.md).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


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
