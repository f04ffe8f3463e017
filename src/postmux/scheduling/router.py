"""Routes: ordered rules choosing a pool per recipient; first match wins, the default pool takes the rest."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from postmux.config import RouteSettings, Settings


@dataclass(frozen=True, slots=True)
class _Rule:
    pool: str
    sender_domain: str | None
    recipient_domain: str | None
    client_network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    pool_header: str | None
    auth_user: str | None

    def matches(
        self, sender_domain: str, recipient_domain: str, client_ip: str, pool_header: str, auth_user: str
    ) -> bool:
        if self.pool_header is not None and pool_header.lower() != self.pool_header:
            return False
        if self.auth_user is not None and auth_user != self.auth_user:
            return False
        if self.sender_domain is not None and sender_domain != self.sender_domain:
            return False
        if self.recipient_domain is not None and recipient_domain != self.recipient_domain:
            return False
        if self.client_network is not None:
            try:
                if ipaddress.ip_address(client_ip) not in self.client_network:
                    return False
            except ValueError:
                return False
        return True


def _rule(route: RouteSettings) -> _Rule:
    m = route.match
    return _Rule(
        pool=route.pool,
        sender_domain=m.sender_domain.lower() if m.sender_domain else None,
        recipient_domain=m.recipient_domain.lower() if m.recipient_domain else None,
        client_network=ipaddress.ip_network(m.client_network, strict=False) if m.client_network else None,
        pool_header=m.pool_header.lower() if m.pool_header else None,
        auth_user=m.auth_user,
    )


class Router:
    def __init__(self, settings: Settings) -> None:
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """New routes (a reload): whoever holds this router routes by them from the next recipient on."""
        self._rules = [_rule(r) for r in settings.route]
        self.default_pool = settings.default_pool

    def pool_for(
        self,
        sender_domain: str,
        recipient_domain: str,
        client_ip: str = "",
        pool_header: str = "",
        auth_user: str = "",
    ) -> str:
        for rule in self._rules:
            if rule.matches(sender_domain, recipient_domain, client_ip, pool_header, auth_user):
                return rule.pool
        return self.default_pool
