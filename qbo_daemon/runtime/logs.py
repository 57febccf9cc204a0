"""structlog setup: one pipeline for our own events and the standard library's, with redaction.

Every line, whether it comes from ``structlog`` or from ``logging`` (aiohttp,
asyncio), ends in one handler on the root logger, rendered by the same
renderers, so all lines share one shape. A ``logging`` record goes through the
handler, whose :class:`structlog.stdlib.ProcessorFormatter` renders it; our own
events are rendered at the end of structlog's chain and written straight to the
handler's stream under its lock (:class:`_LineWriter`), without a ``logging``
record: the record, its copy and the handler chain cost more than the line
itself, and the daemon writes one line per refresh. The processors, in order,
and why:

- ``filter_by_level`` (our events only): drop below-level events before any
  work is done; the level lives on the root ``logging`` logger, so a SIGHUP
  reload only has to call :func:`configure_logging` again.
- ``merge_contextvars``: ``bind_contextvars(account_id=...)`` puts the account
  on every line of that account's work, including aiohttp's and asyncio's.
- ``add_logger_name``, ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)``:
  who, how bad, when (ISO 8601 UTC with a ``Z``).
- ``PositionalArgumentsFormatter``, ``StackInfoRenderer`` (our events only):
  ``log.info("x %s", y)`` and ``stack_info=True`` work as in ``logging``.
- extras (stdlib records only): ``logger.info(..., extra={...})`` fields become keys.
- :func:`redact_secrets`: values under secret-looking names become ``"[redacted]"``,
  recursively, and secret query parameters and bearer credentials inside strings
  are blanked. It runs before the line is rendered, for our events and for
  ``logging``'s alike.
- Exceptions: structlog's defaults render the *local variables* of every frame,
  and locals hold tokens. JSON uses ``ExceptionDictTransformer(show_locals=False)``;
  the console uses structlog's plain traceback formatter (never locals, and no
  dependence on whether Rich happens to be installed). Exception messages get the
  same string scrubbing as everything else.
- Renderer: JSON lines, or ``ConsoleRenderer`` on a terminal.

aiohttp's default access log prints the request line, query string included,
and the OAuth callback's query carries ``code`` and ``state``: use
:class:`AccessLogger` (``AppRunner(app, access_log_class=access_logger_class(setting))``),
at the level ``[log] access`` names.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TextIO

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

from qbo_daemon.core.models import valid_account_id

REDACTED: Final = "[redacted]"

LEVELS: Final[Mapping[str, int]] = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
FORMATS: Final = ("auto", "console", "json")

_SECRET_NAMES: Final = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "tokens",
        "code",
        "code_verifier",
        "client_secret",
        "secret",
        "secrets",
        "password",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "credentials",
        "api_key",
        "key",
        "keys",
        "encryption_key",
        "state",
    }
)
_SECRET_SUFFIXES: Final = (
    "_token",
    "_tokens",
    "_secret",
    "_secrets",
    "_password",
    "_key",
    "_keys",
)
# Keys the pipeline itself owns; their values are never secrets by name.
_STRUCTURAL_KEYS: Final = frozenset(
    {"event", "level", "logger", "timestamp", "exc_info", "exception", "stack", "_record"}
)
_SECRET_QUERY: Final = re.compile(
    r"(?i)([?&;](?:code|code_verifier|state|token|access_token|refresh_token|id_token"
    r"|client_secret"
    r"|api_key|password)=)[^&;#\s\"']*"
)
_CREDENTIAL: Final = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/-]{16,}=*")
# The shortest text _CREDENTIAL can match: "basic", one blank, 16 characters.
_SHORTEST_CREDENTIAL: Final = len("basic") + 1 + 16
_MAX_DEPTH: Final = 12
_LEADING_KEYS: Final = ("timestamp", "level", "logger", "event")

# LogRecord attributes that are not ``extra`` fields: the standard ones, plus what
# ``Formatter.format`` adds once another handler has formatted the record.
_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__
) | {"message", "asctime", "taskName"}


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a value stored under ``name`` must never be logged.

    ``key_id``, ``token_type``, ``token_expires_at`` and the like are not secret.
    (Remembered per name: a line's few keys come back on every line.)
    """
    normalized = name.strip().lower().replace("-", "_")
    return normalized in _SECRET_NAMES or normalized.endswith(_SECRET_SUFFIXES)


def _scrub_text(text: str) -> str:
    # Most strings (times, ids, event names) hold neither a "=" nor a credential's
    # scheme word; the tests below are far cheaper than running the patterns. Only
    # for ASCII: the pattern's case-insensitive match also takes "ſ" for "s", "ı" for "i".
    if "=" in text:
        text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    if len(text) < _SHORTEST_CREDENTIAL:
        return text
    if text.isascii():
        lowered = text.lower()
        if "bearer" not in lowered and "basic" not in lowered:
            return text
    return _CREDENTIAL.sub(rf"\1\2{REDACTED}", text)


