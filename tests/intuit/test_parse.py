"""The parser of Intuit's values is total: whatever it is given, it answers in range.

Properties over arbitrary input (hypothesis), plus the edges by name. The
client-level behaviour over real HTTP is in ``test_hostile_values.py``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from qbo_daemon.intuit import parse

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MAXIMA = [
    parse.ACCESS_TOKEN_MAX_LIFETIME,
    parse.REFRESH_TOKEN_MAX_LIFETIME,
    parse.HARD_EXPIRY_MAX_LIFETIME,
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.from_regex(r"\s*-?[0-9]{0,40}(\.[0-9]*)?(e[0-9]+)?\s*", fullmatch=True),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=100, deadline=None)
@given(value=json_values, maximum=st.sampled_from(MAXIMA))
@example(value=6.598208090912549e-266, maximum=parse.ACCESS_TOKEN_MAX_LIFETIME)  # rounds to 0
@example(value=1e-7, maximum=parse.ACCESS_TOKEN_MAX_LIFETIME)
def test_a_lifetime_is_none_or_in_range(value: object, maximum: timedelta) -> None:
    life = parse.lifetime(value, maximum)
    assert life is None or timedelta(0) < life <= maximum
    parse.after(NOW, life.total_seconds() if life else 0.0)


@settings(max_examples=100, deadline=None)
@given(
    value=st.text()
    | st.from_regex(r"[ \t]*[0-9]{1,30}(\.[0-9]{0,5})?[ \t]*", fullmatch=True)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S %z")),
    now=st.datetimes(timezones=st.just(UTC)),
)
def test_a_retry_after_is_none_or_in_range(value: str, now: datetime) -> None:
    seconds = parse.retry_after(value, now)
    assert seconds is None or 0 <= seconds <= parse.RETRY_AFTER_MAX.total_seconds()


@given(
    instant=st.datetimes(timezones=st.just(UTC)),
    seconds=st.floats(allow_nan=True, allow_infinity=True),
)
def test_after_never_overflows(instant: datetime, seconds: float) -> None:
    later = parse.after(instant, seconds)
    assert later >= instant
    assert later <= max(instant, parse.LATEST)
    later.timestamp()  # and back: the scheduler keeps due times as timestamps
    datetime.fromtimestamp(min(later, parse.LATEST).timestamp(), UTC)


@given(body=st.binary(max_size=200) | st.text().map(str.encode))
def test_a_body_is_an_object_or_none(body: bytes) -> None:
    data = parse.json_object(body)
    assert data is None or isinstance(data, dict)


def test_the_edges_by_name() -> None:
    hour = parse.ACCESS_TOKEN_MAX_LIFETIME
    assert hour == timedelta(seconds=3600)
    assert parse.lifetime("\u00b2", hour) is None  # "²".isdigit() is True
    assert parse.lifetime("\u0661\u0662", hour) is None  # int() reads Arabic-Indic 12
    assert parse.lifetime(" 60\t", hour) == timedelta(seconds=60)
    assert parse.lifetime("\u00a060", hour) is None  # only ASCII blanks are trimmed
    assert parse.lifetime(10**400, hour) == hour
    assert parse.lifetime("9" * 10_000, hour) == hour
    assert parse.lifetime(float("inf"), hour) == hour
    assert parse.lifetime(True, hour) is None
    assert parse.lifetime(-1, hour) is None
    assert parse.lifetime("-1", hour) is None

    assert parse.retry_after("1e12", NOW) is None
    assert parse.retry_after("12", NOW) == 12.0
    assert parse.retry_after("0.5", NOW) == 0.5
    assert parse.retry_after("1" * 400, NOW) == parse.RETRY_AFTER_MAX.total_seconds()
    assert parse.retry_after(None, NOW) is None

    data = parse.json_object(b'{"a": ' + b"7" * 5000 + b', "b": -' + b"7" * 5000 + b"}")
    assert data == {"a": float("inf"), "b": float("-inf")}
    assert parse.json_object(b"[" * 100_000) is None
    assert parse.json_object(json.dumps([1]).encode()) is None

    assert parse.token("AB11-x.y_z~") == "AB11-x.y_z~"
    assert parse.token("a b") is None
    assert parse.intuit_tid("1-66c3c5a0-2c4b") == "1-66c3c5a0-2c4b"
    assert parse.intuit_tid("\udcff") is None  # aiohttp's surrogateescape for a bad byte
    assert parse.error_code("invalid_grant") == "invalid_grant"
    assert parse.error_code("Service Unavailable") is None
    assert parse.text("a\n\tb\u202e\ud800" + "c" * 500) == "a b??" + "c" * 195
