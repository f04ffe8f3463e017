"""Prometheus metrics fed from the event stream. Never a recipient or a message id as a label."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from postmux import __version__
from postmux.events.types import Event, EventType

_RESULT = {
    EventType.DELIVERY: "delivered",
    EventType.TRANSIENT_FAILURE: "deferred",
    EventType.BOUNCE: "bounced",
    EventType.EXPIRATION: "expired",
}


class _LiveGauges(Collector):
    """Gauges read at scrape time from whoever owns the state (queue counts, member state)."""

    def __init__(self, sample: Callable[[], Iterable[Metric]]) -> None:
        self._sample = sample

    def collect(self) -> Iterable[Metric]:
        return self._sample()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "postmux_messages_received", "Messages accepted (answered 250)", registry=self.registry
        )
        self.recipients_received = Counter(
            "postmux_recipients_received", "Recipients accepted", registry=self.registry
        )
        self.deliveries = Counter(
            "postmux_deliveries",
            "Recipient outcomes per attempt",
            ["pool", "member", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "postmux_delivery_duration_seconds",
            "Time of one delivery attempt (one SMTP transaction)",
            ["pool", "member"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.shaping_changes = Counter(
            "postmux_shaping_changes",
            "Suspensions, cuts and recoveries of a member's lanes (the destination is in the event log)",
            ["pool", "member"],
            registry=self.registry,
        )
        self.breaker_trips = Counter(
            "postmux_breaker_trips",
            "Lanes the reputation breaker paused (too many hard bounces or complaints; destination: the log)",
            ["pool", "member"],
            registry=self.registry,
        )
        self.held = Counter(
            "postmux_messages_held",
            "Messages set aside until an operator releases them (held recipients: postmux_queue_messages)",
            ["reason"],
            registry=self.registry,
        )
        self.unsubscribes = Counter(
            "postmux_unsubscribes",
            "One-click unsubscribes recorded (POST /unsubscribe/TOKEN; who and what: the Unsubscribe events)",
            registry=self.registry,
        )
        self.webhook_requests = Counter(
            "postmux_webhook_requests",
            "Webhook requests per endpoint by result: 2xx (acknowledged), 3xx/4xx/5xx, timeout, error",
            ["endpoint", "result"],
            registry=self.registry,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, process_max_fds, ...
        ProcessCollector(registry=self.registry)
        self.build_info = Gauge(
            "postmux_build_info",
            "Always 1; the labels say which postmux runs, on which Python",
            ["version", "python"],
            registry=self.registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.dsns = Counter(
            "postmux_dsns_sent",
            "Null-sender recipients delivered (RFC 5321 4.5.5): the DSNs postmux wrote, and any a client "
            "handed in",
            ["pool"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "postmux_ingress_refusals",
            "Replies that refused a client, by protocol and reason: the SMTP reply code and enhanced code "
            '("550 5.7.1"), the HTTP status ("422"). With [smtp] workers, only the main process\'s',
            ["protocol", "reason"],
            registry=self.registry,
        )
        self.failures = Counter(
            "postmux_failures",
            "Bounced and deferred recipients by bounce class, per member and provider (google, microsoft, "
            "...; a destination no provider claims counts as other)",
            ["pool", "member", "provider", "bounce_class", "result"],
            registry=self.registry,
        )
        self.suppressed = Counter(
            "postmux_suppressed_recipients",
            "Recipients stopped by the suppression list: refused (RCPT, the API) or dropped (Suppressed "
            "events), by the source of the entry (bounce, complaint, unsubscribe, manual)",
            ["action", "source"],
            registry=self.registry,
        )
        # The provider names of [shaping] (shipped and configured): a bounded set, so a label.
        self.providers: frozenset[str] = frozenset()
        self._last_reception = ""
        self._last_held = ""
        # The children of the two series every attempt touches, by their labels: prometheus_client's
        # `labels()` takes a lock and checks and builds the key at each call (~3 µs).
        self._delivery_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}

    def add_live(self, sample: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_LiveGauges(sample))

    def __call__(self, event: Event) -> None:
        if event.type is EventType.RECEPTION:
            # Reception events come one per recipient, back to back per message: a new id is a new message.
            self.recipients_received.inc()
            if event.id != self._last_reception:
                self._last_reception = event.id
                self.received.inc()
            return
        if event.type is EventType.HELD:
            # One event per recipient, back to back and at one time per hold of a message.
            hold = f"{event.id}@{event.timestamp}"
            if hold != self._last_held:
                self._last_held = hold
                self.held.labels(event.tags.get("reason", "")).inc()
            return
        if event.type is EventType.SUPPRESSED:
            self.count_suppressed("drop", event.tags.get("suppression_source", ""))
            return
        if event.type is EventType.UNSUBSCRIBE:
            self.unsubscribes.inc()
            return
        if event.type is EventType.SHAPING_CHANGED:
            self.shaping_changes.labels(event.pool, event.member).inc()
            if event.tags.get("by") == "breaker":
                self.breaker_trips.labels(event.pool, event.member).inc()
            return
        result = _RESULT.get(event.type)
        if result is None:
            return
        key = (event.pool, event.member, result)
        child = self._delivery_children.get(key)
        if child is None:
            child = self._delivery_children[key] = self.deliveries.labels(*key)
        child.inc()
        if result == "delivered" and event.sender == "":
            self.dsns.labels(event.pool).inc()
        if event.bounce_class:
            provider = self.provider_of(event.queue)
            self.failures.labels(event.pool, event.member, provider, event.bounce_class, result).inc()

    def count_refusal(self, protocol: str, reason: str) -> None:
        self.refusals.labels(protocol, reason).inc()

    def provider_of(self, queue: str) -> str:
        """The provider of a queue ("pool/destination"): its destination when that is a provider's name,
        else "other" (a destination that is a domain must never become a label)."""
        destination = queue.partition("/")[2]
        return destination if destination in self.providers else "other"

    def count_suppressed(self, action: str, source: str) -> None:
        self.suppressed.labels(action, source).inc()

    def count_webhook_request(self, endpoint: str, result: str) -> None:
        self.webhook_requests.labels(endpoint, result).inc()

    def observe_attempt(self, pool: str, member: str, seconds: float) -> None:
        child = self._duration_children.get((pool, member))
        if child is None:
            child = self._duration_children[(pool, member)] = self.duration.labels(pool, member)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
