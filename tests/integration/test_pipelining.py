"""Delivery pipelines MAIL, RCPT and DATA where the server offers PIPELINING (RFC 2920), against a scripted
server on loopback that records what arrived in each read and answers what the test says.

Each refusal must mean what it means one command at a time, and a server whose replies cannot be paired
with the commands must cost the connection, never a recipient's reply that is not its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import pytest

from postmux.app import App
from postmux.attempt import AttemptOutcome, Breakoff, Recipient, Transaction
from postmux.delivery.smtp_client import SmtpTransport
from postmux.reply import Reply
from tests.support import StartUpstream, make_settings, read_events, send, wait_until

WORK = Transaction(
    sender="app@example.com",
    recipients=(Recipient(1, "a@dest.test"), Recipient(2, "b@dest.test"), Recipient(3, "c@dest.test")),
    data=b"Subject: hi\r\n\r\nhello\r\n",
    domain="dest.test",
)

# What the scripted server answers each command with, by the command's first word (RCPT: by address).
Script = Callable[[bytes], bytes | None]


def standard(command: bytes) -> bytes | None:
    word = command.split(b" ", 1)[0].split(b":", 1)[0].upper()
    return {
        b"MAIL": b"250 2.1.0 ok\r\n",
        b"RCPT": b"250 2.1.5 ok\r\n",
        b"DATA": b"354 go ahead\r\n",
        b"RSET": b"250 2.0.0 reset\r\n",
        b"QUIT": b"221 2.0.0 bye\r\n",
        b"NOOP": b"250 2.0.0 ok\r\n",
    }.get(word)


class Scripted:
    """An SMTP server that offers PIPELINING (unless told not to), answers by `script`, reads a text after
    354 until ".", hangs up after a 421 as RFC 5321 3.8 has a server do, and keeps every read (`reads`),
    every command (`commands`) and how many connections it took (`connections`)."""

    def __init__(self, script: Script, *, pipelining: bool = True) -> None:
        self.script = script
        self.pipelining = pipelining
        self.reads: list[bytes] = []
        self.commands: list[bytes] = []
        self.texts: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted.test ESMTP\r\n")
        buffer = b""
        in_text = False
        try:
            while chunk := await reader.read(65536):
                self.reads.append(chunk)
                buffer += chunk
                replies = b""
                while b"\r\n" in buffer:
                    if in_text:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0 and not buffer.startswith(b".\r\n"):
                            break
                        cut = 3 if buffer.startswith(b".\r\n") else end + 5
                        self.texts.append(buffer[:cut])
                        buffer, in_text = buffer[cut:], False
                        replies += self.script(b".") or b"250 2.0.0 queued\r\n"
                        continue
                    line, buffer = buffer.split(b"\r\n", 1)
                    self.commands.append(line)
                    if line.upper().startswith(b"EHLO"):
                        pipelining = b"250-PIPELINING\r\n" if self.pipelining else b""
                        replies += b"250-scripted.test\r\n" + pipelining + b"250 8BITMIME\r\n"
                        continue
                    reply = self.script(line)
                    if reply is None:
                        return  # hang up
                    replies += reply
                    if reply.startswith(b"421"):
                        writer.write(replies)
                        await writer.drain()
                        return  # closing the channel, as the 421 said
                    in_text = reply.startswith(b"354")
                if replies:
                    writer.write(replies)
                    await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class MakeScripted(Protocol):
    def __call__(self, script: Script, *, pipelining: bool = True) -> Scripted: ...


@pytest.fixture
async def scripted() -> AsyncIterator[MakeScripted]:
    servers: list[Scripted] = []

    def make(script: Script, *, pipelining: bool = True) -> Scripted:
        servers.append(Scripted(script, pipelining=pipelining))
        return servers[-1]

    yield make
    for s in servers:
        await s.stop()


async def attempt(tmp_path: Path, address: str, **delivery: str) -> AttemptOutcome:
    pools = [{"name": "default", "members": [{"name": "up", "address": address}]}]
    settings = make_settings(tmp_path, pools, delivery=delivery)
    transport = SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")
    try:
        return await transport.deliver(WORK)
    finally:
        await transport.close()


def envelope_commands(server: Scripted) -> list[bytes]:
    return [c.split(b" ")[0].split(b":")[0] for c in server.commands if not c.upper().startswith(b"EHLO")]


async def test_mail_rcpts_and_data_go_in_one_write_and_each_recipient_gets_its_reply(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    def script(command: bytes) -> bytes | None:
        return b"550 5.1.1 no such user\r\n" if command.startswith(b"RCPT TO:<b@") else standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    group = next(r for r in server.reads if r.startswith(b"MAIL"))
    assert group == (
        b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@dest.test>\r\nRCPT TO:<b@dest.test>\r\n"
        b"RCPT TO:<c@dest.test>\r\nDATA\r\n"
    )
    assert outcome.replies == {
        1: Reply(250, "2.0.0", "queued"),
        2: Reply(550, "5.1.1", "no such user"),
        3: Reply(250, "2.0.0", "queued"),
    }
    assert server.texts == [b"Subject: hi\r\n\r\nhello\r\n.\r\n"]


async def test_a_refused_mail_from_gives_every_recipient_its_reply_and_resets(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    def script(command: bytes) -> bytes | None:
        if command.startswith(b"MAIL"):
            return b"451 4.7.1 slow down\r\n"
        if command.startswith((b"RCPT", b"DATA")):
            return b"503 5.5.1 need MAIL first\r\n"
        return standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    assert set(outcome.replies.values()) == {Reply(451, "4.7.1", "slow down")}
    assert (outcome.breakoff, outcome.local) == (None, False)
    assert envelope_commands(server)[:6] == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA", b"RSET"]
    assert server.texts == []


async def test_a_354_with_no_recipient_taken_is_ended_with_an_empty_text_never_the_message(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    """RFC 2920 3.1: a server that answers DATA with 354 though it refused every RCPT gets "." alone."""

    def script(command: bytes) -> bytes | None:
        if command.startswith(b"RCPT"):
            return b"550 5.1.1 no such user\r\n"
        if command == b".":
            return b"554 5.5.1 no valid recipients\r\n"
        return standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    assert set(outcome.replies.values()) == {Reply(550, "5.1.1", "no such user")}
    assert server.texts == [b".\r\n"]  # the end-of-data line alone: the text never went
    assert envelope_commands(server)[-2:] == [b"RSET", b"QUIT"]


async def test_a_refused_data_is_the_reply_of_every_recipient_the_server_took(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    def script(command: bytes) -> bytes | None:
        if command.startswith(b"RCPT TO:<c@"):
            return b"452 4.2.2 mailbox full\r\n"
        if command == b"DATA":
            return b"451 4.3.0 try later\r\n"
        return standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    assert outcome.replies == {
        1: Reply(451, "4.3.0", "try later"),
        2: Reply(451, "4.3.0", "try later"),
        3: Reply(452, "4.2.2", "mailbox full"),
    }


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"250 2.1.0 ok\r\n250 2.1.0 one too many\r\n", id="a reply to no command"),
        pytest.param(b"2x0 what\r\n", id="a line that is no reply"),
    ],
)
async def test_replies_that_cannot_be_paired_with_the_commands_cost_the_connection_not_a_reply(
    tmp_path: Path, scripted: Callable[[Script], Scripted], bad: bytes
) -> None:
    def script(command: bytes) -> bytes | None:
        return bad if command.startswith(b"MAIL") else standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    assert outcome.breakoff is Breakoff.LOST and outcome.local
    assert {r.code for r in outcome.replies.values()} == {451}
    assert server.texts == []


async def test_a_server_that_stops_answering_mid_group_times_out_within_the_command_timeout(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    def script(command: bytes) -> bytes | None:
        # Answers MAIL and the first RCPT, then nothing more (the session stays open).
        return b"" if command.startswith((b"RCPT TO:<b@", b"RCPT TO:<c@", b"DATA")) else standard(command)

    server = scripted(script)
    started = asyncio.get_running_loop().time()
    outcome = await attempt(tmp_path, await server.start(), command_timeout="1s")
    assert outcome.breakoff is Breakoff.TIMEOUT
    assert 0.9 <= asyncio.get_running_loop().time() - started < 4


async def test_a_notice_right_after_the_texts_250_leaves_the_message_delivered(
    tmp_path: Path, scripted: Callable[[Script], Scripted]
) -> None:
    # The one reply to a text cannot be mistaken for another's: what follows it in the same read (a server
    # going down says 421 at once) is dropped, as aiosmtplib drops it, and the 250 stands.
    def script(command: bytes) -> bytes | None:
        return b"250 2.0.0 queued\r\n421 4.3.2 shutting down\r\n" if command == b"." else standard(command)

    server = scripted(script)
    outcome = await attempt(tmp_path, await server.start())
    assert set(outcome.replies.values()) == {Reply(250, "2.0.0", "queued")}
    assert outcome.breakoff is None


# -- a 421 after the greeting (RFC 5321 3.8: the server closing the channel) ---------------------------

TOO_MANY = b"421 4.7.0 mx.test too many connections from your IP\r\n"
TOO_MANY_REPLY = Reply(421, "4.7.0", "mx.test too many connections from your IP")


def answering(*, rcpt: dict[str, bytes] | None = None, **by_word: bytes) -> Script:
    """`standard`, but by_word[w] to a command whose first word is w (MAIL, DATA), and rcpt[x] to RCPT
    TO:<x@...>."""

    def script(command: bytes) -> bytes | None:
        for local, answer in (rcpt or {}).items():
            if command.startswith(b"RCPT TO:<" + local.encode() + b"@"):
                return answer
        return by_word.get(command.split(b" ", 1)[0].decode(), standard(command))

    return script


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_to_mail_from_is_the_receivers_reply_to_every_recipient(
    tmp_path: Path, scripted: MakeScripted, pipelining: bool
) -> None:
    server = scripted(answering(MAIL=TOO_MANY), pipelining=pipelining)
    outcome = await attempt(tmp_path, await server.start())
    assert outcome.replies == dict.fromkeys((1, 2, 3), TOO_MANY_REPLY)
    # Said by the receiver, not made up here: shaping, the event and a DSN hear the 421 itself.
    assert (outcome.breakoff, outcome.local) == (None, False)
    assert outcome.said() == [TOO_MANY_REPLY] * 3
    assert server.texts == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_to_a_rcpt_goes_to_the_recipients_not_refused_before_it(
    tmp_path: Path, scripted: MakeScripted, pipelining: bool
) -> None:
    """a was accepted (DATA will not come now), b refused before the 421 keeps its 550, c is answered by the
    421 (pipelined) or never (one command at a time)."""
    script = answering(rcpt={"b": b"550 5.1.1 no such user\r\n", "c": TOO_MANY})
    if not pipelining:  # one command at a time: the 421 answers b, and the server hangs up before c
        script = answering(rcpt={"b": TOO_MANY})
    server = scripted(script, pipelining=pipelining)
    outcome = await attempt(tmp_path, await server.start())
    if pipelining:
        assert outcome.replies == {
            1: TOO_MANY_REPLY,
            2: Reply(550, "5.1.1", "no such user"),
            3: TOO_MANY_REPLY,
        }
    else:
        assert outcome.replies == dict.fromkeys((1, 2, 3), TOO_MANY_REPLY)
        assert [c for c in server.commands if c.startswith(b"RCPT")] == [
            b"RCPT TO:<a@dest.test>",
            b"RCPT TO:<b@dest.test>",
        ]
    assert (outcome.breakoff, outcome.local) == (None, False)
    assert server.texts == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_on_a_reused_connection_is_not_tried_again_at_once_on_a_fresh_one(
    tmp_path: Path, scripted: MakeScripted, pipelining: bool
) -> None:
    """The first message goes; the second meets the 421 at MAIL. A fresh connection straight after "too many
    connections" would only hear it again: the reply stands, on the one connection."""
    mails = 0

    def script(command: bytes) -> bytes | None:
        nonlocal mails
        if command.startswith(b"MAIL"):
            mails += 1
            return TOO_MANY if mails > 1 else standard(command)
        return standard(command)

    server = scripted(script, pipelining=pipelining)
    address = await server.start()
    pools = [{"name": "default", "members": [{"name": "up", "address": address}]}]
    settings = make_settings(tmp_path, pools)
    transport = SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")
    try:
        first = await transport.deliver(WORK)
        second = await transport.deliver(WORK)
    finally:
        await transport.close()
    assert {r.code for r in first.replies.values()} == {250}
    assert second.replies == dict.fromkeys((1, 2, 3), TOO_MANY_REPLY) and not second.local
    assert server.connections == 1 and mails == 2


