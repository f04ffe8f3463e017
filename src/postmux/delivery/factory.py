"""Member transports, built by an injected factory: SMTP by default, in memory for tests and benches.

httpx's model: a client takes its transport, so a test hands in a MockTransport. Here the node takes a
TransportFactory and builds one transport per pool member through it, at start and at every reload alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Protocol

from postmux.config import DeliverySettings, MemberSettings
from postmux.delivery.mx import MxResolver
from postmux.delivery.smtp_client import SmtpTransport
from postmux.delivery.transport import MemberTransport

MemberKey = tuple[str, str]  # (pool, member)


class TransportFactory(Protocol):
    """Builds the transport of one member. Cheap: nothing connects before the first attempt.

    `resolver` is given to source members (they look up each domain's MX), None to relay members.
    """

    def __call__(
        self,
        member: MemberSettings,
        delivery: DeliverySettings,
        ehlo_hostname: str,
        resolver: MxResolver | None,
    ) -> MemberTransport: ...


def smtp_transport(
    member: MemberSettings, delivery: DeliverySettings, ehlo_hostname: str, resolver: MxResolver | None
) -> MemberTransport:
    """The default factory: SMTP over reused connections (delivery/smtp_client.py)."""
    return SmtpTransport(member, delivery, ehlo_hostname, resolver)


def connection_settings(member: MemberSettings, delivery: DeliverySettings, ehlo_hostname: str) -> Hashable:
    """What an open connection was made with: same place, per-connection limit, timeouts, TLS, login.

    Weight, connection counts and shaping are read from the member at each pick, never from a connection.
    """
    return (
        member.address,
        member.source_address,
        member.ehlo_hostname,
        member.max_messages_per_connection,
        # TLS and credentials are settled when a connection opens: a change needs new connections.
        member.tls_mode,
        member.tls_ca_file,
        member.tls_server_name,
        member.username,
        member.password,
        delivery,
        ehlo_hostname,
    )


class MemberTransports(dict[MemberKey, MemberTransport]):
    """One transport per pool member, by (pool, member); the dispatcher reads it as a mapping.

    `reconfigure` is the one build path, at start and at each reload: a member's transport is kept while
    its open connections still fit its settings, and built anew through the factory when they do not.
    """

    def __init__(self, factory: TransportFactory, resolver: MxResolver) -> None:
        super().__init__()
        self.factory = factory
        self.resolver = resolver
        self._made_with: dict[MemberKey, Hashable] = {}

    def reconfigure(
        self,
        members: Iterable[tuple[str, MemberSettings]],
        delivery: DeliverySettings,
        ehlo_hostname: str,
    ) -> list[MemberTransport]:
        """Build what is missing or no longer fits; returns the transports replaced, for the caller to
        retire (their connections end after the attempts in flight)."""
        replaced: list[MemberTransport] = []
        for pool, member in members:
            key = (pool, member.name)
            made_with = connection_settings(member, delivery, ehlo_hostname)
            old = self.get(key)
            if old is not None and self._made_with.get(key) == made_with:
                continue
            resolver = self.resolver if member.kind == "source" else None
            self[key] = self.factory(member, delivery, ehlo_hostname, resolver)
            self._made_with[key] = made_with
            if old is not None:
                replaced.append(old)
        return replaced