def _redact(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if depth >= _MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        return "[too deep]"
    if isinstance(value, Mapping):
        return {
            key: (
                REDACTED
                if is_secret_name(str(key)) and item is not None
                else _redact(item, depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact(item, depth + 1) for item in value)
    return value


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Replace the values of secret-named keys with ``"[redacted]"``, recursively.

    ``None`` stays ``None`` (that a token is absent is worth seeing). Strings
    everywhere, the event included, lose secret query parameters (``?code=…``,
    ``&state=…``) and ``Bearer``/``Basic`` credentials. Nested dicts, lists and
    tuples are copied, never changed in place.
    """
    for key, value in event_dict.items():
        if key in _STRUCTURAL_KEYS:
            if isinstance(value, str):
                event_dict[key] = _scrub_text(value)
        elif is_secret_name(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(value, 1)
    return event_dict


def _add_record_extras(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Copy a stdlib record's ``extra={...}`` fields into the event."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        for key, value in record.__dict__.items():
            if not (key in _RECORD_ATTRIBUTES or key in _STRUCTURAL_KEYS or key[:1] == "_"):
                event_dict[key] = value
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _scrub_exception(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Rendered after redaction, an exception's messages get the same string scrubbing."""
    if "exception" in event_dict:
        event_dict["exception"] = _redact(event_dict["exception"], 1)
    return event_dict


def _standard_keys_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """JSON lines read best as ``timestamp, level, logger, event, ...``."""
    head = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    return {**head, **event_dict}


def _console_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """structlog's plain traceback (no locals, ever), with the string scrubbing applied."""
    rendered = io.StringIO()
    structlog.dev.plain_traceback(rendered, exc_info)
    sio.write(_scrub_text(rendered.getvalue()))


def _renderers(format: str, colors: bool) -> list[Processor]:
    if format == "json":
        return [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _scrub_exception,
            _standard_keys_first,
            structlog.processors.JSONRenderer(),
        ]
    return [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=_console_traceback)]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _PipelineHandler(logging.StreamHandler[TextIO]):
    """The one root handler :func:`configure_logging` owns (found again by its type).

    ``renderers`` turn one of our events into its line in the configured format
    (the same ones its formatter runs for ``logging``'s records); a reload replaces
    them here, so loggers bound before it follow.
    """

    renderers: Sequence[Processor] = ()


def _render_line(handler: _PipelineHandler) -> Processor:
    """The last step of structlog's chain: the event as its line, or dropped and reported.

    A value the renderer cannot take (a dict keyed by tuples for JSON, a ``repr``
    that raises) is reported as ``logging`` reports a record it cannot format, and
    the code that logged carries on: a log line must never fail a refresh.
    """

    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        event = event_dict.get("event")
        try:
            rendered: Any = event_dict
            for renderer in handler.renderers:
                rendered = renderer(logger, method_name, rendered)
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": event}))
            raise structlog.DropEvent from None
        return rendered

    return render


class _LineWriter:
    """structlog's logger for our own events: the line it rendered goes straight to the
    pipeline handler's stream, under the handler's lock, without a ``logging`` record.

    A record, its copy in ``ProcessorFormatter`` and the handler chain cost more than
    rendering the line (one ``refresh.succeeded`` per refresh). The level still
    comes from the ``logging`` logger of the same name, so ``[log] level``, a
    reload and per-logger levels apply to these lines as to every other.
    """

    def __init__(self, name: str, handler: _PipelineHandler) -> None:
        self.name = name
        self._logger = logging.getLogger(name)
        self._handler = handler

    @property
    def disabled(self) -> bool:
        return self._logger.disabled

    def getEffectiveLevel(self) -> int:  # filter_by_level asks for it
        return self._logger.getEffectiveLevel()

    def isEnabledFor(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def write(self, line: str) -> None:
        handler = self._handler
        try:
            with handler.lock or contextlib.nullcontext():
                handler.stream.write(line + handler.terminator)
                handler.stream.flush()
        except RecursionError:
            raise
        except Exception:
            # As logging's own handlers do: a broken stream is reported, never raised
            # into the code that logged.
            handler.handleError(logging.makeLogRecord({"msg": line}))

    debug = info = warning = warn = error = exception = critical = fatal = msg = write


def _line_writers(handler: _PipelineHandler) -> Callable[..., _LineWriter]:
    # structlog asks for a logger on every call (they are not cached, for a reload's
    # sake); one writer per name serves them all until the next configure_logging.
    writers: dict[str, _LineWriter] = {}

    def factory(*args: Any) -> _LineWriter:
        # Our modules name their logger; one that does not is the daemon's.
        name = str(args[0]) if args else "qbo_daemon"
        writer = writers.get(name)
        if writer is None:
            writer = writers[name] = _LineWriter(name, handler)
        return writer

    return factory


def _our_handlers(root: logging.Logger) -> list[_PipelineHandler]:
    return [h for h in root.handlers if isinstance(h, _PipelineHandler)]


def configure_logging(format: str, level: str, *, stream: TextIO | None = None) -> None:
    """Send structlog and ``logging`` output to ``stream`` (default ``sys.stderr``).

    ``format``: ``"auto"`` (console on a terminal, JSON lines otherwise),
    ``"console"`` or ``"json"``. ``level``: ``debug``, ``info``, ``warning``,
    ``error`` or ``critical``. Calling it again (a SIGHUP reload) changes the
    level, format and stream in place; loggers already handed out follow.
    """
    fmt = format.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {format!r}; expected one of {', '.join(FORMATS)}")
    numeric_level = LEVELS.get(level.strip().lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    tty = _isatty(out)
    if fmt == "auto":
        fmt = "console" if tty else "json"

    shared = _shared_processors()
    renderers = _renderers(fmt, colors=tty)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _add_record_extras, redact_secrets],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderers,
        ],
    )

    root = logging.getLogger()
    existing = _our_handlers(root)
    if existing:
        handler = existing[0]
        handler.setStream(out)
        handler.setFormatter(formatter)
        for extra in existing[1:]:
            root.removeHandler(extra)
    else:
        handler = _PipelineHandler(out)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(numeric_level)
    handler.renderers = renderers

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            redact_secrets,
            _render_line(handler),
        ],
        logger_factory=_line_writers(handler),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reload must reach loggers bound before it.
        cache_logger_on_first_use=False,
    )
    # aiosqlite's debug lines repeat each SQL statement with its parameters (OAuth
    # states among them): keep them out whatever the level.
    logging.getLogger("aiosqlite").setLevel(max(numeric_level, logging.INFO))


