"""Enhanced status codes (RFC 3463) on the replies aiosmtpd writes itself, which carry none.

RFC 2034 3: a server that advertises ENHANCEDSTATUSCODES puts a code on every 2xx, 4xx and 5xx reply but the
greeting and the replies to EHLO and HELO. postmux's own replies are written with theirs; `enhanced` gives
aiosmtpd's the code they lack, as the SMTP session pushes them.
"""

from __future__ import annotations

import re

# aiosmtpd's own error replies carry no enhanced status code; RFC 3463 / RFC 2034 want one on each.
_ENHANCED_REPLIES = {
    # aiosmtpd closes the connection after this one: a reply that comes with the server closing is a 421
    # (RFC 5321 3.8, 4.2.2), as postmux's own max_errors and timeouts say it.
    "502 5.5.1 Too many unrecognized commands, goodbye.": (
        "421 4.7.0 Error: too many unrecognized commands, closing connection"
    ),
    "500 Command line too long": "500 5.5.2 Command line too long (RFC 5321 4.5.3.1.4: 512 octets)",
    # Only with [smtp] long_lines = "refuse"; the default folds long lines instead (ingress/folding.py).
    "500 Line too long (see RFC5321 4.5.3.1.6)": (
        "500 5.5.2 Text line too long (RFC 5321 4.5.3.1.6: 1000 octets); message refused"
    ),
    "552 Error: Too much mail data": "552 5.3.4 Message too big for system",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
}
_DEFAULT_ENHANCED = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "454": "4.7.0",  # RFC 3207 5 / RFC 4954 6: TLS or AUTH not available for a temporary reason
    "530": "5.7.0",
    "538": "5.7.11",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
# aiosmtpd's own success replies. RFC 2034 3: with ENHANCEDSTATUSCODES every 2xx, 4xx and 5xx reply carries
# a code, but for the greeting and the replies to EHLO and HELO, which keep theirs (no code is added to a
# 2xx reply not named here); 334 and 354 are not final replies and have none.
_ENHANCED_SUCCESS = {
    "250 OK": "250 2.0.0 OK",  # NOOP, RSET (MAIL and RCPT answer through IngressHandler)
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    ),
}
_HELP_REPLIES = ("250 Syntax: ", "250 Supported commands: ")


def enhanced(reply: str) -> str:
    """The same reply with an enhanced status code, if it is aiosmtpd's own or an error reply without one."""
    if reply in _ENHANCED_REPLIES:
        return _ENHANCED_REPLIES[reply]
    if reply in _ENHANCED_SUCCESS:
        return _ENHANCED_SUCCESS[reply]
    if reply.startswith(_HELP_REPLIES):
        return f"214 2.0.0 {reply[4:]}"  # RFC 5321 4.2.2, 4.3.2: help is 214, not aiosmtpd's 250
    if reply[:1] not in ("4", "5") or _HAS_ENHANCED.match(reply):
        return reply
    code = _DEFAULT_ENHANCED.get(reply[:3], f"{reply[0]}.0.0")
    return f"{reply[:3]} {code} {reply[4:]}"
