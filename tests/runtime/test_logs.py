from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from qbo_daemon.runtime.logs import (
    REDACTED,
    AccessLogger,
    configure_logging,
    is_secret_name,
    redact_secrets,
    reset_logging,
)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A logger as the daemon's modules take one (``structlog.get_logger(__name__)``)."""
    return structlog.stdlib.get_logger(name or "qbo_daemon")


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    reset_logging()
    structlog.contextvars.clear_contextvars()
    yield
    reset_logging()
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _fail_holding_a_secret() -> None:
    payload = {"refresh_token": "LOCAL-SECRET-VALUE"}
    raise RuntimeError(f"refresh failed after {len(payload)} attempts")


def test_json_lines_carry_timestamp_level_event(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    before = datetime.now(UTC)
    get_logger("qbo_daemon.engine.scheduler").info("refresh.succeeded", failure_count=0)
    (line,) = _lines(stream)
    assert line["event"] == "refresh.succeeded"
    assert line["level"] == "info"
    assert line["logger"] == "qbo_daemon.engine.scheduler"
    assert line["failure_count"] == 0
    assert line["timestamp"].endswith("Z")
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


def test_positional_arguments_are_formatted(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    get_logger().info("%d accounts due", 3)
    assert _lines(stream)[0]["event"] == "3 accounts due"
    assert _lines(stream)[0]["logger"] == "qbo_daemon"


def test_auto_is_json_off_a_terminal_and_console_on_one() -> None:
    plain = io.StringIO()
    configure_logging("auto", "info", stream=plain)
    get_logger().info("daemon.started", accounts=2)
    assert _lines(plain)[0]["event"] == "daemon.started"

    tty = _TTY()
    configure_logging("auto", "info", stream=tty)
    get_logger().info("daemon.started", accounts=2)
    text = tty.getvalue()
    assert "daemon.started" in text
    assert "accounts" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    assert plain.getvalue().count("daemon.started") == 1


def test_unknown_format_or_level_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info", stream=stream)
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "verbose", stream=stream)


def test_reconfigure_changes_level_for_existing_loggers(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    log = get_logger("qbo_daemon.web").bind(component="api")
    log.debug("hidden.1")
    log.info("shown.1")

    configure_logging("json", "debug", stream=stream)
    log.debug("shown.2")
    logging.getLogger("aiohttp.server").debug("shown.3")

    configure_logging("JSON", "Warning", stream=stream)
    log.info("hidden.2")
    log.warning("shown.4")

    events = [line["event"] for line in _lines(stream)]
    assert events == ["shown.1", "shown.2", "shown.3", "shown.4"]
    assert _lines(stream)[1]["component"] == "api"
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    assert sum(1 for h in ours if h.stream is stream) == 1


def test_a_named_loggers_own_level_applies_to_our_lines(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    quiet = logging.getLogger("qbo_daemon.refresh")
    quiet.setLevel(logging.WARNING)
    try:
        get_logger("qbo_daemon.refresh").info("hidden")
        get_logger("qbo_daemon.refresh").warning("shown.1")
        get_logger("qbo_daemon.api").info("shown.2")
        quiet.disabled = True
        get_logger("qbo_daemon.refresh").error("hidden.too")
    finally:
        quiet.setLevel(logging.NOTSET)
        quiet.disabled = False
    assert [line["event"] for line in _lines(stream)] == ["shown.1", "shown.2"]


class _BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("the disk is gone")


def test_a_broken_stream_never_raises_into_the_code_that_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info", stream=_BrokenStream())
    token = "-".join(("SECRET", "AT"))  # the report shows the calling line's source
    get_logger("qbo_daemon.refresh").info("refresh.succeeded", access_token=token)
    logging.getLogger("aiohttp.client").warning("stdlib too")
    # Reported as logging's own handlers report it, the line redacted before it was written.
    reported = capsys.readouterr().err
    assert reported.count("OSError: the disk is gone") == 2
    assert "[redacted]" in reported
    assert "SECRET-AT" not in reported


def test_a_value_the_renderer_cannot_take_is_reported_and_never_raised(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info", stream=stream)
    log = get_logger("qbo_daemon.refresh")
    log.info("refresh.succeeded", counts={("a", "b"): 1})  # JSON keys must be text
    log.info("refresh.next")
    assert [line["event"] for line in _lines(stream)] == ["refresh.next"]
    reported = capsys.readouterr().err
    assert "--- Logging error ---" in reported
    assert "TypeError" in reported


def test_a_logger_bound_before_a_reload_follows_the_new_format(stream: io.StringIO) -> None:
    console = io.StringIO()
    configure_logging("console", "info", stream=console)
    bound = get_logger("qbo_daemon.web").bind(component="api")
    configure_logging("json", "info", stream=stream)  # a SIGHUP reload
    bound.warning("after.reload")
    assert console.getvalue() == ""
    [line] = _lines(stream)
    assert (line["event"], line["component"]) == ("after.reload", "api")


def test_reconfigure_can_switch_stream_and_format(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    console = io.StringIO()
    configure_logging("console", "info", stream=console)
    get_logger().info("after.switch")
    assert stream.getvalue() == ""
    assert "after.switch" in console.getvalue()


def test_contextvars_reach_structlog_and_stdlib_lines(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    with structlog.contextvars.bound_contextvars(account_id="acct-7"):
        get_logger().info("refresh.started")
        logging.getLogger("aiohttp.client").warning("connection reset")
    get_logger().info("idle")
    first, second, third = _lines(stream)
    assert first["account_id"] == "acct-7"
    assert second["account_id"] == "acct-7"
    assert second["logger"] == "aiohttp.client"
    assert "account_id" not in third


async def test_contextvars_are_per_task(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)

    async def work(account_id: str) -> None:
        structlog.contextvars.bind_contextvars(account_id=account_id)
        await asyncio.sleep(0)
        get_logger().info("refresh.started")

    await asyncio.gather(work("a"), work("b"))
    assert sorted(line["account_id"] for line in _lines(stream)) == ["a", "b"]


@pytest.mark.parametrize(
    "name",
    [
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "code",
        "client_secret",
        "secret",
        "password",
        "authorization",
        "Authorization",
        "api_key",
        "X-Api-Key",
        "key",
        "encryption_key",
        "state",
        "new_refresh_token",
        "db_password",
        "webhook_secret",
        "encryption_keys",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "key_id",
        "key_ids",
        "primary_key_id",
        "token_expires_at",
        "refresh_token_expires_at",
        "token_type",
        "failure_count",
        "status",
        "status_code",
        "account_id",
        "realm_id",
        "intuit_tid",
        "x_refresh_token_expires_in",
        "event",
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redaction_top_level_and_nested(stream: io.StringIO) -> None:
    configure_logging("json", "debug", stream=stream)
    nested = {
        "client_secret": "SECRET-CS",
        "items": [{"api_key": "SECRET-AK", "name": "first"}, ("plain-value", {"key": "SECRET-K"})],
        "headers": {"Authorization": "Basic SECRET-BASIC", "Accept": "application/json"},
        "deep": {"deeper": {"new_refresh_token": "SECRET-DEEP"}},
    }
    get_logger().info(
        "token.stored",
        access_token="SECRET-AT",
        refresh_token="SECRET-RT",
        state="SECRET-STATE",
        code="SECRET-CODE",
        id_token=None,
        key_id="0123456789ab",
        token_type="bearer",
        token_expires_at="2026-01-01T00:00:00Z",
        failure_count=2,
        body=nested,
    )
    output = stream.getvalue()
    for secret in ["SECRET-CS", "SECRET-AK", "SECRET-K", "SECRET-BASIC", "SECRET-DEEP"]:
        assert secret not in output
    for secret in ["SECRET-AT", "SECRET-RT", "SECRET-STATE", "SECRET-CODE"]:
        assert secret not in output
    (line,) = _lines(stream)
    assert line["access_token"] == REDACTED
    assert line["state"] == REDACTED
    assert line["id_token"] is None
    assert line["key_id"] == "0123456789ab"
    assert line["token_type"] == "bearer"
    assert line["token_expires_at"] == "2026-01-01T00:00:00Z"
    assert line["failure_count"] == 2
    body = line["body"]
    assert body["client_secret"] == REDACTED
    assert body["items"][0] == {"api_key": REDACTED, "name": "first"}
    assert body["items"][1] == ["plain-value", {"key": REDACTED}]
    assert body["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert body["deep"]["deeper"]["new_refresh_token"] == REDACTED
    # the caller's objects are not changed
    assert nested["client_secret"] == "SECRET-CS"


def test_redaction_scrubs_query_strings_and_bearer_credentials() -> None:
    event: dict[str, Any] = {
        "event": "GET /cb?code=QS-SECRET&state=ST-SECRET&realmId=4620816365 HTTP/1.1",
        "detail": ["Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abcdefgh.ijklmnop"],
        "note": "token_type bearer",
    }
    out = redact_secrets(None, "info", event)
    assert out["event"] == (f"GET /cb?code={REDACTED}&state={REDACTED}&realmId=4620816365 HTTP/1.1")
    assert out["detail"] == [f"Authorization: Bearer {REDACTED}"]
    assert out["note"] == "token_type bearer"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("BEARER abcdefghijklmnop", f"BEARER {REDACTED}"),  # the shortest that is one
        ("bearer abcdefghijklmno", "bearer abcdefghijklmno"),  # one character short
        ("proxy said: bAsIc\tQWxhZGRpbjpvcGVuIHNlc2FtZQ==", f"proxy said: bAsIc\t{REDACTED}"),
        # Case-insensitive matching also takes the long s and the dotless i.
        ("Baſic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", f"Baſic {REDACTED}"),
        ("bearer\u00a0abcdefghijklmnopq", f"bearer\u00a0{REDACTED}"),
        ("Basıc QWxhZGRpbjpvcGVuIHNlc2FtZQ==", f"Basıc {REDACTED}"),
    ],
)
def test_redaction_finds_credentials_in_any_case_and_length(text: str, expected: str) -> None:
    assert redact_secrets(None, "info", {"event": "x", "detail": text})["detail"] == expected


def test_exception_locals_never_reach_json(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    try:
        _fail_holding_a_secret()
    except RuntimeError:
        get_logger().exception("refresh.crashed")
    output = stream.getvalue()
    assert "LOCAL-SECRET-VALUE" not in output
    (line,) = _lines(stream)
    assert line["level"] == "error"
    (stack,) = line["exception"]
    assert stack["exc_type"] == "RuntimeError"
    assert stack["exc_value"] == "refresh failed after 1 attempts"
    assert stack["frames"][-1]["name"] == "_fail_holding_a_secret"


def test_json_keys_lead_with_timestamp_level_logger_event(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    get_logger("qbo_daemon.x").info("ordered", account_id="a", failure_count=1)
    keys = list(json.loads(stream.getvalue()))
    assert keys[:4] == ["timestamp", "level", "logger", "event"]


def test_exception_messages_are_scrubbed(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    try:
        raise ValueError("bad callback /cb?code=EXC-SECRET&state=x")
    except ValueError:
        get_logger().exception("callback.failed")
    assert "EXC-SECRET" not in stream.getvalue()
    assert _lines(stream)[0]["exception"][0]["exc_value"].startswith("bad callback /cb?code=")

    console = io.StringIO()
    configure_logging("console", "info", stream=console)
    try:
        raise ValueError("bad callback /cb?code=EXC-SECRET&state=x")
    except ValueError:
        get_logger().exception("callback.failed")
    assert "ValueError: bad callback /cb?code=" in console.getvalue()
    assert "EXC-SECRET" not in console.getvalue()


def test_exception_locals_never_reach_console() -> None:
    stream = _TTY()
    configure_logging("console", "info", stream=stream)
    try:
        _fail_holding_a_secret()
    except RuntimeError:
        get_logger().exception("refresh.crashed")
    output = stream.getvalue()
    assert "refresh.crashed" in output
    assert "RuntimeError: refresh failed after 1 attempts" in output
    assert "_fail_holding_a_secret" in output
    assert "LOCAL-SECRET-VALUE" not in output


def test_structlog_default_would_leak_the_local() -> None:
    """The guard above is meaningful: structlog's own default renders locals."""
    try:
        _fail_holding_a_secret()
    except RuntimeError:
        event = structlog.processors.dict_tracebacks(None, "error", {"exc_info": sys.exc_info()})
    assert "LOCAL-SECRET-VALUE" in json.dumps(event, default=repr)


def test_stdlib_exception_locals_never_reach_output(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    try:
        _fail_holding_a_secret()
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    assert "LOCAL-SECRET-VALUE" not in stream.getvalue()
    (line,) = _lines(stream)
    assert line["logger"] == "asyncio"
    assert line["exception"][0]["exc_type"] == "RuntimeError"


def test_stdlib_records_share_the_pipeline(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    logging.getLogger("aiohttp.access").info(
        "%s %s", "GET", "/healthz", extra={"status": 200, "refresh_token": "SECRET-EXTRA"}
    )
    logging.getLogger("aiohttp.access").debug("below the level")
    assert "SECRET-EXTRA" not in stream.getvalue()
    (line,) = _lines(stream)
    assert line["event"] == "GET /healthz"
    assert line["logger"] == "aiohttp.access"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert line["status"] == 200
    assert line["refresh_token"] == REDACTED
    assert not {"msg", "args", "lineno", "_record", "_from_structlog"} & line.keys()


async def _serve_and_get(stream: io.StringIO, runner: web.AppRunner) -> None:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/cb?code=SECRETCODE&state=S") as response,
        ):
            assert response.status == 200
            assert await response.text() == "ok"
        for _ in range(200):
            if "/cb" in stream.getvalue():
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()


def _app() -> web.Application:
    async def callback(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/cb", callback)
    return app


async def test_access_logger_drops_the_query(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    await _serve_and_get(stream, web.AppRunner(_app(), access_log_class=AccessLogger))
    assert "SECRETCODE" not in stream.getvalue()
    (line,) = [line for line in _lines(stream) if line["event"] == "http.request_served"]
    assert line["logger"] == "aiohttp.access"
    assert line["method"] == "GET"
    assert line["path"] == "/cb"
    assert line["status"] == 200
    assert line["remote"] == "127.0.0.1"
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0


async def test_default_access_log_is_scrubbed_as_a_safety_net(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    await _serve_and_get(stream, web.AppRunner(_app()))
    assert "SECRETCODE" not in stream.getvalue()
    assert "/cb?code=" in stream.getvalue()


def test_access_logger_enabled_follows_level(stream: io.StringIO) -> None:
    access = AccessLogger(logging.getLogger("aiohttp.access"), "")
    configure_logging("json", "info", stream=stream)
    assert access.enabled
    configure_logging("json", "warning", stream=stream)
    assert not access.enabled


def test_reset_removes_the_handler(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    configure_logging("json", "info", stream=stream)
    reset_logging()
    logging.getLogger("qbo_daemon").warning("after reset")
    assert stream.getvalue() == ""
