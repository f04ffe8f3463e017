"""Shaping lanes on a manual clock: limits, rates, reactions, AIMD, providers and warm-up."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from postmux.attempt import AttemptOutcome
from postmux.config import MemberSettings, ShapingSettings, SpoolSettings, WarmupSettings
from postmux.reply import Reply
from postmux.scheduling.feedback import react, telling_reply
from postmux.scheduling.providers import Providers
from postmux.scheduling.shaping import LEASE_TTL_S, SPARE_LEASE_S, Admission, Lane, Shaper, describe_lane
from postmux.scheduling.throttles import MemoryThrottles, Suspension
from postmux.scheduling.warmup import SqliteWarmupCounts, WarmupLedger, day_cap

MEMBER = MemberSettings(name="ip1", kind="source", source_address="127.0.0.2", max_connections=10)
OK = Reply(250, "2.0.0", "ok")
DEFER = Reply(451, "4.3.0", "try later")


def shaping(**kw: object) -> ShapingSettings:
    return ShapingSettings.model_validate(kw)


def run_for(lane: Lane, seconds: float, start: float = 0.0, step: float = 0.01) -> list[float]:
    """Start an attempt whenever the lane admits one, each ending at once; return the start times."""
    starts, now = [], start
    while now < start + seconds:
        if lane.admission(now)[0] is Admission.OPEN:
            lane.start(now)
            lane.finish(now)
            starts.append(now)
        now += step
    return starts


def test_a_rate_of_60_per_minute_holds_over_a_clocked_minute_and_spares_other_destinations() -> None:
    shaper = Shaper(shaping(rule=[{"destination": "google", "rate": "60/min"}]))
    google = shaper.lane("direct", MEMBER, "google", 0.0)
    other = shaper.lane("direct", MEMBER, "example.org", 0.0)
    starts = run_for(google, 60.0)
    assert 60 <= len(starts) <= 61  # one every second: within 10% of 60 over the minute
    assert max(b - a for a, b in itertools.pairwise(starts)) < 1.05
    assert len(run_for(other, 1.0)) == 100  # no rule for it: every 10 ms step may start one


def test_rate_waits_say_when_the_next_turn_is() -> None:
    lane = Shaper(shaping(rule=[{"rate": "2/s"}])).lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    admission, at = lane.admission(0.1)
    assert admission is Admission.RATE
    assert at == pytest.approx(0.5)


def test_a_turn_another_node_took_between_asking_and_starting_is_paid_from_the_next_one() -> None:
    shared = MemoryThrottles()  # as Redis is to several nodes
    settings = shaping(rule=[{"rate": "2/s"}])
    mine, theirs = (Shaper(settings, shared).lane("p", MEMBER, "d", 0.0) for _ in range(2))
    assert mine.admission(0.0)[0] is Admission.OPEN and theirs.admission(0.0)[0] is Admission.OPEN
    theirs.start(0.0)
    mine.start(0.0)  # it asked before the other took the turn: started all the same, one turn owed
    assert mine.owed == 1
    assert mine.admission(0.5) == (Admission.RATE, 1.0)  # the turn at 0.5 pays the debt
    assert mine.owed == 0 and theirs.admission(0.5) == (Admission.RATE, 1.0)
    # Two starts in one interval, then one per interval: over time the rate is the rule's.
    assert mine.admission(1.0)[0] is Admission.OPEN


def test_a_lane_whose_slots_other_nodes_hold_is_asked_until_it_gets_one_again() -> None:
    shared = MemoryThrottles()
    settings = shaping(rule=[{"max_connections": 1}])
    mine, theirs = (Shaper(settings, shared).lane("p", MEMBER, "d", 0.0) for _ in range(2))
    theirs.start(0.0)
    assert mine.surely_open  # by this node's own count: nothing in flight here
    mine.start(0.0)  # started without a slot: the other node holds it
    mine.finish(0.1)
    assert not mine.surely_open and mine.admission(0.2)[0] is Admission.BUSY
    theirs.finish(0.3)
    assert mine.admission(0.4)[0] is Admission.OPEN
    mine.start(0.4)  # a slot again
    mine.finish(0.5)
    assert mine.surely_open


def test_a_suspension_another_node_set_reaches_this_nodes_open_lanes_within_a_prune() -> None:
    shared = MemoryThrottles()
    mine_shaper, theirs_shaper = Shaper(shaping(), shared), Shaper(shaping(), shared)
    mine, theirs = (s.lane("p", MEMBER, "d", 0.0) for s in (mine_shaper, theirs_shaper))
    other = mine_shaper.lane("p", MEMBER, "elsewhere", 0.0)
    theirs_shaper.react(theirs, Reply(421, "4.7.28", "unusual rate"), 0.0, 1.0)
    assert mine.surely_open  # not asked by gates: it would go on sending
    mine_shaper.prune(1.5)
    assert not mine.surely_open and mine.admission(2.0) == (Admission.SUSPENDED, 901.0)
    assert other.surely_open


def test_more_specific_rules_win_key_by_key() -> None:
    shaper = Shaper(
        shaping(
            rule=[
                {"destination": "*", "max_connections": 8, "max_recipients": 50},
                {"destination": "google", "max_connections": 3, "rate": "600/h"},
                {"destination": "google", "member": "ip1", "max_messages_per_connection": 20},
                {"member": "ip1", "max_connections": 5},
            ]
        )
    )
    limits = shaper.lane("direct", MEMBER, "google", 0.0).ceiling
    assert (limits.max_connections, limits.max_recipients, limits.max_messages_per_connection) == (3, 50, 20)
    assert limits.rate == pytest.approx(600 / 3600)
    assert shaper.lane("direct", MEMBER, "example.org", 0.0).ceiling.max_connections == 5
    # A lane never gets more connections than its member has.
    big = Shaper(shaping(rule=[{"max_connections": 99}])).lane("p", MEMBER, "d", 0.0)
    assert big.ceiling.max_connections == 10


def test_connections_are_a_lane_limit() -> None:
    lane = Shaper(shaping(rule=[{"max_connections": 2}])).lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    lane.start(0.0)
    assert lane.admission(0.0)[0] is Admission.BUSY
    lane.finish(0.0)
    assert lane.admission(0.0)[0] is Admission.OPEN


def test_a_matching_reaction_suspends_only_that_lane_for_its_duration() -> None:
    shaper = Shaper(
        shaping(reaction=[{"code": 421, "enhanced_code": "4.7.0", "action": "suspend", "duration": "5m"}])
    )
    lane = shaper.lane("p", MEMBER, "google", 0.0)
    other = shaper.lane("p", MEMBER, "yahoo", 0.0)
    change = shaper.react(lane, Reply(421, "4.7.0", "slow down"), started_at=0.0, now=10.0)
    assert change is not None and "suspended for 300s" in change
    assert lane.admission(11.0) == (Admission.SUSPENDED, 310.0)
    assert other.admission(11.0)[0] is Admission.OPEN
    assert lane.admission(310.0)[0] is Admission.OPEN
    assert lane.last_change == change


def test_reactions_match_on_text_regex_and_default_ones_can_be_turned_off() -> None:
    text = Reply(421, "4.7.0", "Too many concurrent connections from your IP")
    shaper = Shaper(shaping(aimd="off"))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    assert "throttled" in (shaper.react(lane, text, 0.0, 1.0) or "")
    assert lane.allowed_connections == 5
    quiet = Shaper(shaping(aimd="off", default_reactions=False))
    assert quiet.react(quiet.lane("p", MEMBER, "d", 0.0), text, 0.0, 1.0) is None


def test_aimd_halves_on_a_deferral_once_per_window_and_adds_back_per_delivery() -> None:
    shaper = Shaper(shaping(aimd_increase="6/min", rule=[{"rate": "120/min"}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    assert shaper.react(lane, DEFER, started_at=0.0, now=1.0) is not None
    assert lane.rate == pytest.approx(1.0)  # 2/s -> 1/s
    assert lane.allowed_connections == 5
    # Replies to attempts sent before the cut say nothing about the new rate: no second cut.
    assert shaper.react(lane, DEFER, started_at=0.5, now=1.2) is None
    assert lane.rate == pytest.approx(1.0)
    shaper.react(lane, DEFER, started_at=1.5, now=2.0)
    assert lane.rate == pytest.approx(0.5)
    for _ in range(10):
        shaper.react(lane, OK, started_at=2.0, now=3.0)
    assert lane.rate == pytest.approx(0.5 + 10 * 0.1)
    for _ in range(100):
        shaper.react(lane, OK, started_at=2.0, now=3.0)
    assert lane.rate == pytest.approx(2.0)  # never above the configured ceiling
    assert lane.allowed_connections == 10


def test_cuts_stop_at_half_of_what_the_receiver_accepted_last_minute() -> None:
    shaper = Shaper(shaping(rule=[{"rate": "240/min"}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    for i in range(120):  # it took 2/s for the last minute, then refuses everything
        shaper.react(lane, OK, started_at=i / 2, now=i / 2)
    for i in range(10):
        t = 60.0 + i / 100
        shaper.react(lane, DEFER, started_at=t, now=t)
    assert lane.rate == pytest.approx(1.0, rel=0.02)  # 4/s -> 2/s -> 1/s, then held at half of 2/s
    for t in range(130, 140):  # a minute later with nothing accepted, the cuts go on to min_rate
        shaper.react(lane, DEFER, started_at=float(t), now=float(t))
    assert lane.rate == pytest.approx(10 / 60)


def test_aimd_adapts_source_lanes_by_default_and_relay_lanes_only_when_asked() -> None:
    relay = MemberSettings(name="r", address="127.0.0.1:2601")
    by_default = Shaper(shaping(rule=[{"rate": "60/min"}]))
    assert by_default.react(by_default.lane("p", relay, "d", 0.0), DEFER, 0.0, 1.0) is None
    assert by_default.react(by_default.lane("p", MEMBER, "d", 0.0), DEFER, 0.0, 1.0) is not None
    everything = Shaper(shaping(aimd="all", rule=[{"rate": "60/min"}]))
    assert everything.react(everything.lane("p", relay, "d", 0.0), DEFER, 0.0, 1.0) is not None
    by_default.configure(shaping(aimd="all"))
    assert by_default.lanes[("p", "r", "d")].adaptive


@pytest.mark.parametrize(
    "reply",
    [
        Reply(452, "4.2.2", "mailbox full"),
        Reply(450, "4.2.1", "mailbox temporarily disabled"),
        Reply(450, "4.1.1", "recipient unknown for now"),
        Reply(452, "4.5.3", "too many recipients"),  # a transaction's size, not a rate
    ],
)
def test_a_deferral_about_one_mailbox_does_not_cut_the_lane(reply: Reply) -> None:
    """RFC 3463 X.1.x and X.2.x: the state of one address or mailbox, not the receiver asking to slow down;
    a lane is a whole provider, and one full mailbox must not halve the mail to all of it."""
    shaper = Shaper(shaping(rule=[{"rate": "120/min"}]))
    lane = shaper.lane("p", MEMBER, "google", 0.0)
    assert shaper.react(lane, reply, started_at=0.0, now=1.0) is None
    assert (lane.allowed_connections, lane.rate, lane.deferred) == (10, pytest.approx(2.0), 1)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(421, "4.2.2", "closing"),  # a 421 closes the channel, whatever its enhanced code says
        Reply(451, "4.7.1", "slow down"),
        Reply(451, "4.3.0", "try later"),
        Reply(451, "4.4.2", "timeout"),
        Reply(451, "", "try later"),
    ],
)
def test_a_deferral_that_pushes_back_still_cuts_the_lane(reply: Reply) -> None:
    shaper = Shaper(shaping(rule=[{"rate": "120/min"}]))
    lane = shaper.lane("p", MEMBER, "google", 0.0)
    assert shaper.react(lane, reply, started_at=0.0, now=1.0) is not None
    assert (lane.allowed_connections, lane.rate) == (5, pytest.approx(1.0))


def test_of_an_attempts_deferrals_the_one_that_pushes_back_is_heard() -> None:
    shaper = Shaper(shaping(rule=[{"rate": "120/min"}]))
    lane = shaper.lane("p", MEMBER, "google", 0.0)
    full, slow = Reply(452, "4.2.2", "mailbox full"), Reply(451, "4.7.1", "slow down")
    assert telling_reply([full, full]) == full
    assert telling_reply([full, slow]) == slow
    outcome = AttemptOutcome({1: full, 2: slow}, "mx.google.test")
    change = react(shaper, lane, outcome, started_at=0.0, now=1.0)
    assert change is not None and change.response is not None and "4.7.1" in change.response.text


def test_aimd_never_cuts_below_the_floors() -> None:
    shaper = Shaper(shaping(min_connections=2, min_rate="30/min", rule=[{"rate": "60/min"}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    for i in range(10):
        shaper.react(lane, DEFER, started_at=float(i), now=float(i))
    assert lane.allowed_connections == 2
    assert lane.rate == pytest.approx(0.5)


def test_without_a_rate_a_cut_starts_from_the_observed_rate_and_recovers_to_unlimited() -> None:
    shaper = Shaper(shaping(aimd_increase="60/min"))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    assert lane.rate is None
    run_for(lane, 10.0, step=0.1)  # 10/s observed
    shaper.react(lane, DEFER, started_at=10.0, now=10.0)
    assert lane.rate == pytest.approx(5.0, rel=0.05)
    for _ in range(200):
        shaper.react(lane, OK, started_at=10.0, now=70.5)  # a quiet minute later: nothing observed
    assert lane.rate is None
    assert "unlimited" in lane.last_change


def test_a_throttle_on_a_lane_aimd_does_not_raise_ends_after_its_duration() -> None:
    relay = MemberSettings(name="r", address="127.0.0.1:2601")
    shaper = Shaper(shaping(reaction=[{"code": 421, "action": "throttle", "factor": 0.5, "duration": "1m"}]))
    lane = shaper.lane("p", relay, "d", 0.0)
    shaper.react(lane, Reply(421, "4.7.0", "slow"), 0.0, 0.0)
    assert lane.allowed_connections == 5 and "throttled for 60s" in lane.last_change
    assert lane.admission(59.0)[0] is Admission.OPEN and lane.allowed_connections == 5
    lane.admission(60.0)
    assert lane.allowed_connections == 10 and lane.rate is None


def test_a_lane_follows_its_members_new_connection_limit_after_a_reload() -> None:
    shaper = Shaper(shaping())
    small = MemberSettings(name="r", address="127.0.0.1:2601", max_connections=2)
    lane = shaper.lane("p", small, "d", 0.0)
    assert lane.ceiling.max_connections == 2
    bigger = small.model_copy(update={"max_connections": 20})
    assert shaper.lane("p", bigger, "d", 1.0) is lane
    assert (lane.ceiling.max_connections, lane.allowed_connections) == (20, 20)


def test_a_reload_can_raise_a_lanes_connections_back_to_the_members() -> None:
    shaper = Shaper(shaping(rule=[{"max_connections": 2}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    shaper.configure(shaping())
    assert lane.ceiling.max_connections == 10


def test_reconfigure_keeps_suspensions_and_applies_new_ceilings() -> None:
    shaper = Shaper(shaping(reaction=[{"code": 421, "action": "suspend", "duration": "1h"}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    shaper.react(lane, Reply(421, "4.7.0", "no"), 0.0, 0.0)
    shaper.configure(shaping(rule=[{"max_connections": 2, "rate": "10/min"}]))
    assert lane.suspended_until == 3600.0
    assert lane.ceiling.max_connections == 2
    assert lane.allowed_connections == 2
    assert lane.rate == pytest.approx(10 / 60)


def test_idle_lanes_at_their_ceiling_are_forgotten() -> None:
    shaper = Shaper(shaping(reaction=[{"code": 421, "action": "suspend", "duration": "2h"}]))
    quiet, suspended = shaper.lane("p", MEMBER, "a", 0.0), shaper.lane("p", MEMBER, "b", 0.0)
    shaper.react(suspended, Reply(421, "", "no"), 0.0, 0.0)
    shaper.prune(now=3601.0)
    assert ("p", "ip1", "a") not in shaper.lanes
    assert ("p", "ip1", "b") in shaper.lanes
    assert quiet.pool == "p"


def test_providers_group_by_mx_suffix_on_label_boundaries_and_config_overrides() -> None:
    providers = Providers(ShapingSettings())
    assert providers.destination("example.org", ["aspmx.l.google.com"]) == "google"
    assert providers.destination("example.org", ["mx.notgoogle.com"]) == "example.org"
    assert providers.destination("GMail.com") == "google"  # relay pools: by the provider's own domains
    assert providers.destination("corp.test", ["corp-test.mail.protection.outlook.com"]) == "microsoft"
    custom = Providers(
        ShapingSettings.model_validate(
            {
                "default_providers": False,
                "provider": [{"name": "hosted", "mx_suffixes": ["mx.hoster.test"], "domains": ["a.test"]}],
            }
        )
    )
    assert custom.destination("x.test", ["in1.mx.hoster.test"]) == "hosted"
    assert custom.destination("gmail.com") == "gmail.com"
    assert custom.names == {"hosted"}


def test_warmup_caps_by_day_and_provider_then_ends() -> None:
    warm = MemberSettings(
        name="new",
        kind="source",
        source_address="127.0.0.3",
        warmup=WarmupSettings(start=date(2026, 11, 1), days=(100, 200), provider={"google": (10,)}),
    )
    assert day_cap(warm, "*", date(2026, 10, 30)) == 100  # before the start: still day 1
    assert day_cap(warm, "*", date(2026, 11, 2)) == 200
    assert day_cap(warm, "google", date(2026, 11, 1)) == 10
    assert day_cap(warm, "google", date(2026, 11, 2)) is None
    assert day_cap(warm, "*", date(2026, 11, 3)) is None
    assert day_cap(MEMBER, "*", date(2026, 11, 1)) is None


def test_warmup_ledger_counts_persist_and_roll_over_at_utc_midnight(tmp_path: Path) -> None:
    warm = MemberSettings(
        name="new",
        kind="source",
        source_address="127.0.0.3",
        warmup=WarmupSettings(start=date(2026, 11, 28), days=(3,)),
    )
    day1 = datetime(2026, 11, 28, 23, 0, tzinfo=UTC).timestamp()
    ledger = WarmupLedger(tmp_path / "warmup.db")
    for _ in range(3):
        assert ledger.allows("p", warm, "google", day1)
        ledger.count("p", warm, "google", day1)
    assert not ledger.allows("p", warm, "yahoo", day1)
    ledger.flush()
    again = WarmupLedger(tmp_path / "warmup.db")  # a restart does not grant a fresh allowance
    assert not again.allows("p", warm, "google", day1)
    assert again.sent_today("p", "new") == 3
    # Day 2 is past the schedule: warm, no cap.
    assert again.allows("p", warm, "google", day1 + 3600)
    del ledger, again  # stopped: their files closed
    (tmp_path / "warmup.db").write_text("{not a database")
    # A damaged ledger does not stop the node: the day starts afresh.
    assert WarmupLedger(tmp_path / "warmup.db").allows("p", warm, "google", day1)


# -- lanes over their throttles -------------------------------------------------------------------------


def test_a_lanes_suspension_lives_in_the_throttles_and_one_set_there_is_heard() -> None:
    throttles = MemoryThrottles()
    shaper = Shaper(shaping(), throttles)
    lane = shaper.lane("p", MEMBER, "google", 0.0)
    shaper.react(lane, Reply(421, "4.7.28", "unusual rate"), started_at=0.0, now=10.0)
    assert throttles.suspended("p/ip1/google", 11.0) == Suspension(910.0, lane.last_change)
    shaper.resume(lane, "by operator", 20.0)
    assert throttles.suspended("p/ip1/google", 21.0) is None
    # As another node would: the lane says so the next time it is asked, and shows it.
    throttles.suspend("p/ip1/google", 500.0, "elsewhere")
    assert lane.admission(30.0) == (Admission.SUSPENDED, 500.0)
    assert describe_lane(lane, 30.0)["suspended_for_s"] == 470.0
    assert shaper.resume(lane, "by operator", 40.0) is not None
    assert lane.admission(41.0)[0] is Admission.OPEN and lane.surely_open


def test_an_attempt_holds_a_connection_lease_until_it_ends() -> None:
    shaper = Shaper(shaping(rule=[{"max_connections": 2}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    assert shaper.throttles.leases_held(lane.key, 0.0) == 1
    lane.start(0.0)
    assert shaper.throttles.lease(lane.key, 2, 60.0, 0.0) is None  # the lane's slots are all taken
    lane.finish(1.0)
    lane.finish(1.0)
    assert shaper.throttles.leases_held(lane.key, 1.0) == 0 and lane.leases == []


def test_a_long_attempt_keeps_its_lease_while_the_shaper_renews_it() -> None:
    shaper = Shaper(shaping(rule=[{"max_connections": 1}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    for now in range(1, 3 * int(LEASE_TTL_S)):  # the dispatcher's reap loop, once a second
        shaper.prune(float(now))
    now = 3 * LEASE_TTL_S
    assert shaper.throttles.leases_held(lane.key, now) == 1
    assert lane.admission(now)[0] is Admission.BUSY
    lane.finish(now)
    assert lane.admission(now)[0] is Admission.OPEN


def test_a_dead_nodes_connection_slots_are_free_again_before_its_work_is_taken_over() -> None:
    """Two nodes' shapers on one shared store: the one that dies (never prunes again) holding every slot
    of a lane leaves them held LEASE_TTL_S at most, less than the spool's lease_ttl after which the other
    takes its work over (issue 17: at 300 s the survivors sent that work through what was left)."""
    throttles = MemoryThrottles()
    dead, alive = (Shaper(shaping(rule=[{"max_connections": 2}]), throttles) for _ in range(2))
    doomed = dead.lane("p", MEMBER, "d", 0.0)
    doomed.start(0.0)
    doomed.start(0.0)
    survivor = alive.lane("p", MEMBER, "d", 0.0)
    survivor.start(1.0)
    assert survivor.contended and survivor.leases == []  # every shared slot is the dead node's
    survivor.finish(1.0)
    assert SpoolSettings().lease_ttl > LEASE_TTL_S  # when the others take the dead node's work over
    for now in range(2, int(LEASE_TTL_S) + 1):
        alive.prune(float(now))
    survivor.start(LEASE_TTL_S)
    survivor.start(LEASE_TTL_S)
    assert len(survivor.leases) == 2 and not survivor.contended


def test_attempts_started_over_the_limit_keep_the_lane_busy_until_enough_end() -> None:
    shaper = Shaper(shaping(rule=[{"max_connections": 2}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    for _ in range(3):
        lane.start(0.0)
    assert len(lane.leases) == 2
    lane.finish(0.0)
    # Two still run, as many as the lane allows: busy, here and to whoever shares the throttles.
    assert lane.admission(0.0)[0] is Admission.BUSY
    assert shaper.throttles.leases_held(lane.key, 0.0) == 2
    lane.finish(0.0)
    assert lane.admission(0.0)[0] is Admission.OPEN
    assert shaper.throttles.leases_held(lane.key, 0.0) == 1


def test_a_cut_gives_a_lane_without_a_rate_one_turn_not_its_burst() -> None:
    shaper = Shaper(shaping(rule=[{"burst": 5}]))
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    run_for(lane, 10.0, step=0.1)  # 10/s observed
    shaper.react(lane, DEFER, started_at=10.0, now=10.0)
    assert lane.rate == pytest.approx(5.0, rel=0.05)
    assert run_for(lane, 0.1, start=10.0, step=0.01) == [10.0]  # one now, then the new spacing


def test_memory_throttles_forget_what_has_run_out() -> None:
    throttles = MemoryThrottles()
    for i in range(100):
        throttles.rate(f"k{i}", 1.0, 1, 0.0)
        lease = throttles.lease(f"k{i}", 1, 60.0, 0.0)
        assert lease is not None
        if i % 2:
            throttles.release(lease)
        throttles.suspend(f"s{i}", 30.0, "why")
    assert len(throttles) == 200
    throttles.suspended("k0", 120.0)  # any call, a minute or more on, sweeps
    assert len(throttles) == 0


# -- warm-up counts: migration, several nodes -----------------------------------------------------------

WARM = MemberSettings(
    name="new",
    kind="source",
    source_address="127.0.0.3",
    warmup=WarmupSettings(start=date(2026, 11, 28), days=(3,)),
)
DAY1 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp()


def test_an_upgrade_imports_todays_warmup_json_once(tmp_path: Path) -> None:
    legacy = tmp_path / "warmup.json"
    legacy.write_text('{"day": "2026-11-28", "counts": {"p/new/*": 2}}')
    ledger = WarmupLedger(tmp_path / "warmup.db")  # as app.py names it; the old warmup.json beside it
    assert ledger.sent_today("p", "new") == 0 and ledger.allows("p", WARM, "google", DAY1)
    assert ledger.sent_today("p", "new") == 2
    ledger.count("p", WARM, "google", DAY1)
    assert not ledger.allows("p", WARM, "google", DAY1)
    ledger.flush()
    assert not legacy.exists() and (tmp_path / "warmup.json.imported").exists()
    # A crash between the import and the rename: the file comes back, and counts nothing twice.
    (tmp_path / "warmup.json.imported").rename(legacy)
    again = WarmupLedger(tmp_path / "warmup.db")
    assert not again.allows("p", WARM, "google", DAY1) and again.sent_today("p", "new") == 3


def test_an_unreadable_warmup_json_is_set_aside_and_the_day_counted_afresh(tmp_path: Path) -> None:
    (tmp_path / "warmup.json").write_text("{not json")
    ledger = WarmupLedger(tmp_path / "warmup.db")
    assert ledger.allows("p", WARM, "google", DAY1) and ledger.sent_today("p", "new") == 0
    assert (tmp_path / "warmup.json.unreadable").exists()


def test_ledgers_sharing_a_store_see_each_others_counts_at_each_flush(tmp_path: Path) -> None:
    shared = SqliteWarmupCounts(tmp_path / "warmup.db")
    a, b = WarmupLedger(shared), WarmupLedger(shared)
    a.count("p", WARM, "google", DAY1)
    b.count("p", WARM, "google", DAY1)
    a.flush()
    b.flush()
    assert (a.sent_today("p", "new"), b.sent_today("p", "new")) == (1, 2)
    b.count("p", WARM, "google", DAY1)
    a.flush()  # nothing of its own to hand over: nothing asked either
    b.flush()
    a.count("p", WARM, "google", DAY1)
    a.flush()
    assert a.sent_today("p", "new") == 4 and not a.allows("p", WARM, "google", DAY1)


def test_no_warming_member_no_ledger_file(tmp_path: Path) -> None:
    ledger = WarmupLedger(tmp_path / "warmup.db")
    assert ledger.allows("p", MEMBER, "google", DAY1)
    ledger.count("p", MEMBER, "google", DAY1)
    ledger.flush()
    assert list(tmp_path.iterdir()) == []


def test_with_a_shared_store_an_ended_attempts_lease_serves_the_next_and_goes_back_after_a_second() -> None:
    """Each lease is a round trip to Redis: kept SPARE_LEASE_S for the lane's next attempt, the slot is
    taken once under steady load instead of twice a message; the other node sees it held until prune."""
    throttles = MemoryThrottles()
    mine, other = (
        Shaper(shaping(rule=[{"max_connections": 1}]), throttles, keep_spares=True) for _ in range(2)
    )
    lane = mine.lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    first = lane.leases[0]
    lane.finish(0.1)
    assert throttles.leases_held(lane.key, 0.1) == 1  # kept, not given back
    theirs = other.lane("p", MEMBER, "d", 0.1)
    assert theirs.admission(0.2)[0] is Admission.BUSY  # the other node sees the slot held
    assert lane.admission(0.2)[0] is Admission.OPEN  # this node has it in hand
    lane.start(0.2)
    assert lane.leases == [first] and not lane.spares  # the same slot, no new lease
    lane.finish(0.3)
    mine.prune(0.3 + SPARE_LEASE_S / 2)
    assert throttles.leases_held(lane.key, 0.9) == 1  # not yet a second
    mine.prune(0.3 + SPARE_LEASE_S)
    assert throttles.leases_held(lane.key, 1.3) == 0 and not lane.spares
    assert theirs.admission(1.3)[0] is Admission.OPEN


def test_a_spare_lease_near_its_end_goes_back_instead_of_serving_an_attempt() -> None:
    throttles = MemoryThrottles()
    shaper = Shaper(shaping(rule=[{"max_connections": 2}]), throttles, keep_spares=True)
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    old = lane.leases[0]
    now = LEASE_TTL_S * 0.6  # the attempt ran long, unrenewed: less than half its time to live left
    lane.finish(now)
    lane.start(now)
    assert lane.leases[0] != old and throttles.leases_held(lane.key, now) == 1


def test_a_stopping_node_gives_back_every_spare_lease() -> None:
    throttles = MemoryThrottles()
    shaper = Shaper(shaping(rule=[{"max_connections": 2}]), throttles, keep_spares=True)
    lane = shaper.lane("p", MEMBER, "d", 0.0)
    lane.start(0.0)
    lane.finish(0.0)
    shaper.give_back_spares(0.0)
    assert throttles.leases_held(lane.key, 0.0) == 0


def test_in_process_throttles_keep_no_spares() -> None:
    shaper = Shaper(shaping(rule=[{"max_connections": 1}]))
    assert not shaper.keep_spares
