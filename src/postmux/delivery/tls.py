"""What TLS a delivery connection ended up with; the member's client context is made in postmux.tls."""

from __future__ import annotations

import ssl

import aiosmtplib


def describe_tls(client: aiosmtplib.SMTP) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for an encrypted connection, 'none' for a plaintext one."""
    try:
        ssl_object = client.get_transport_info("ssl_object")
    except aiosmtplib.SMTPServerDisconnected:
        return "none"
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return "none"
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0]}" if cipher else str(ssl_object.version())
