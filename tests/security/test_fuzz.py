"""Fuzzing the SMTP session: random command sequences and byte soup against a real postmux.

Whatever arrives, the server stays up, every reply is a well-formed SMTP reply without a Python traceback or
exception text in it, and a message is accepted (reaches the spool) only at the 250 that ends a complete
transaction: one accept per "queued as" reply, each with a sender, recipients and clean line ends.
"""

from __future__ import annotations

import asyncio
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmux.envelope import Envelope
from postmux.ingress.hygiene import data_refusal
from tests.security.conftest import StartGateway

COMMANDS = [
    b"EHLO fuzz.test",
    b"HELO fuzz.test",
    b"MAIL FROM:<a@example.com>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@example.com> SIZE=100",
    b"RCPT TO:<u@dest.test>",
    b"RCPT TO:<v%w@dest.test>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY u",
    b"AUTH PLAIN AGEAYg==",
    b"STARTTLS",
    b"HELP",
    b".",
    b"Subject: x",
    b"",
]
# A whole transaction up to DATA, so that examples reach the accept path, not only the error paths.
TRANSACTION = b"EHLO fuzz.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<u@dest.test>\r\nDATA\r\n"
chunk = st.one_of(
    st.just(TRANSACTION),
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.sampled_from(COMMANDS).flatmap(
        lambda c: st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\x00\r\n"]).map(c.__add__)
    ),
    st.binary(max_size=120),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass") + b"\r\n"),
)
REPLY = re.compile(r"^\d{3}([ -].*)?$")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9a-f]+)$")


async def converse(port: int, data: bytes) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines: list[str] = []
    try:
        writer.write(data + b"\r\n.\r\nQUIT\r\n")
        await writer.drain()
        while True:
            raw = await asyncio.wait_for(reader.readline(), 3)
            if not raw:
                break
            lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        writer.close()
    return lines


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=st.lists(chunk, max_size=25))
async def test_random_sessions_never_crash_leak_or_queue_without_a_transaction(
    gateway: StartGateway, chunks: list[bytes]
) -> None:
    # One postmux for every example (hypothesis calls this body many times with the same fixture).
    app = getattr(gateway, "app", None)
    if app is None:
        app = await gateway(timeout=1, max_errors=50)
        gateway.app = app  # type: ignore[attr-defined]
    accepted: list[tuple[str, Envelope]] = []
    accept = app.acceptor.accept

    async def spy(envelope: Envelope) -> str:
        queue_id = await accept(envelope)
        accepted.append((queue_id, envelope))
        return queue_id

    app.acceptor.accept = spy  # type: ignore[method-assign]
    try:
        lines = await converse(app.smtp_port, b"".join(chunks))
    finally:
        app.acceptor.accept = accept  # type: ignore[method-assign]
    assert lines and lines[0].startswith("220 "), lines
    for line in lines:
        assert REPLY.match(line), line
        assert "Traceback" not in line and "Error: (" not in line, line
    queued = [m.group(1) for line in lines if (m := QUEUED.match(line))]
    assert sorted(queued) == sorted(qid for qid, _ in accepted)
    for _, envelope in accepted:
        assert envelope.recipients and all("@" in r and "%" not in r for r in envelope.recipients)
        assert data_refusal(envelope.data, normalize=False) is None
