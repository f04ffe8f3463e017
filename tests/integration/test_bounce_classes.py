"""Bounce classes on a running node (issue 15, part 1): the class of a receiver's reply on the Bounce and
TransientFailure events of the log, in the metrics by pool, member and provider, and an operator's rules
file taken again at reload."""

from __future__ import annotations

from pathlib import Path

import httpx
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postmux.app import App
from postmux.config import load_config
from postmux.testing import Behaviour, Upstream, always
from tests.integration.test_control import write_config
from tests.integration.test_metrics import samples
from tests.support import StartUpstream, make_settings, read_events, send, wait_until


def by_recipient(replies: dict[str, str]) -> Behaviour:
    """Answer DATA by the message's first recipient (one recipient per message here)."""

    async def behaviour(upstream: Upstream, envelope: SmtpEnvelope) -> str | None:
        return replies.get(envelope.rcpt_tos[0])

    return behaviour


async def test_a_550_5_1_1_from_upstream_is_an_invalid_recipient_in_the_log_and_the_metrics(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream(
        "a",
        by_recipient(
            {
                "gone@gmail.com": "550 5.1.1 The email account that you tried to reach does not exist.",
                "full@dest.test": "452 4.2.2 <full@dest.test>: mailbox full",
            }
        ),
    )
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    log = tmp_path / "events.jsonl"
    async with App(make_settings(tmp_path, pools, retry={"intervals": ["1h"]})) as app:
        await send(app.smtp_port, "b1", to=["gone@gmail.com"])
        await send(app.smtp_port, "d1", to=["full@dest.test"])
        await wait_until(lambda: {"Bounce", "TransientFailure"} <= {e["type"] for e in read_events(log)})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
            metrics = samples((await client.get("/metrics")).text)
    events = {e["type"]: e for e in read_events(log)}
    bounce, deferral = events["Bounce"], events["TransientFailure"]
    assert (bounce["recipient"], bounce["response"]["enhanced_code"]) == ("gone@gmail.com", "5.1.1")
    assert bounce["bounce_class"] == "InvalidRecipient"
    assert deferral["bounce_class"] == "QuotaIssues"
    assert events["Delivery" if "Delivery" in events else "Reception"]["bounce_class"] == ""

    def failures(provider: str, bounce_class: str, result: str) -> float:
        labels = {
            "pool": "default",
            "member": "a",
            "provider": provider,
            "bounce_class": bounce_class,
            "result": result,
        }
        return metrics.get(("postmux_failures_total", tuple(sorted(labels.items()))), 0.0)

    # gmail.com is the shipped provider "google"; dest.test belongs to none, and never becomes a label.
    assert failures("google", "InvalidRecipient", "bounced") == 1
    assert failures("other", "QuotaIssues", "deferred") == 1
    assert not any("dest.test" in dict(labels).get("provider", "") for _, labels in metrics)


async def test_an_operators_rules_file_overrides_the_shipped_rules_and_is_read_again_at_reload(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream("a", always("550 5.7.1 Message refused by the ACME mail gateway"))
    rules = tmp_path / "bounces.toml"
    rules.write_text("# nothing yet\n")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", up.address, 1)])
    cfg.write_text(cfg.read_text() + f'\n[bounces]\nrules_file = "{rules}"\n')
    log = tmp_path / "events.jsonl"

    def classes() -> list[str]:
        # The messages' own bounces; their DSNs to app@example.com bounce at the same upstream too.
        events = read_events(log)
        return [
            e["bounce_class"] for e in events if e["type"] == "Bounce" and e["recipient"] == "user@dest.test"
        ]

    async with App(load_config(cfg), config_path=cfg) as app:
        await send(app.smtp_port, "before")
        await wait_until(lambda: len(classes()) == 1)
        rules.write_text('[[rule]]\nclass = "AcmeGateway"\ntext = "ACME mail gateway"\n')
        assert app.control.reload().ok
        await send(app.smtp_port, "after")
        await wait_until(lambda: len(classes()) == 2)
        rules.write_text('[[rule]]\nclass = "Broken"\ntext = "ACME (gateway"\n')
        result = app.control.reload()
    assert classes() == ["PolicyRelated", "AcmeGateway"]  # x.7.x alone says policy
    assert not result.ok
    ((key, reason),) = result.problems
    assert key == "bounces.rules_file"
    assert reason.startswith(f"{rules}: rule[0].text: not a regular expression")


GMAIL_UNSOLICITED = (
    "550-5.7.1 [127.0.0.1      12] Our system has detected that this message is\r\n"
    "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
    "550-5.7.1 this message has been blocked. Please visit\r\n"
    "550-5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError\r\n"
    "550 5.7.1  for more information. a1si1234567.89 - gsmtp"
)
GMAIL_REPUTATION = (
    "550-5.7.1 [127.0.0.1] Our system has detected that this message is\r\n"
    "550-5.7.1 likely suspicious due to the very low reputation of the sending\r\n"
    "550-5.7.1 domain. To best protect our users from spam, the message has been\r\n"
    "550 5.7.1 blocked. https://support.google.com/mail/answer/188131 - gsmtp"
)


async def test_a_multi_line_refusal_is_classed_and_told_whole(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Gmail's words are on the later lines of its multi-line replies (RFC 5321 4.2.1): the Bounce event
    carries the whole text, and the class is read from all of it (not PolicyRelated from line 1)."""
    up = await upstream("a")
    up.rcpt_refusals["spammy@dest.test"] = GMAIL_UNSOLICITED
    up.rcpt_refusals["distrusted@dest.test"] = GMAIL_REPUTATION
    pools = [{"name": "default", "members": [{"name": "a", "address": up.address}]}]
    log = tmp_path / "events.jsonl"
    async with App(make_settings(tmp_path, pools)) as app:
        await send(app.smtp_port, "m1", to=["spammy@dest.test", "distrusted@dest.test"])
        await wait_until(lambda: len([e for e in read_events(log) if e["type"] == "Bounce"]) == 2)
    bounces = {e["recipient"]: e for e in read_events(log) if e["type"] == "Bounce"}
    spammy, distrusted = bounces["spammy@dest.test"], bounces["distrusted@dest.test"]
    assert spammy["bounce_class"] == "SpamContent"
    assert spammy["response"] == {
        "code": 550,
        "enhanced_code": "5.7.1",
        "text": "[127.0.0.1      12] Our system has detected that this message is likely unsolicited mail. "
        "To reduce the amount of spam sent to Gmail, this message has been blocked. Please visit "
        "https://support.google.com/mail/?p=UnsolicitedMessageError for more information. "
        "a1si1234567.89 - gsmtp",
    }
    assert distrusted["bounce_class"] == "SpamBlock"
    assert distrusted["response"]["text"].endswith(
        "very low reputation of the sending domain. To best protect our users from spam, the message has "
        "been blocked. https://support.google.com/mail/answer/188131 - gsmtp"
    )
