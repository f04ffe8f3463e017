"""What an ingress worker sends the main process: an envelope as plain values, rebuilt whole."""

from __future__ import annotations

import pickle
from dataclasses import fields

from postmux.body import BodyFile
from postmux.envelope import Envelope
from postmux.ingress.workers import envelope_of, envelope_values


def test_every_field_of_an_envelope_crosses_and_only_the_text_is_left_out() -> None:
    defaults = Envelope("a@example.com", ("u@dest.test",), b"")
    envelope = Envelope(
        sender="sender@example.com",
        recipients=("one@dest.test", "two@dest.test"),
        data=b"Subject: s\r\n\r\nbody\r\n",
        client_ip="192.0.2.7",
        smtputf8=True,
        helo="client.test",
        protocol="ESMTPSA",
        auth_user="app",
        tags={"campaign": "spring"},
        metadata={"order": "42"},
        message_id_header="id@example.com",
        tail=BodyFile("/spool/text-1.tmp", 0, 1234),
        clean=True,
    )
    # Each field differs from its default, so a field lost on the way would show.
    assert all(getattr(envelope, f.name) != getattr(defaults, f.name) for f in fields(Envelope)[2:])
    values = pickle.loads(pickle.dumps(envelope_values(envelope)))
    assert envelope.data not in values
    assert envelope_of(values, envelope.data) == envelope
