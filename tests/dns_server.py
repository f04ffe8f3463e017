"""A DNS server on loopback (dnslib), so tests exercise dnspython's real resolver path without ever
asking the machine's own resolver anything."""

from __future__ import annotations

from collections import Counter
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: str) -> None:
        self.records = RR.fromZone(zone)
        self.queries: Counter[tuple[str, str]] = Counter()
        self.fail: set[str] = set()  # names answered with SERVFAIL
        self.fail_types: set[tuple[str, str]] = set()  # (name, type) answered with SERVFAIL

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname, qtype = request.q.qname, QTYPE[request.q.qtype]
        self.queries[(str(qname).rstrip("."), qtype)] += 1
        name = str(qname).rstrip(".")
        if name in self.fail or (name, qtype) in self.fail_types:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        named = [rr for rr in self.records if rr.rname == qname]
        if not named:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rr in named:
            if QTYPE[rr.rtype] == qtype:
                reply.add_answer(rr)
        return reply


class LoopbackDns:
    """Serves a zone (master-file text, absolute names) over UDP on 127.0.0.1, on a free port."""

    def __init__(self, zone: str) -> None:
        self.zone = _Zone(zone)
        self._server = DNSServer(self.zone, address="127.0.0.1", port=0, logger=DNSLogger("-request,-reply"))

    @property
    def address(self) -> str:
        host, port = self._server.server.server_address
        return f"{host}:{port}"

    @property
    def queries(self) -> Counter[tuple[str, str]]:
        return self.zone.queries

    def add(self, zone: str) -> None:
        """Publish more records (master-file text) while the server runs."""
        self.zone.records = [*self.zone.records, *RR.fromZone(zone)]

    def remove(self, name: str) -> None:
        """Withdraw every record of `name` (absolute, with or without the final dot): it is NXDOMAIN now."""
        wanted = name.rstrip(".").lower()
        self.zone.records = [rr for rr in self.zone.records if str(rr.rname).rstrip(".").lower() != wanted]

    def __enter__(self) -> LoopbackDns:
        self._server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
        self._server.server.server_close()
