"""Account events: always logged, optionally POSTed (signed) to the host app.

Events: ``account.connected``, ``account.reconnect_needed``,
``account.recovered``, ``account.disconnected``, ``account.hard_expiry_approached``,
``account.realm_changed`` (a reconnect moved the account to another company,
as its authorize-url request allowed; ``data.realm_id`` and
``data.previous_realm_id``).
Each is logged at once through ``structlog.get_logger("qbo_daemon.events")``
with the event name as the log event. When a webhook URL is configured the
event is also queued and delivered in the background: :meth:`emit` never
blocks and never fails the caller.

Delivery
--------
``POST <url>`` with ``Content-Type: application/json`` and the body::

    {"id": "<uuid4>", "event": "account.reconnect_needed", "account_id": "acme",
     "occurred_at": "2025-01-31T12:00:00.000000Z", "data": {...}}

``id`` is the same on every retry of one event: receivers deduplicate on it.
Deliveries may arrive out of order; order by ``occurred_at``. A field whose
name looks secret (contains ``token``, ``secret``, ``code``, ``key``,
``password`` or ``credential``) is never sent, nor logged: it is dropped with a
warning. A 2xx answer is success; anything else (redirects included, they are
not followed), a connection error or a timeout is retried with exponential
backoff and full jitter, up to ``max_attempts`` times.

Headers: ``Qbo-Daemon-Event: <event>``, ``Qbo-Daemon-Delivery: <id>`` and ::

    Qbo-Daemon-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>

The signature is HMAC-SHA256 keyed with the shared secret (its UTF-8 bytes)
over ``f"{t}.".encode() + raw_body``: the timestamp, a full stop and the body
exactly as received (verify before parsing the JSON). ``t`` is set anew on
each attempt. A receiver recomputes the HMAC, compares in constant time, and
rejects a ``t`` more than 5 minutes from its own clock, which bounds replays::

    import hashlib
    import hmac
    import time

    def verify(secret: bytes, header: str, body: bytes, tolerance: int = 300) -> bool:
        fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
        t = fields.get("t", "")
        if not t.isdigit() or abs(time.time() - int(t)) > tolerance:
            return False
        expected = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, fields.get("v1", ""))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import aiohttp
import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.models import Secret, iso
from qbo_daemon.runtime.supervisor import Supervisor

EVENTS = frozenset(
    {
        "account.connected",
        "account.reconnect_needed",
        "account.recovered",
        "account.disconnected",
        "account.hard_expiry_approached",
        "account.realm_changed",
    }
)
# Events an operator must act on are logged as warnings, the rest as info.
# A connection the user must redo is an error an operator must see; an expiry ahead is a warning.
_ERROR_EVENTS = frozenset({"account.reconnect_needed"})
_WARNING_EVENTS = frozenset({"account.hard_expiry_approached", "account.realm_changed"})
_SECRET_NAME = re.compile(r"token|secret|code|key|password|credential", re.IGNORECASE)
# Names the log call itself uses, or that change what structlog does.
_RESERVED_NAMES = frozenset({"event", "account_id", "exc_info", "stack_info"})

SIGNATURE_HEADER = "Qbo-Daemon-Signature"
EVENT_HEADER = "Qbo-Daemon-Event"
DELIVERY_HEADER = "Qbo-Daemon-Delivery"

_events_log = structlog.get_logger("qbo_daemon.events")
_log = structlog.get_logger("qbo_daemon.runtime.webhooks")


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Qbo-Daemon-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class _Delivery:
    id: str
    event: str
    account_id: str
    body: bytes


class WebhookNotifier:
    """Logs account events and, when ``url`` is set, delivers them signed.

    ``session`` is the process's shared client session; the notifier never
    closes it. Deliveries run on ``concurrency`` worker tasks, started on the
    first queued event; at most ``queue_size`` events wait, and the oldest is
    dropped (with a warning) to make room. With a ``supervisor``, a worker that
    ends before :meth:`aclose` ends the daemon.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        url: str | None,
        secret: Secret | None,
        *,
        timeout: float = 10.0,
        clock: Clock,
        max_attempts: int = 8,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        queue_size: int = 10_000,
        concurrency: int = 4,
        rng: random.Random | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        if url is not None:
            if session is None:
                raise ValueError("a webhook url needs a client session")
            if not secret:
                raise ValueError("a webhook url needs a signing secret")
        if max_attempts < 1 or queue_size < 1 or concurrency < 1:
            raise ValueError("max_attempts, queue_size and concurrency must be at least 1")
        self._session = session
        self._url = url
        self._key = secret.reveal().encode() if secret else b""
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._supervisor = supervisor
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._in_flight = 0

    @property
    def enabled(self) -> bool:
        """Whether events are delivered over HTTP (they are always logged)."""
        return self._url is not None

    @property
    def pending(self) -> int:
        """Events queued and not yet picked up by a worker."""
        return self._queue.qsize()

    def emit(self, event: str, account_id: str, **fields: object) -> None:
        """Log ``event`` now and, if enabled, queue its delivery. Never blocks.

        Raises ValueError only for an event name outside :data:`EVENTS` (a bug).
        """
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        data = self._clean(event, fields)
        if event in _ERROR_EVENTS:
            log = _events_log.error
        elif event in _WARNING_EVENTS:
            log = _events_log.warning
        else:
            log = _events_log.info
        log(event, account_id=account_id, **data)
        if self._url is None:
            return
        if self._closed:
            _log.warning("webhook.late_event_dropped", webhook_event=event, account_id=account_id)
            return
        delivery_id = str(uuid.uuid4())
        payload = {
            "id": delivery_id,
            "event": event,
            "account_id": account_id,
            "occurred_at": iso(self._clock.now()),
            "data": data,
        }
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        self._enqueue(_Delivery(delivery_id, event, account_id, body))

    async def aclose(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop taking events, wait up to ``timeout`` s for the queue to drain, then cancel.

        The bound is a parameter, not the caller's ``asyncio.timeout``: cancelling
        this coroutine from outside would leave the workers running.
        """
        self._closed = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        undelivered = self._queue.qsize() + self._in_flight
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if undelivered:
            _log.warning("webhook.queue_abandoned", undelivered=undelivered)

    def _clean(self, event: str, fields: dict[str, object]) -> dict[str, Any]:
        """Fields safe to log and send: secret-looking names and Secret values are dropped."""
        data: dict[str, Any] = {}
        for name, value in fields.items():
            if _SECRET_NAME.search(name) or isinstance(value, Secret) or name in _RESERVED_NAMES:
                _log.warning("webhook.field_refused", webhook_event=event, field=name)
                continue
            if isinstance(value, datetime):
                data[name] = iso(value)
            elif isinstance(value, Enum):
                data[name] = value.value
            else:
                data[name] = value
        return data

    def _enqueue(self, delivery: _Delivery) -> None:
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self._queue.task_done()
            _log.warning(
                "webhook.oldest_dropped",
                webhook_event=dropped.event,
                account_id=dropped.account_id,
                delivery_id=dropped.id,
            )
        self._queue.put_nowait(delivery)
        self._start_workers()

    def _start_workers(self) -> None:
        if self._workers:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the next emit from inside the loop starts them
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-worker-{n}")
            for n in range(self._concurrency)
        ]
        if self._supervisor is not None:
            for task in self._workers:
                self._supervisor.watch(task.get_name(), task, ended_by_owner=lambda: self._closed)

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._in_flight += 1
            try:
                await self._deliver(delivery)
            except Exception:
                # A bug here must not cost a worker: the queue would stall.
                _log.exception(
                    "webhook.delivery_crashed",
                    webhook_event=delivery.event,
                    account_id=delivery.account_id,
                    delivery_id=delivery.id,
                )
            finally:
                self._in_flight -= 1
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        assert self._session is not None
        assert self._url is not None
        for attempt in range(1, self._max_attempts + 1):
            timestamp = int(self._clock.now().timestamp())
            headers = {
                "Content-Type": "application/json",
                EVENT_HEADER: delivery.event,
                DELIVERY_HEADER: delivery.id,
                SIGNATURE_HEADER: sign(self._key, timestamp, delivery.body),
            }
            try:
                async with self._session.post(
                    self._url,
                    data=delivery.body,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The type only: some messages quote the URL, which may carry a secret.
                failure = type(exc).__name__
            else:
                if 200 <= status < 300:
                    return
                failure = f"HTTP {status}"
            if attempt == self._max_attempts:
                break
            delay = self._backoff(attempt)
            _log.info(
                "webhook.retry_scheduled",
                webhook_event=delivery.event,
                account_id=delivery.account_id,
                delivery_id=delivery.id,
                attempt=attempt,
                error=failure,
                retry_in=round(delay, 3),
            )
            await self._clock.sleep(delay)
        _log.warning(
            "webhook.delivery_abandoned",
            webhook_event=delivery.event,
            account_id=delivery.account_id,
            delivery_id=delivery.id,
            attempts=self._max_attempts,
            error=failure,
        )

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial · 2^(attempt-1))]."""
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (attempt - 1))
        return self._rng.uniform(0.0, ceiling)