async def test_a_421_after_mail_reaches_the_reactions_the_events_and_the_next_member(
    tmp_path: Path, scripted: MakeScripted, upstream: StartUpstream
) -> None:
    """End to end: the shipped "too many connections" reaction throttles the lane, the event quotes the
    receiver (not "connection lost"), and the mail goes at once to the backup member."""
    server = scripted(answering(MAIL=TOO_MANY))
    backup = await upstream("backup")
    members = [{"name": "a", "address": await server.start()}, {"name": "b", "address": backup.address}]
    pool = {"name": "default", "policy": "priority", "members": [members[0], {**members[1], "backup": True}]}
    async with App(make_settings(tmp_path, [pool], shaping={"aimd": "all"})) as app:
        await send(app.smtp_port, "m421")
        await wait_until(lambda: len(backup.received) == 1)
        lanes = {lane["member"]: lane for lane in app.control.shaping()}
    events = read_events(tmp_path / "events.jsonl")
    [failure] = [e for e in events if e["type"] == "TransientFailure"]
    assert (failure["member"], failure["response"]["code"]) == ("a", 421)
    assert failure["response"]["text"] == TOO_MANY_REPLY.text and failure["bounce_class"] != "BadConnection"
    assert [e["member"] for e in events if e["type"] == "ShapingChanged"] == ["a"]
    assert "too many connections" in lanes["a"]["last_change"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_552_to_rcpt_is_temporary_and_a_552_to_the_text_is_not(
    tmp_path: Path, scripted: MakeScripted, pipelining: bool
) -> None:
    """RFC 5321 4.5.3.1.10: a 552 to RCPT is RFC 821's "too many recipients", to be taken as the 452 it
    should have been; its enhanced code's class follows (RFC 3463 2), the rest and the text are the server's.
    A 552 after the end of data is the message's (its size): permanent, as said."""
    script = answering(
        rcpt={"b": b"552 5.5.3 Too many recipients\r\n", "c": b"552 recipient limit reached\r\n"},
        **{".": b"552 5.3.4 message too big\r\n"},
    )
    server = scripted(script, pipelining=pipelining)
    outcome = await attempt(tmp_path, await server.start())
    assert outcome.replies == {
        1: Reply(552, "5.3.4", "message too big"),
        2: Reply(452, "4.5.3", "Too many recipients"),
        3: Reply(452, "4.5.3", "recipient limit reached"),
    }


@pytest.mark.parametrize("pipelining", [True, False])
async def test_recipients_over_a_receivers_limit_go_at_once_in_the_next_transactions(
    tmp_path: Path, scripted: MakeScripted, pipelining: bool
) -> None:
    """A receiver that takes 2 recipients a transaction (452 4.5.3 to the rest, RFC 5321 4.5.3.1.10): 5
    recipients go in 3 transactions straight away, not one batch per retry interval (here an hour)."""
    taken = 0

    def script(command: bytes) -> bytes | None:
        nonlocal taken
        if command.startswith(b"MAIL"):
            taken = 0
        elif command.startswith(b"RCPT"):
            taken += 1
            if taken > 2:
                return b"452 4.5.3 Too many recipients\r\n"
        return standard(command)

    server = scripted(script, pipelining=pipelining)
    pool = {"name": "default", "members": [{"name": "a", "address": await server.start()}]}
    settings = make_settings(tmp_path, [pool], retry={"intervals": ["1h"]})
    recipients = [f"r{i}@dest.test" for i in range(5)]
    async with App(settings) as app:
        await send(app.smtp_port, "many", to=recipients)
        await wait_until(lambda: len(server.texts) == 3, timeout=5)
        await wait_until(lambda: app.dispatcher.in_flight == 0)
    events = read_events(tmp_path / "events.jsonl")
    assert sorted(e["recipient"] for e in events if e["type"] == "Delivery") == recipients
    assert [e for e in events if e["type"] == "TransientFailure"] == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_farm_member_is_delivered_to_with_or_without_pipelining(
    tmp_path: Path, upstream: StartUpstream, pipelining: bool
) -> None:
    up = await upstream("up", pipelining=pipelining)
    pools = [{"name": "default", "members": [{"name": "up", "address": up.address}]}]
    settings = make_settings(tmp_path, pools)
    transport = SmtpTransport(settings.pool[0].members[0], settings.delivery, "postmux.test")
    try:
        outcomes = [await transport.deliver(WORK) for _ in range(3)]  # one connection, reused
    finally:
        await transport.close()
    assert all(
        set(o.replies) == {1, 2, 3} and {r.code for r in o.replies.values()} == {250} for o in outcomes
    )
    assert len(up.received) == 3 and up.connections == 1
    assert up.received[0].recipients == ["a@dest.test", "b@dest.test", "c@dest.test"]