def reset_logging() -> None:
    """Undo :func:`configure_logging`: remove its handler, restore structlog's defaults."""
    root = logging.getLogger()
    for handler in _our_handlers(root):
        root.removeHandler(handler)
        handler.close()
    structlog.reset_defaults()


@dataclass
class AccessLevel:
    """The ``[log] access`` setting (``info``, ``debug`` or ``off``), shared with the
    listeners' access loggers: a reload changes ``value`` and they follow."""

    value: str = "info"


# Health checks and scrapes come every few seconds: never above debug, whatever the setting.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogger(AbstractAccessLogger):
    """One ``http.request_served`` line per request: method, path without the query, status,
    duration_ms, remote, and the ``account_id`` of the route when it names one. The
    query is left out because the OAuth callback's carries ``code`` and ``state``;
    headers are left out because the API's carry keys.

    The level is ``[log] access`` (:class:`AccessLevel`): info (the default), debug,
    or off; ``PROBE_PATHS`` are logged at debug at most. Use with
    ``web.AppRunner(app, access_log_class=access_logger_class(setting))``
    (``AccessLogger`` itself logs at info).
    """

    __slots__ = ()
    setting: ClassVar[AccessLevel | None] = None

    def _level(self, path: str) -> int | None:
        value = self.setting.value if self.setting is not None else "info"
        if value == "off":
            return None
        if value == "debug" or path in PROBE_PATHS:
            return logging.DEBUG
        return logging.INFO

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        level = self._level(request.path)
        if level is None or not self.logger.isEnabledFor(level):
            return
        extra: dict[str, object] = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 3),
            "remote": request.remote,
        }
        match_info = getattr(request, "match_info", None)
        account_id = match_info.get("account_id") if match_info is not None else None
        if valid_account_id(account_id):
            extra["account_id"] = account_id
        self.logger.log(level, "http.request_served", extra=extra)

    @property
    def enabled(self) -> bool:
        """Whether any line can come out (aiohttp asks once per connection)."""
        value = self.setting.value if self.setting is not None else "info"
        if value == "off":
            return False
        return self.logger.isEnabledFor(logging.DEBUG if value == "debug" else logging.INFO)


def access_logger_class(setting: AccessLevel) -> type[AccessLogger]:
    """An :class:`AccessLogger` that follows ``setting`` (aiohttp makes the instances)."""

    class ConfiguredAccessLogger(AccessLogger):
        __slots__ = ()

    ConfiguredAccessLogger.setting = setting
    return ConfiguredAccessLogger
