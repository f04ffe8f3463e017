"""Who is calling the submission API: a bearer token checked against the scrypt hashes of [[api_key]].

A check costs what a login does (scrypt, passwords.py: tens of ms and 32 MiB), too much for every request
of a client that sends one message per request. So a token once checked is remembered by its SHA-256
(a digest of a random key is as good as the key for lookup, and the key itself is never kept): the next
request with it costs a dict lookup. Wrong tokens are remembered the same way, so repeating one costs
nothing either; new wrong tokens cost one scrypt check per configured key, run in a thread, at most
`max_concurrent` at once (the loop never waits on them). A reload forgets everything.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from postmux.config import ApiKey
from postmux.passwords import verify_password

REMEMBERED = 10_000  # tokens remembered, right and wrong, each way (least recently used goes first)


class ApiKeys:
    def __init__(self, keys: Sequence[ApiKey], max_concurrent: int = 4) -> None:
        self._checks = asyncio.Semaphore(max_concurrent)
        self.reconfigure(keys)

    def reconfigure(self, keys: Sequence[ApiKey]) -> None:
        self.keys = {k.name: k for k in keys}
        self._known: OrderedDict[bytes, str] = OrderedDict()  # digest of a right token -> key name
        self._wrong: OrderedDict[bytes, None] = OrderedDict()

    async def identify(self, token: str) -> ApiKey | None:
        """The key `token` is, or None (no such key). A key removed by a reload is no longer found."""
        if not token or not self.keys:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        name = self._known.get(digest)
        if name is not None:
            self._known.move_to_end(digest)
            return self.keys.get(name)
        if digest in self._wrong:
            self._wrong.move_to_end(digest)
            return None
        keys = list(self.keys.values())
        async with self._checks:
            found = await asyncio.to_thread(_match, token.encode("utf-8", "surrogateescape"), keys)
        if found is not None and self.keys.get(found.name) is not found:
            return None  # a reload meanwhile changed or removed the key
        if found is None:
            _remember(self._wrong, digest, None)
        else:
            _remember(self._known, digest, found.name)
        return found


def _match(token: bytes, keys: list[ApiKey]) -> ApiKey | None:
    for key in keys:
        if verify_password(token, key.hash):
            return key
    return None


def _remember(
    table: OrderedDict[bytes, str] | OrderedDict[bytes, None], digest: bytes, value: str | None
) -> None:
    table[digest] = value  # type: ignore[assignment]
    if len(table) > REMEMBERED:
        table.popitem(last=False)
