"""Failed logins counted across connections (anvil.py), on a manual clock (issue 10 B5)."""

from __future__ import annotations

from postmux.ingress.anvil import KNOWN_LOGIN_S, Anvil, LoginThrottle, Throttled, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_over_after_limit_failures_within_the_window_and_under_again_as_they_age() -> None:
    clock = Clock()
    anvil = Anvil(limit=3, window_s=60, clock=clock)
    for _ in range(2):
        anvil.fail("192.0.2.1")
        clock.now += 10
    assert not anvil.over("192.0.2.1")
    anvil.fail("192.0.2.1")  # three within 20 s
    assert anvil.over("192.0.2.1") and not anvil.over("192.0.2.2")
    assert anvil.retry_in("192.0.2.1") == 40  # the first of them leaves the window at 1060
    clock.now = 1060.0
    assert not anvil.over("192.0.2.1") and anvil.failures("192.0.2.1") == 2
    clock.now = 1081.0
    assert anvil.failures("192.0.2.1") == 0 and len(anvil) == 0  # forgotten once nothing is in the window


def test_the_window_slides_rather_than_resetting_on_a_boundary() -> None:
    clock = Clock()
    anvil = Anvil(limit=4, window_s=60, clock=clock)
    for t in (1010, 1050, 1059, 1061):  # fixed minutes from 1000 would count 3, then 1: never 4
        clock.now = t
        anvil.fail("k")
    assert anvil.failures("k") == 4 and anvil.over("k")
    clock.now = 1070.5
    assert anvil.failures("k") == 3  # 1010 is out of the last 60 s


def test_memory_is_bounded_in_keys_and_in_failures_per_key() -> None:
    clock = Clock()
    anvil = Anvil(limit=5, window_s=3600, clock=clock, max_keys=100)
    for i in range(1000):
        anvil.fail(f"10.0.{i // 256}.{i % 256}")
        clock.now += 0.001
    assert len(anvil) == 100
    for _ in range(1000):
        anvil.fail("10.0.3.231")  # the last key written above: kept
    assert anvil.failures("10.0.3.231") == 5
    assert anvil.failures("10.0.0.0") == 0  # touched longest ago: forgotten


def test_ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.9") == "192.0.2.9" == address_key("192.0.2.9")


def test_an_address_over_its_budget_is_refused_whatever_user_it_names() -> None:
    throttle = LoginThrottle.create(per_address=3, per_user=100, window_s=300, clock=Clock())
    for user in ("a", "b", "c"):
        assert throttle.refusal("192.0.2.1", user) is None
        throttle.record("192.0.2.1", user, ok=False)
    assert throttle.refusal("192.0.2.1", "billing") is Throttled.ADDRESS
    assert throttle.refusal("192.0.2.2", "billing") is None


def test_a_user_guessed_from_many_addresses_is_refused_from_new_ones_but_not_where_it_logs_in() -> None:
    clock = Clock()
    throttle = LoginThrottle.create(per_address=3, per_user=5, window_s=300, clock=clock)
    throttle.record("198.51.100.7", "billing", ok=True)  # the application's own address
    for i in range(5):  # one guess each: no address reaches its own budget
        throttle.record(f"192.0.2.{i}", "billing", ok=False)
    assert throttle.refusal("192.0.2.99", "billing") is Throttled.USER
    assert throttle.refusal("192.0.2.99", "reports") is None  # other users are not affected
    assert throttle.refusal("198.51.100.7", "billing") is None  # the application keeps working
    throttle.record("198.51.100.7", "billing", ok=False)  # a typo there does not count against the user
    assert throttle.users.failures("billing") == 5
    clock.now += KNOWN_LOGIN_S + 1  # a login long ago exempts no more
    for i in range(5):
        throttle.record(f"192.0.2.{i}", "billing", ok=False)
    assert throttle.refusal("198.51.100.7", "billing") is Throttled.USER


def test_a_success_is_no_failure() -> None:
    throttle = LoginThrottle.create(per_address=2, per_user=2, window_s=300, clock=Clock())
    for _ in range(50):
        throttle.record("192.0.2.1", "billing", ok=True)
    assert throttle.refusal("192.0.2.1", "billing") is None
    assert len(throttle.addresses) == len(throttle.users) == 0
