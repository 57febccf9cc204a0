"""The rendered exposition, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import AccountStatus

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    body, _ = metrics.render()
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_render_content_type_and_defaults() -> None:
    metrics = Metrics()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert body.endswith(b"\n")
    found = samples(metrics)
    assert value(found, "qbo_up") == 1.0
    assert value(found, "qbo_refreshes_in_flight") == 0.0
    assert value(found, "qbo_refresh_retries_total") == 0.0
    for status in AccountStatus:
        assert value(found, "qbo_accounts", status=status.value) == 0.0
    # Nothing scheduled yet: the series is absent rather than a made-up number.
    assert not any(name == "qbo_next_refresh_due_seconds" for name, _ in found)


def test_own_registry_not_the_global_one() -> None:
    first, second = Metrics(), Metrics()
    first.retry_scheduled()
    assert first.registry is not second.registry
    assert value(samples(second), "qbo_refresh_retries_total") == 0.0
    assert REGISTRY.get_sample_value("qbo_refresh_retries_total") is None


def test_refresh_attempts_and_duration() -> None:
    metrics = Metrics()
    metrics.refresh_attempt("success", 0.3)
    metrics.refresh_attempt("success", 1.2)
    metrics.refresh_attempt("transient", 31.0)
    found = samples(metrics)
    assert value(found, "qbo_refresh_attempts_total", outcome="success") == 2.0
    assert value(found, "qbo_refresh_attempts_total", outcome="transient") == 1.0
    assert value(found, "qbo_refresh_duration_seconds_count") == 3.0
    assert value(found, "qbo_refresh_duration_seconds_sum") == pytest.approx(32.5)
    assert value(found, "qbo_refresh_duration_seconds_bucket", le="0.5") == 1.0
    assert value(found, "qbo_refresh_duration_seconds_bucket", le="2.5") == 2.0
    assert value(found, "qbo_refresh_duration_seconds_bucket", le="30.0") == 2.0
    assert value(found, "qbo_refresh_duration_seconds_bucket", le="+Inf") == 3.0


def test_lateness_buckets_span_1ms_to_5min() -> None:
    metrics = Metrics()
    metrics.refresh_lateness(0.0004)
    metrics.refresh_lateness(-2.0)  # fired early (clock jump): counted as on time
    metrics.refresh_lateness(4.0)
    metrics.refresh_lateness(299.0)
    metrics.refresh_lateness(900.0)
    found = samples(metrics)
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in found
        if name == "qbo_refresh_lateness_seconds_bucket"
    )
    assert bounds[0] == 0.001
    assert bounds[-2:] == [300.0, float("inf")]
    assert value(found, "qbo_refresh_lateness_seconds_bucket", le="0.001") == 2.0
    assert value(found, "qbo_refresh_lateness_seconds_bucket", le="5.0") == 3.0
    assert value(found, "qbo_refresh_lateness_seconds_bucket", le="300.0") == 4.0
    assert value(found, "qbo_refresh_lateness_seconds_bucket", le="+Inf") == 5.0
    assert value(found, "qbo_refresh_lateness_seconds_sum") == pytest.approx(1203.0004)


def test_counters() -> None:
    metrics = Metrics()
    metrics.retry_scheduled()
    metrics.retry_scheduled()
    metrics.intuit_error("InvalidGrantError")
    metrics.intuit_error("TransientIntuitError")
    metrics.intuit_error("TransientIntuitError")
    metrics.callback_outcome("connected")
    metrics.callback_outcome("bad_state")
    metrics.callback_outcome("bad_state")
    found = samples(metrics)
    assert value(found, "qbo_refresh_retries_total") == 2.0
    assert value(found, "qbo_intuit_errors_total", **{"class": "InvalidGrantError"}) == 1.0
    assert value(found, "qbo_intuit_errors_total", **{"class": "TransientIntuitError"}) == 2.0
    assert value(found, "qbo_callback_total", outcome="connected") == 1.0
    assert value(found, "qbo_callback_total", outcome="bad_state") == 2.0


def test_accounts_gauge_covers_every_status() -> None:
    metrics = Metrics()
    metrics.set_accounts({"active": 5, AccountStatus.NEEDS_RECONNECT: 2})
    found = samples(metrics)
    assert value(found, "qbo_accounts", status="active") == 5.0
    assert value(found, "qbo_accounts", status="needs_reconnect") == 2.0
    assert value(found, "qbo_accounts", status="expired") == 0.0
    assert value(found, "qbo_accounts", status="disconnected") == 0.0
    # A later count replaces the earlier one; a status that vanished goes back to 0.
    metrics.set_accounts({"expired": 1})
    found = samples(metrics)
    assert value(found, "qbo_accounts", status="active") == 0.0
    assert value(found, "qbo_accounts", status="expired") == 1.0


def test_unknown_status_is_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="zombie"):
        metrics.set_accounts({"zombie": 1})


def test_gauges() -> None:
    metrics = Metrics()
    metrics.set_next_due(42.5)
    in_flight = [3]  # read when scraped
    metrics.count_refreshing(lambda: in_flight[0])
    metrics.set_healthy(False)
    found = samples(metrics)
    assert value(found, "qbo_next_refresh_due_seconds") == 42.5
    assert value(found, "qbo_refreshes_in_flight") == 3.0
    assert value(found, "qbo_up") == 0.0
    metrics.set_next_due(-1.5)
    metrics.set_healthy(True)
    in_flight[0] = 0
    found = samples(metrics)
    assert value(found, "qbo_next_refresh_due_seconds") == -1.5
    assert value(found, "qbo_refreshes_in_flight") == 0.0
    assert value(found, "qbo_up") == 1.0
    metrics.set_next_due(None)
    assert value(samples(metrics), "qbo_next_refresh_due_seconds") is None
