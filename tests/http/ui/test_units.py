"""The status page's pure parts: session signing, the sign-in throttle, wording, charts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from qbo_daemon.core.models import AccountStatus, Secret
from qbo_daemon.http.ui import session as sessions
from qbo_daemon.http.ui.charts import HEIGHT, WIDTH, due_chart, durations_chart, outcomes_chart
from qbo_daemon.http.ui.html import safe_next
from qbo_daemon.http.ui.throttle import SignInThrottle
from qbo_daemon.http.ui.views import explain, relative
from qbo_daemon.store.repository import Attempt
from qbo_daemon.store.status_queries import MinuteCount, MinuteOutcomes

NOW = datetime(2026, 11, 29, 12, 0, 30, tzinfo=UTC)
KEY = Secret("the-first-api-key-0123456789")
OTHER = Secret("another-api-key-abcdefghijkl")


def test_a_session_verifies_under_its_key_until_it_expires() -> None:
    cookie, issued = sessions.issue(KEY, NOW)
    assert KEY.reveal() not in cookie
    found = sessions.verify(cookie, [OTHER, KEY], NOW + timedelta(hours=7))
    assert found is not None
    assert found.session_id == issued.session_id
    assert found.csrf_ok(issued.csrf_token())
    assert sessions.verify(cookie, [OTHER, KEY], NOW + sessions.SESSION_TTL) is None
    assert sessions.verify(cookie, [OTHER], NOW) is None  # its key was removed


@pytest.mark.parametrize("position", [3, 16, 30, 45, -1])
def test_any_changed_character_voids_a_session(position: int) -> None:
    cookie, _ = sessions.issue(KEY, NOW)
    flipped = "0" if cookie[position] != "0" else "1"
    forged = cookie[:position] + flipped + cookie[position + 1 :]
    if position == -1:
        forged = cookie[:-1] + flipped
    assert sessions.verify(forged, [KEY], NOW) is None


def test_csrf_tokens_belong_to_one_session_and_one_key() -> None:
    _, one = sessions.issue(KEY, NOW)
    _, two = sessions.issue(KEY, NOW)
    assert one.csrf_token() != two.csrf_token()
    assert not one.csrf_ok(two.csrf_token())
    assert not one.csrf_ok(None)
    assert not one.csrf_ok("")
    assert "the-first" not in repr(one)  # the key never shows


def test_matching_key_finds_the_presented_key_only() -> None:
    assert sessions.matching_key([OTHER, KEY], KEY.reveal()) is KEY
    assert sessions.matching_key([OTHER, KEY], KEY.reveal()[:-1]) is None
    assert sessions.matching_key([Secret("")], "") is None


def test_the_throttle_locks_an_address_after_its_failures_then_forgets() -> None:
    clock = [100.0]
    throttle = SignInThrottle(window=60, max_failures=3, clock=lambda: clock[0])
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") is None
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == pytest.approx(60)
    assert throttle.retry_after("10.0.0.2") is None  # others are not locked out
    clock[0] += 61
    assert throttle.retry_after("10.0.0.1") is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/accounts?status=expired", "/ui/accounts?status=expired"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/ui/", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/v1/accounts", "/ui/"),
        (None, "/ui/"),
    ],
)
def test_redirects_after_a_form_stay_on_the_status_page(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_relative_times() -> None:
    assert relative(NOW, NOW) == "now"
    assert relative(NOW + timedelta(seconds=40), NOW) == "in 40 s"
    assert relative(NOW + timedelta(minutes=4, seconds=10), NOW) == "in 4 min"
    assert relative(NOW - timedelta(hours=3), NOW) == "3 h ago"
    assert relative(NOW + timedelta(days=100), NOW) == "in 100 d"
    assert relative(None, NOW) == "—"


def test_trouble_in_words() -> None:
    assert explain(AccountStatus.ACTIVE, None, 0) is None
    revoked = explain(AccountStatus.NEEDS_RECONNECT, "Intuit refused the grant (invalid_grant)", 1)
    assert revoked is not None
    assert "invalid_grant" in revoked.headline
    assert "new connect link" in revoked.advice
    outage = explain(
        AccountStatus.EXPIRED, "Intuit token call answered HTTP 503 with an HTML page", 3
    )
    assert outage is not None
    assert "3 refresh attempts failed" in outage.headline
    assert "outage at Intuit" in outage.headline
    assert "503" in outage.advice


def test_the_outcome_chart_puts_successes_above_and_failures_below() -> None:
    minutes = [
        MinuteOutcomes(NOW.replace(second=0) - timedelta(minutes=2), 4, 0),
        MinuteOutcomes(NOW.replace(second=0), 2, 2),
        MinuteOutcomes(NOW - timedelta(hours=5), 9, 9),  # outside the window: left out
    ]
    chart = outcomes_chart(minutes, end=NOW, window=timedelta(hours=1))
    ok = [b for b in chart.bars if b.kind == "ok"]
    failed = [b for b in chart.bars if b.kind == "failed"]
    assert len(ok) == 2
    assert len(failed) == 1
    assert all(b.y + b.height == pytest.approx(chart.baseline) for b in ok)
    assert all(b.y == chart.baseline for b in failed)
    assert all(b.x >= 0 and b.x + b.width <= WIDTH for b in chart.bars)
    assert ok[-1].x > ok[0].x  # newer to the right
    assert chart.ticks[-1].label == "now"


def test_the_due_chart_and_the_durations_chart_stay_inside() -> None:
    due = due_chart(
        [MinuteCount(NOW.replace(second=0) + timedelta(minutes=m), m + 1) for m in range(0, 61)],
        now=NOW,
        within=timedelta(hours=1),
    )
    assert all(b.x >= 0 and b.x + b.width <= WIDTH + 0.01 for b in due.bars)
    assert all(b.y >= 0 and b.y + b.height <= HEIGHT for b in due.bars)
    attempts = [
        Attempt("a", NOW - timedelta(seconds=s), "success" if s % 2 else "transient", s * 10.0)
        for s in range(1, 30)
    ]
    chart = durations_chart(attempts)
    assert len(chart.bars) == 29
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest is chart.bars[0]  # the oldest, 290 ms, is drawn first
    assert tallest.title.endswith("success, 290 ms")
    assert chart.bars[1].kind == "failed"
