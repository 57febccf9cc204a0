"""The Intuit client against answers no careful Intuit would send.

Each answer is played by the shipped simulator's ``raw`` fault: exactly the
status, headers and body given, over real HTTP. A 200 that carries sound
tokens is accepted whatever its other values say (its refresh token may be a
rotated one, the old one already dead), with every lifetime clamped to what
Intuit documents; nothing else ever escapes as anything but an
:class:`~qbo_daemon.core.errors.IntuitError`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest

from qbo_daemon.config.load import IntuitConfig
from qbo_daemon.core.errors import InvalidGrantError, TransientIntuitError
from qbo_daemon.core.models import Secret
from qbo_daemon.intuit.client import IntuitClient, TokenResult
from qbo_daemon.simulator.app import RAW_KIND, IntuitSimulator, RawAnswer, SimulatorSettings
from tests.manual_clock import ManualClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(seconds=3600)  # Intuit's documented expires_in
REFRESH_MAX = timedelta(seconds=8_726_400)  # documented x_refresh_token_expires_in (101 days)
HARD_MAX = timedelta(days=5 * 365 + 2)  # five years
GARBLED_ACCESS = timedelta(minutes=5)  # how long a garbled expires_in is taken to be
DEFAULT_REFRESH = timedelta(days=100)  # an absent or garbled x_refresh_token_expires_in
RETRY_AFTER_MAX = 86_400.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[IntuitSimulator]:
    simulator = IntuitSimulator(SimulatorSettings(), clock)
    await simulator.start()
    yield simulator
    await simulator.close()


@pytest.fixture
async def client(sim: IntuitSimulator, clock: ManualClock) -> AsyncIterator[IntuitClient]:
    config = IntuitConfig(
        environment="production",
        client_id=sim.settings.client_id,
        client_secret=Secret(sim.settings.client_secret),
        redirect_uri="http://127.0.0.1:3000/accounts/oauth2_callback",
        scopes=("com.intuit.quickbooks.accounting",),
        authorization_endpoint=sim.authorization_endpoint,
        token_endpoint=sim.token_endpoint,
        revocation_endpoint=sim.revocation_endpoint,
        timeout=timedelta(seconds=10),
    )
    async with aiohttp.ClientSession() as session:
        yield IntuitClient(session, config, clock)


def answer(
    sim: IntuitSimulator, status: int, body: bytes | str, headers: dict[str, str] | None = None
) -> None:
    sim.inject(RAW_KIND, raw=RawAnswer.make(status, list((headers or {}).items()), body))


def token_body(**fields: Any) -> str:
    return json.dumps({"access_token": "at-new", "refresh_token": "rt-rotated", **fields})


async def refreshed(client: IntuitClient) -> TokenResult:
    return await client.refresh("rt-old-value")


# -- lifetimes ------------------------------------------------------------------------------

ENORMOUS = "9" * 5000  # int() refuses more than 4,300 digits


@pytest.mark.parametrize(
    ("raw", "life"),
    [
        ('"\u00b2"', GARBLED_ACCESS),  # superscript two: isdigit() is True, int() raises
        ('"\u0661\u0662"', GARBLED_ACCESS),  # Arabic-Indic 12: int() takes it
        ('"\uff11\uff12"', GARBLED_ACCESS),  # full-width 12
        ('"1e3"', GARBLED_ACCESS),
        ('"3600.0"', GARBLED_ACCESS),
        ('"0"', GARBLED_ACCESS),
        ("0", GARBLED_ACCESS),
        ("NaN", GARBLED_ACCESS),
        ('"1800"', timedelta(seconds=1800)),
        ('" 1800\\t"', timedelta(seconds=1800)),
        ("1800.5", timedelta(seconds=1800.5)),
        ("86400", HOUR),  # longer than Intuit documents: clamped
        ("1" + "0" * 30, HOUR),  # timedelta overflows
        ("1e300", HOUR),
        ("Infinity", HOUR),
        (ENORMOUS, HOUR),  # json.loads refuses it as an int
        (f'"{ENORMOUS}"', HOUR),
    ],
    ids=[
        "superscript",
        "arabic-indic",
        "full-width",
        "exponent-text",
        "decimal-text",
        "zero-text",
        "zero",
        "nan",
        "text",
        "padded-text",
        "fraction",
        "a-day",
        "1e30",
        "1e300",
        "infinity",
        "5000-digit-number",
        "5000-digit-text",
    ],
)
async def test_any_expires_in_keeps_the_rotated_token(
    sim: IntuitSimulator, client: IntuitClient, raw: str, life: timedelta
) -> None:
    body = '{"access_token":"at-new","refresh_token":"rt-rotated","expires_in":' + raw + "}"
    answer(sim, 200, body)
    tokens = (await refreshed(client)).tokens
    assert (tokens.access_token, tokens.refresh_token) == ("at-new", "rt-rotated")
    assert tokens.token_expires_at - tokens.obtained_at == life


@pytest.mark.parametrize(
    ("field", "raw", "life"),
    [
        ("x_refresh_token_expires_in", '"\u00b2"', DEFAULT_REFRESH),
        ("x_refresh_token_expires_in", "1" + "0" * 30, REFRESH_MAX),
        ("x_refresh_token_expires_in", "1e300", REFRESH_MAX),
        ("x_refresh_token_expires_in", ENORMOUS, REFRESH_MAX),
        ("x_refresh_token_expires_in", "99999999", REFRESH_MAX),
        ("x_refresh_token_expires_in", "8726400", REFRESH_MAX),
        ("x_refresh_token_hard_expires_in", '"\u00b2"', None),
        ("x_refresh_token_hard_expires_in", "1" + "0" * 30, HARD_MAX),
        ("x_refresh_token_hard_expires_in", "Infinity", HARD_MAX),
        ("x_refresh_token_hard_expires_in", f'"{ENORMOUS}"', HARD_MAX),
        ("x_refresh_token_hard_expires_in", "157000000", timedelta(seconds=157_000_000)),
    ],
)
async def test_any_refresh_token_lifetime_keeps_the_rotated_token(
    sim: IntuitSimulator, client: IntuitClient, field: str, raw: str, life: timedelta | None
) -> None:
    body = '{"access_token":"at-new","refresh_token":"rt-rotated","' + field + '":' + raw + "}"
    answer(sim, 200, body)
    tokens = (await refreshed(client)).tokens
    assert tokens.refresh_token == "rt-rotated"
    assert tokens.token_expires_at - tokens.obtained_at == HOUR  # absent: Intuit's hour
    if field == "x_refresh_token_expires_in":
        assert tokens.refresh_token_expires_at - tokens.obtained_at == life
    else:
        hard = tokens.refresh_token_hard_expires_at
        assert (hard - tokens.obtained_at if hard else None) == life


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1e12", None),  # not delta-seconds: as if absent
        ("1000000000000", RETRY_AFTER_MAX),
        ("9" * 4000, RETRY_AFTER_MAX),
        ("\u00b2", None),
        ("\u0661\u0662", None),
        ("0x10", None),
        ("+5", None),
        ("5.", None),
        ("3", 3.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_MAX),
        ("Sat, 01 Jan 0001 00:00:00 +0100", 0.0),  # read as 2001: past
        ("Fri, 31 Dec 9999 23:59:59 -2359", None),  # past year 9999 in UTC
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # RFC 850
        ("Sun Nov  6 08:49:37 1994", 0.0),  # asctime
        ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),  # int too large for C
        ("Mon, 01 Jan 2024 00:00:00 +99999999999999999999", None),
        (format_datetime(START - timedelta(days=400), usegmt=True), 0.0),
        (format_datetime(START + timedelta(seconds=90), usegmt=True), 90.0),
    ],
)
async def test_any_retry_after_is_read_into_a_sane_range(
    sim: IntuitSimulator, client: IntuitClient, header: str, expected: float | None
) -> None:
    answer(sim, 503, "<html>busy</html>", {"Retry-After": header, "Content-Type": "text/html"})
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert caught.value.retry_after == expected


# -- bodies, words and headers ---------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 500])
async def test_a_body_nested_too_deep_to_parse_is_transient(
    sim: IntuitSimulator, client: IntuitClient, status: int
) -> None:
    answer(sim, status, "[" * 200_000 + "]" * 200_000)
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert caught.value.status == status


async def test_an_oversized_body_is_transient(sim: IntuitSimulator, client: IntuitClient) -> None:
    answer(sim, 200, token_body(padding="x" * (2 * 1024 * 1024)))
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert caught.value.code == "body_too_large"


async def test_a_small_compressed_body_that_inflates_past_the_limit_is_transient(
    sim: IntuitSimulator, client: IntuitClient
) -> None:
    """A few kilobytes on the wire (its Content-Length) that decompress to megabytes."""
    bomb = gzip.compress(token_body(padding="x" * (4 * 1024 * 1024)).encode())
    assert len(bomb) < 64 * 1024
    answer(sim, 200, bomb, {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert caught.value.code == "body_too_large"


@pytest.mark.parametrize(
    "value",
    ["at new", "at\u0000", "at-\ud800", "at-\u00e9", "at\n", "", 42],
    ids=["space", "nul", "lone-surrogate", "non-ascii", "newline", "empty", "number"],
)
async def test_an_access_token_that_is_not_one_printable_word_is_refused(
    sim: IntuitSimulator, client: IntuitClient, value: object
) -> None:
    # Such a value cannot be a token Intuit issued; a lone surrogate cannot even be
    # encrypted for the database. The answer is transient: the old token is kept.
    answer(sim, 200, token_body(access_token=value))
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert (caught.value.status, caught.value.code) == (200, "no_access_token")


@pytest.mark.parametrize(
    "value",
    ["rt new", "rt-\ud800", "rt-\u00e9", "rt\n", "", 42, None],
    ids=["space", "lone-surrogate", "non-ascii", "newline", "empty", "number", "null"],
)
async def test_a_refresh_token_that_is_not_one_printable_word_reads_as_absent(
    sim: IntuitSimulator, client: IntuitClient, value: object
) -> None:
    # The access token is sound: take it, and keep presenting the refresh token we have.
    answer(sim, 200, token_body(refresh_token=value))
    tokens = (await refreshed(client)).tokens
    assert (tokens.access_token, tokens.refresh_token) == ("at-new", "rt-old-value")


async def test_intuit_tid_and_error_words_are_kept_only_when_sane(
    sim: IntuitSimulator, client: IntuitClient
) -> None:
    body = json.dumps({"error": "invalid_grant", "error_description": "bad\u202e\ud800\n\tx"})
    answer(sim, 400, body, {"intuit_tid": "t" * 129})
    with pytest.raises(InvalidGrantError) as grant:
        await refreshed(client)
    assert grant.value.intuit_tid is None
    assert str(grant.value).endswith("(invalid_grant: bad?? x)")

    odd = json.dumps({"error": "x" * 65 + "\ud800", "error_description": "y"})
    answer(sim, 500, odd, {"intuit_tid": "1-abc-def"})
    with pytest.raises(TransientIntuitError) as caught:
        await refreshed(client)
    assert (caught.value.code, caught.value.intuit_tid) == ("http_500", "1-abc-def")
    str(caught.value).encode("utf-8")  # no lone surrogate reaches a log line or a row
