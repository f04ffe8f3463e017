"""A bounce that comes back to the return path of an ordinary long address is taken: postmux's return
paths add 41 octets to the recipient's `local=domain`, past RFC 5321's 64-octet local part for any address
longer than 23 octets (firstname.lastname@gmail.com), and the listener must take what postmux sends."""

from __future__ import annotations

from pathlib import Path

from postmux.app import App
from tests.integration.test_returns import DOMAIN, hand_back, verp_settings
from tests.support import StartUpstream, read_events, send, wait_until
from tests.unit.test_returns import POSTFIX_DSN

LONG = "firstname.lastname@dest.example"


async def test_a_dsn_to_the_return_path_of_a_long_address_is_matched_and_suppresses_it(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("relay-a")
    events = tmp_path / "events.jsonl"
    async with App(verp_settings(tmp_path, up.address)) as app:
        await send(app.smtp_port, "long", to=[LONG])
        await wait_until(lambda: len(up.received) == 1)
        return_path = up.received[0].sender
        assert return_path.endswith(f".firstname.lastname=dest.example@{DOMAIN}")
        assert len(return_path.split("@")[0]) > 64
        dsn = POSTFIX_DSN.replace(
            b"b.0193a5f2c8b1deadbeef.xxxx.user=dest.example@bounces.example.com", return_path.encode()
        ).replace(b"user@dest.example", LONG.encode())
        await hand_back(app.smtp_port, return_path, dsn)  # refused at RCPT (553 5.1.3) before
        await wait_until(lambda: any(e["type"] == "Bounce" for e in read_events(events)))
        found = app.suppressions.find(LONG)
        assert found is not None and found.source == "bounce"
    bounce = next(e for e in read_events(events) if e["type"] == "Bounce")
    assert bounce["recipient"] == LONG and bounce["tags"]["async"] == "true"
