"""Whether a mail server the MX plan names is this node itself: RFC 5321 5.1's loop check.

An MX record that points back at the node (a stale record, a backup MX that names the sending host, a
test that aims mx_port at the listener) would have each message accepted again, counted as delivered, and
sent round until the hop limit bounces it 50 copies later. RFC 5321 5.1 says instead: when the MX list
names the client's own host, discard that MX and every MX of equal or worse preference; when none is
left, that is an error. Postfix words it "mail for DOMAIN loops back to myself" (554 5.4.6, RFC 3463
X.4.6 "routing loop detected").

"Myself" is kept simple, and certain rather than complete: the address and port of the [smtp] listener.
A listener on a wildcard ("0.0.0.0", "::") or on a host name is reached at any of the node's addresses;
the ones postmux knows for certain are its own are loopback (127.0.0.0/8, ::1), the unspecified
addresses (a connection to 0.0.0.0 reaches the local host), and the source members' source addresses
(bound to send from, so on this host). Another interface's address behind an MX record is not seen here;
the greeting check in the SMTP client (a server that greets or answers EHLO with our own [smtp] hostname)
catches that case when the connection is made, as Postfix does. Pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_WILDCARDS = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Myself:
    """How mail would reach this node: its listener's address and port, and the name it greets with."""

    listen: IPAddress | None  # None: a wildcard or a host name, reached at any of the node's addresses
    port: int
    hostname: str  # [smtp] hostname, lower case
    local: frozenset[IPAddress] = frozenset()  # addresses known to be this host's (source addresses)

    @classmethod
    def of(cls, host: str, port: int, hostname: str, local: Iterable[str] = ()) -> Myself:
        """From [smtp] listen's host and the port bound, [smtp] hostname and the source members' addresses."""
        ip = _ip(host)
        own = frozenset(a for a in (_ip(x) for x in local) if a is not None)
        return cls(None if ip is None or ip in _WILDCARDS else ip, port, hostname.lower().rstrip("."), own)

    def listens_at(self, host: str, port: int) -> bool:
        """Whether a connection to (`host`, `port`) would reach this node's own SMTP listener."""
        ip = _ip(host)
        if ip is None or port != self.port:
            return False
        if self.listen is not None:
            return ip == self.listen
        return ip.is_loopback or ip.is_unspecified or ip in self.local

    def is_named(self, name: str) -> bool:
        """Whether `name` (a greeting's or an EHLO reply's first word) is this node's own hostname."""
        return name.lower().rstrip(".") == self.hostname
