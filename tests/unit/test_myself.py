"""Which addresses reach this node's own SMTP listener (delivery/myself.py, RFC 5321 5.1's loop check)."""

from __future__ import annotations

from postmux.delivery.myself import Myself


def test_a_listener_on_one_address_is_reached_at_that_address_and_port_only() -> None:
    me = Myself.of("127.0.0.1", 2525, "Postmux.Test.")
    assert me.listens_at("127.0.0.1", 2525)
    assert not me.listens_at("127.0.0.1", 25)  # another port: another server
    assert not me.listens_at("127.0.0.2", 2525)  # nothing of ours listens there: refused, not a loop
    assert not me.listens_at("mx.example.test", 2525)
    assert me.is_named("postmux.test") and me.is_named("POSTMUX.TEST.") and not me.is_named("mx.test")


def test_a_wildcard_listener_is_reached_at_loopback_and_the_source_addresses() -> None:
    for wildcard in ("0.0.0.0", "::", "mail.example.test"):
        me = Myself.of(wildcard, 25, "mx.example.test", ["192.0.2.10", "2001:db8::10"])
        assert me.listens_at("127.0.7.5", 25) and me.listens_at("::1", 25) and me.listens_at("0.0.0.0", 25)
        assert me.listens_at("192.0.2.10", 25) and me.listens_at("2001:db8::10", 25)
        assert not me.listens_at("192.0.2.11", 25)  # someone else's server
        assert not me.listens_at("192.0.2.10", 2525)
