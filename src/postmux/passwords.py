"""Password hashes for SMTP AUTH users: scrypt (RFC 7914) in a self-describing string.

`$scrypt$n=32768,r=8,p=1$<salt, base64>$<hash, base64>`: the string carries its own cost, so the cost
of new hashes can rise without invalidating old ones. `postmux passwd` makes them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

DEFAULT_N = 2**15  # 32 MiB and ~0.1 s per check: a guess costs as much for an attacker
DEFAULT_R = 8
DEFAULT_P = 1
_MAX_N = 2**20  # a hash from the config may not make postmux spend more than 1 GiB on one login
_HASH_LEN = 32
_FORMAT = re.compile(r"^\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class BadHash(ValueError):
    pass


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem must cover 128 * r * n bytes, which hashlib's 32 MiB default does not for n = 2**15.
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=129 * r * n + 2**20)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password.encode(), salt, n, r, p, _HASH_LEN)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, digest); raises BadHash naming what is wrong."""
    m = _FORMAT.match(encoded)
    if not m:
        raise BadHash("not a password hash of the form $scrypt$n=N,r=R,p=P$SALT$HASH (see `postmux passwd`)")
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if n < 2 or n & (n - 1) or n > _MAX_N:
        raise BadHash(f"scrypt n must be a power of 2 up to {_MAX_N}")
    if not 1 <= r <= 32 or not 1 <= p <= 16:
        raise BadHash("scrypt r must be 1-32 and p 1-16")
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except ValueError:
        raise BadHash("salt or hash is not base64") from None
    if len(digest) < 16:
        raise BadHash("hash is shorter than 16 bytes")
    return n, r, p, salt, digest


def verify_password(password: bytes, encoded: str) -> bool:
    """Constant-time comparison; a malformed hash never matches."""
    try:
        n, r, p, salt, digest = parse_hash(encoded)
    except BadHash:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)
