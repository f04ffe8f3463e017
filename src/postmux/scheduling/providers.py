"""Providers: destinations grouped by who runs their mail servers, so one set of limits covers them all.

Receivers rate a sender per provider, not per domain: every domain hosted on Google's MX hosts counts
against one budget at Google. So, as KumoMTA groups destinations into sites by MX name, postmux groups
them by MX host suffix (source pools, which look up MX records) or by the provider's own domains (relay
pools, which never look up MX records). A destination no provider claims is shaped on its own.
"""

from __future__ import annotations

from collections.abc import Iterable

# The shipped table lives with the settings it is the default of ([shaping] default_providers), so that
# config can check the names a file uses without importing this module back.
from postmux.config import DEFAULT_PROVIDERS, ShapingSettings


def _clean(name: str) -> str:
    return name.lower().rstrip(".")


class Providers:
    """The provider table: the shipped one (unless turned off), with the config's entries replacing
    shipped ones of the same name and adding new ones."""

    def __init__(self, settings: ShapingSettings) -> None:
        table = {p.name: p for p in DEFAULT_PROVIDERS} if settings.default_providers else {}
        table.update({p.name: p for p in settings.provider})
        self.names = frozenset(table)
        self._by_domain = {_clean(d): p.name for p in table.values() for d in p.domains}
        # Longest suffix first, so a config's "mx.example.com" beats a shipped "example.com".
        self._suffixes = sorted(
            ((_clean(s), p.name) for p in table.values() for s in p.mx_suffixes),
            key=lambda pair: -len(pair[0]),
        )

    def for_domain(self, domain: str) -> str | None:
        return self._by_domain.get(_clean(domain))

    def for_mx(self, hosts: Iterable[str]) -> str | None:
        """The provider running these MX hosts, judged by the first (most preferred) one a suffix claims."""
        for host in hosts:
            host = _clean(host)
            for suffix, name in self._suffixes:
                if host == suffix or host.endswith("." + suffix):
                    return name
        return None

    def destination(self, domain: str, mx_hosts: Iterable[str] = ()) -> str:
        """The shaping key for mail to `domain`: its provider, else the domain itself."""
        return self.for_mx(mx_hosts) or self.for_domain(domain) or _clean(domain)
