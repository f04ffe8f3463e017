"""What TLS a delivery connection ended up with; the member's client context is in postmux.tls.

The context maker moved to postmux.tls, shared with the active health checks; it is re-exported here for
those who import it from delivery.
"""

from __future__ import annotations

import ssl

import aiosmtplib

from postmux.tls import client_context as client_context


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
