"""Failed logins counted across connections, per client address and per user name (Postfix's anvil).

A limit per connection (`max_auth_failures`) does not stop a guesser that opens many connections: 90 of
them from one address guessed 25-30 passwords a second. Postfix's anvil(8) server counts events per
client across connections for its `smtpd_client_*_rate_limit`s; here the event is a failed login, over
a sliding window (the last `limit` failure times of each key, so "N failures in the last W seconds" is
exact, not a fixed minute that resets), and the keys are the client's address and the user name tried,
so a guesser spread over many addresses is stopped at the user too.

Pure: the clock is injected and nothing here does I/O. Memory is bounded: at most `max_keys` keys per
table, `limit` floats each; past that the key touched longest ago is forgotten (an attacker who cycles
through more keys than that gains a fresh budget for the forgotten ones, not more). Cost: O(limit) per
call at worst, usually O(1).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 10_000  # per table: ~10k x (a deque of <= limit floats) is a few MB at most
KNOWN_LOGIN_S = 86_400.0  # how long a user's successful login from an address exempts it (see LoginThrottle)


class Anvil:
    """How many times each key failed within the last `window_s` seconds, up to `limit`."""

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float], max_keys: int = MAX_KEYS
    ) -> None:
        self.limit, self.window_s, self.clock, self.max_keys = limit, window_s, clock, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, key: str) -> int:
        """Failures of `key` within the window (at most `limit`: older ones are not kept)."""
        times = self._failures.get(key)
        if times is None:
            return 0
        cutoff = self.clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def over(self, key: str, pending: int = 0) -> bool:
        """Whether `key` has used up its failures, counting `pending` attempts not yet judged as failures:
        its next attempt must be refused unchecked."""
        return self.failures(key) + pending >= self.limit

    def fail(self, key: str) -> None:
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.limit)
            if len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(self.clock())

    def retry_in(self, key: str) -> float:
        """Seconds until `key` is under its limit again (0 when it is now)."""
        if not self.over(key):
            return 0.0
        return max(0.0, self._failures[key][0] + self.window_s - self.clock())


def address_key(client_ip: str) -> str:
    """The key a client address is counted under: IPv4 as it is, IPv6 by its /64.

    One IPv6 host usually holds a whole /64 (RFC 4291 2.5.1, SLAAC): counting single addresses would give
    it 2^64 budgets. An IPv4-mapped address counts as its IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Throttled(enum.Enum):
    """Why a login is refused before its password is checked."""

    ADDRESS = "address"  # the client's address failed too often
    USER = "user"  # the user name was tried and failed too often, from addresses it never logged in from


@dataclass(frozen=True, slots=True)
class LoginThrottle:
    """Failure budgets per client address and per user name, and who logged in from where.

    The per-user budget stops a guesser spread over many addresses, but it would also let anyone lock a
    user out by failing as it. So an address the user logged in from within KNOWN_LOGIN_S is not held to
    it (nor counted in it): the application that really is that user keeps working while it is attacked.
    Its own address budget still holds.

    A login being checked counts as a failure until it is judged (`begin` to `record`), so logins that
    run at once cannot all pass the check before the first failure is counted.
    """

    addresses: Anvil
    users: Anvil
    known: OrderedDict[tuple[str, str], float]
    clock: Callable[[], float]
    checking: Counter[str]  # logins begun and not yet recorded, by address key and by "user:" + name

    @classmethod
    def create(
        cls,
        per_address: int,
        per_user: int,
        window_s: float,
        clock: Callable[[], float],
        max_keys: int = MAX_KEYS,
    ) -> LoginThrottle:
        return cls(
            Anvil(per_address, window_s, clock, max_keys),
            Anvil(per_user, window_s, clock, max_keys),
            OrderedDict(),
            clock,
            Counter(),
        )

    def refusal(self, client_ip: str, user: str) -> Throttled | None:
        """None when this login may be checked, else why not."""
        key, user_key = address_key(client_ip), f"user:{user}"
        if self.addresses.over(key, self.checking[key]):
            return Throttled.ADDRESS
        if not self._known(client_ip, user) and self.users.over(user, self.checking[user_key]):
            return Throttled.USER
        return None

    def begin(self, client_ip: str, user: str) -> Throttled | None:
        """`refusal`, and when there is none the login is counted as being checked until `record`."""
        refused = self.refusal(client_ip, user)
        if refused is None:
            self.checking.update((address_key(client_ip), f"user:{user}"))
        return refused

    def record(self, client_ip: str, user: str, *, ok: bool) -> None:
        """The outcome of a login that was begun."""
        pair = (user, address_key(client_ip))
        self.checking.subtract((pair[1], f"user:{user}"))
        for key in (pair[1], f"user:{user}"):
            if self.checking[key] <= 0:
                del self.checking[key]
        if ok:
            self.known[pair] = self.clock()
            self.known.move_to_end(pair)
            if len(self.known) > self.addresses.max_keys:
                self.known.popitem(last=False)
            return
        self.addresses.fail(pair[1])
        if not self._known(client_ip, user):
            self.users.fail(user)

    def retry_in(self, client_ip: str, user: str) -> float:
        return max(self.addresses.retry_in(address_key(client_ip)), self.users.retry_in(user))

    def _known(self, client_ip: str, user: str) -> bool:
        pair = (user, address_key(client_ip))
        since = self.known.get(pair)
        if since is None:
            return False
        if self.clock() - since > KNOWN_LOGIN_S:
            del self.known[pair]
            return False
        return True
