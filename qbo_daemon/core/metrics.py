"""Prometheus metrics, on a registry of their own (never the global default one).

One :class:`Metrics` is built by the daemon and handed to whoever records;
``GET /metrics`` serves :meth:`Metrics.render`. Label values are small fixed
vocabularies (outcomes, error classes, statuses): never an account id.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from qbo_daemon.core.models import AccountStatus

# Distinct qbo_intuit_errors_total{class} values kept before the rest count as "other".
MAX_ERROR_CLASSES = 32
_LABEL_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")

# A token call normally takes 0.1–2 s; the top buckets catch slow timeouts.
REFRESH_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# How late a timer-driven refresh started: from 1 ms (on time) to 5 min
# (the old cron's worst case, which this daemon exists to beat).
REFRESH_LATENESS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class _NextDueCollector(Collector):
    """``qbo_next_refresh_due_seconds``, absent while no timer is set.

    Timers are set for the refreshes due within the scheduler's window (10
    minutes): a daemon whose next refresh is further away has none.

    A plain Gauge cannot be absent; a made-up value (0, NaN, -1) would
    mislead an alert, so the series simply disappears instead.
    """

    def __init__(self) -> None:
        self.value: float | None = None

    def collect(self) -> Iterable[Metric]:
        if self.value is None:
            return []
        return [
            GaugeMetricFamily(
                "qbo_next_refresh_due_seconds",
                "Seconds until the earliest refresh due within the next 10 minutes (negative: "
                "overdue); absent when none is due that soon.",
                value=self.value,
            )
        ]


class Metrics:
    """Every metric the daemon exports, each behind a method named for what happened."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._attempts = Counter(
            "qbo_refresh_attempts",
            "Token refresh attempts, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            "qbo_refresh_duration_seconds",
            "Duration of token refresh attempts, whatever their outcome.",
            buckets=REFRESH_DURATION_BUCKETS,
            registry=registry,
        )
        self._lateness = Histogram(
            "qbo_refresh_lateness_seconds",
            "How long after its reconnect_token_at a timer-driven refresh started.",
            buckets=REFRESH_LATENESS_BUCKETS,
            registry=registry,
        )
        self._retries = Counter(
            "qbo_refresh_retries",
            "Refresh retries scheduled after a transient failure.",
            registry=registry,
        )
        self._intuit_errors = Counter(
            "qbo_intuit_errors",
            "Failed calls to Intuit, by error class.",
            ["class"],
            registry=registry,
        )
        self._callbacks = Counter(
            "qbo_callback",
            "OAuth callbacks handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._accounts = Gauge(
            "qbo_accounts",
            "Accounts, by status.",
            ["status"],
            registry=registry,
        )
        self._refreshing = Gauge(
            "qbo_refreshes_in_flight",
            "Calls to Intuit's token endpoint in flight now (at most [refresh] concurrency).",
            registry=registry,
        )
        self._up = Gauge(
            "qbo_up",
            "1 while the daemon is healthy (Intuit accepts our client credentials), else 0.",
            registry=registry,
        )
        self._node = Gauge(
            "qbo_cluster_node",
            "1, labelled with this daemon's node id (several daemons on one PostgreSQL).",
            ["node_id"],
            registry=registry,
        )
        self._heartbeats = Gauge(
            "qbo_cluster_heartbeat_age_seconds",
            "Seconds since each daemon on the shared database last beat, as this one read it.",
            ["node_id"],
            registry=registry,
        )
        self._claims = Counter(
            "qbo_cluster_claims",
            "Claims this daemon asked of the shared database before a call to Intuit, by "
            "result: claimed, busy (another node holds it), not_due (another node refreshed it).",
            ["result"],
            registry=registry,
        )
        self._error_classes: set[str] = set()
        self._next_due = _NextDueCollector()
        registry.register(self._next_due)
        # Memory, CPU, open fds. Reads /proc/stat once for the boot time: under
        # systemd's ProcSubset=pid it would silently export nothing.
        ProcessCollector(registry=registry)

        self.set_accounts({})
        self._up.set(1)

    def refresh_attempt(self, outcome: str, duration_seconds: float) -> None:
        """One refresh attempt finished (``outcome`` e.g. success, transient, invalid_grant)."""
        self._attempts.labels(outcome).inc()
        self._duration.observe(max(duration_seconds, 0.0))

    def claim(self, result: str) -> None:
        """Several daemons: one claim asked of the database (claimed, busy or not_due)."""
        self._claims.labels(result).inc()

    def refresh_lateness(self, seconds: float) -> None:
        """A timer-driven refresh started ``seconds`` after it was due; early counts as 0."""
        self._lateness.observe(max(seconds, 0.0))

    def retry_scheduled(self) -> None:
        self._retries.inc()

    def intuit_error(self, error_class: str) -> None:
        """A call to Intuit failed; ``error_class`` e.g. ``TransientIntuitError`` or a code.

        The class may be Intuit's own ``error`` code, which a proxy or an outage page
        could make anything: an odd-looking one, or any past the first
        :data:`MAX_ERROR_CLASSES` distinct ones, is counted as ``other``.
        """
        if not _LABEL_VALUE.fullmatch(error_class):
            error_class = "other"
        elif error_class not in self._error_classes:
            if len(self._error_classes) >= MAX_ERROR_CLASSES:
                error_class = "other"
            else:
                self._error_classes.add(error_class)
        self._intuit_errors.labels(error_class).inc()

    def callback_outcome(self, outcome: str) -> None:
        self._callbacks.labels(outcome).inc()

    def set_accounts(self, counts: Mapping[str, int]) -> None:
        """Account counts by status; every known status is exported, 0 when absent.

        Raises ValueError for a status that :class:`AccountStatus` does not know.
        """
        known = {status.value for status in AccountStatus}
        unknown = set(counts) - known
        if unknown:
            raise ValueError(f"unknown account status(es): {sorted(unknown)}")
        for status in AccountStatus:
            self._accounts.labels(status.value).set(counts.get(status.value, 0))

    def set_next_due(self, seconds: float | None) -> None:
        """Seconds until the earliest due refresh; None (nothing scheduled) hides the series."""
        self._next_due.value = seconds

    def set_cluster(self, node_id: str, heartbeat_ages: Mapping[str, float]) -> None:
        """This daemon's node id, and every node's heartbeat age (gone ones vanish)."""
        self._node.clear()
        self._node.labels(node_id).set(1)
        self._heartbeats.clear()
        for node, age in heartbeat_ages.items():
            self._heartbeats.labels(node).set(age)

    def count_refreshing(self, in_flight: Callable[[], int]) -> None:
        """``qbo_refreshes_in_flight`` reads ``in_flight()`` when scraped.

        Read at scrape time, not set around every call: a storm makes
        thousands of calls a second, and a scrape comes every few seconds.
        """
        self._refreshing.set_function(in_flight)

    def set_healthy(self, ok: bool) -> None:
        self._up.set(1 if ok else 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type.

        ``generate_latest`` with its default escaping writes the classic text
        format, which is the content type prometheus-client itself pairs it
        with when the scraper asks for nothing newer.
        """
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
