"""TLS toward members (RFC 3207 STARTTLS): one client context per member, built once from its `tls` mode.

A word every room that talks to members shares: delivery starts TLS with it and the active health checks
(postmux.balancing.probes) do the same, so a check sees what an attempt would. No I/O here.

opportunistic and required encrypt without checking who answers (Postfix's "may" and "encrypt": a
certificate check that nobody can satisfy on a private relay farm would only push mail to plaintext);
verify checks the chain against `tls_ca_file` or the system's CAs and the name against the relay's host,
`tls_server_name`, or the MX host's name (Postfix's "secure" level).
"""

from __future__ import annotations

import ssl

from postmux.config import MemberSettings


def client_context(member: MemberSettings) -> ssl.SSLContext | None:
    """The context STARTTLS uses for this member; None when the member never starts TLS."""
    match member.tls_mode:
        case "none":
            return None
        case "verify":
            # With a CA file, only that file's CAs are trusted (create_default_context skips the system's).
            return ssl.create_default_context(cafile=member.tls_ca_file)
        case "opportunistic" | "required":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
