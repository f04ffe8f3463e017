"""Names in the file that must point at something: members, pools, providers, destinations."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Sequence

from postmux.config.sections import (
    ApiKey,
    HttpSettings,
    PoolSettings,
    RouteSettings,
    UnsubscribeSettings,
    WarmupSettings,
)
from postmux.config.shaping import (
    DEFAULT_PROVIDERS,
    ShapingSettings,
)
from postmux.config.values import (
    repeated,
    split_hostport,
)


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
    if dupes := repeated(names):
        problems.append(("pool", f"pool names must be unique; repeated: {dupes}"))
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


def api_key_problems(pools: Sequence[PoolSettings], keys: Sequence[ApiKey]) -> list[tuple[str, str]]:
    """API keys with a name already taken, or naming a pool there is not."""
    names = [p.name for p in pools]
    problems: list[tuple[str, str]] = []
    if dupes := repeated([k.name for k in keys]):
        problems.append(("api_key", f"API key names must be unique; repeated: {dupes}"))
    for i, key in enumerate(keys):
        for j, pool in enumerate(key.pools):
            if pool not in names:
                problems.append(
                    (f"api_key[{i}].pools[{j}]", f"no pool named {pool!r}{_suggest(pool, names)}")
                )
    return problems


def unsubscribe_problems(
    pools: Sequence[PoolSettings], unsubscribe: UnsubscribeSettings | None
) -> list[tuple[str, str]]:
    """[unsubscribe] pools that name no pool, or an opt-in that names nothing (the table would do nothing)."""
    if unsubscribe is None:
        return []
    names = [p.name for p in pools]
    problems = [
        (f"unsubscribe.pools[{i}]", f"no pool named {pool!r}{_suggest(pool, names)}")
        for i, pool in enumerate(unsubscribe.pools)
        if pool not in names
    ]
    if not unsubscribe.pools and not unsubscribe.sender_domains:
        problems.append(("unsubscribe", "name the pools or sender_domains whose mail gets the fields"))
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
