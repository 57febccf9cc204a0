"""Builds the object graph and runs the daemon's lifecycle.

Start-up: take the database lock, open and check the database (a wrong key
fails here, naming the key id), start the HTTP client, the listeners and the
scheduler (which loads every account, overdue ones due at once), then tell
systemd READY=1. Shutdown, in reverse: stop dispatching refreshes and let the
in-flight ones finish and persist (``shutdown_grace``), close the listeners,
flush webhooks, close the HTTP client and the database, release the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import replace

import aiohttp
import structlog
from aiohttp import web

from qbo_daemon.config.load import Config
from qbo_daemon.core.clock import Clock, SystemClock
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import AccountStatus
from qbo_daemon.engine.accounts import AccountService
from qbo_daemon.engine.connect import ConnectFlow
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.engine.services import Services
from qbo_daemon.engine.tokens import TokenService
from qbo_daemon.http.api import make_api_app
from qbo_daemon.http.callback import make_callback_app
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.runtime.logs import AccessLogger, configure_logging
from qbo_daemon.runtime.systemd import SystemdNotifier
from qbo_daemon.runtime.webhooks import WebhookNotifier
from qbo_daemon.store.keys import load_cipher
from qbo_daemon.store.repository import DatabaseLock, Storage

log = structlog.get_logger("qbo_daemon.runtime.daemon")

# aiohttp waits up to this long for open requests when a listener closes (it
# can take twice as long); the systemd unit's TimeoutStopSec counts on it.
HTTP_SHUTDOWN_TIMEOUT = 10.0
STATUS_INTERVAL = 15.0


class EventRelay:
    """Forwards account events to the current notifier, which a reload may replace."""

    def __init__(self, target: WebhookNotifier) -> None:
        self.target = target

    def emit(self, event: str, account_id: str, **fields: object) -> None:
        self.target.emit(event, account_id, **fields)


class Daemon:
    """One running qbo-daemon. ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._systemd = SystemdNotifier(environ if environ is not None else {})
        self.ready = asyncio.Event()
        self.services: Services | None = None
        self._relay: EventRelay | None = None
        self._session: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        async with AsyncExitStack() as stack:
            if config.refresh.shutdown_grace <= config.intuit.timeout:
                log.warning(
                    "config.shutdown_grace_short",
                    shutdown_grace=config.refresh.shutdown_grace.total_seconds(),
                    intuit_timeout=config.intuit.timeout.total_seconds(),
                    detail="a refresh Intuit answers during a shutdown may be cut off and a "
                    "rotated refresh token lost; keep [refresh] shutdown_grace above it",
                )
            lock = DatabaseLock(config.storage.path)
            lock.acquire()
            stack.callback(lock.release)
            cipher = load_cipher(config.storage.encryption_keys, config.storage.path)
            storage = await Storage.open(
                config.storage.path, cipher, attempts_keep=config.storage.attempts_keep
            )
            stack.push_async_callback(storage.close)
            await storage.verify_keys()

            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(100, config.refresh.concurrency * 2)),
                timeout=aiohttp.ClientTimeout(total=config.intuit.timeout.total_seconds()),
            )
            self._session = session
            stack.push_async_callback(session.close)
            metrics = Metrics()
            notifier = self._make_notifier(config, session)
            relay = EventRelay(notifier)
            self._relay = relay
            stack.push_async_callback(self._close_notifier)

            services = self._build(config, storage, session, metrics, relay)
            self.services = services
            runners = await self._start_listeners(services)
            for runner in reversed(runners):
                stack.push_async_callback(runner.cleanup)
            stack.push_async_callback(
                services.scheduler.stop, config.refresh.shutdown_grace.total_seconds()
            )
            scheduled = await services.scheduler.start()

            log.info(
                "daemon.ready",
                accounts_scheduled=scheduled,
                api=config.api.url,
                callback=f"http://{config.callback.host}:{config.callback.port}"
                f"{config.callback.path}",
            )
            self._systemd.ready(await self._status_text(services))
            # After READY=1: systemd arms the watchdog only once start-up is complete.
            watchdog = asyncio.create_task(self._systemd.watchdog(stop), name="watchdog")
            status = asyncio.create_task(self._report_status(services, stop), name="status")
            self.ready.set()
            await stop.wait()
            log.info("daemon.stopping")
            self._systemd.stopping()
            for task in (watchdog, status):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        log.info("daemon.stopped")

    def _build(
        self,
        config: Config,
        storage: Storage,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        events: EventRelay,
    ) -> Services:
        clock = self.clock
        refresh = config.refresh
        intuit = IntuitClient(session, config.intuit, clock)
        refresher = Refresher(
            storage, intuit, clock, metrics, lead=refresh.lead, concurrency=refresh.concurrency
        )
        scheduler = Scheduler(
            refresher,
            storage,
            clock,
            metrics,
            events,
            concurrency=refresh.concurrency,
            backoff_initial=refresh.backoff_initial,
            backoff_max=refresh.backoff_max,
            invalid_client_retry=refresh.invalid_client_retry,
            hard_expiry_warning=refresh.hard_expiry_warning,
        )
        return Services(
            config=config,
            clock=clock,
            storage=storage,
            intuit=intuit,
            refresher=refresher,
            scheduler=scheduler,
            connect=ConnectFlow(
                storage, intuit, scheduler, clock, metrics, events, lead=refresh.lead
            ),
            tokens=TokenService(
                storage, scheduler, clock, wait=refresh.token_wait, lead=refresh.lead
            ),
            accounts=AccountService(storage, intuit, scheduler, clock, events, lead=refresh.lead),
            metrics=metrics,
            events=events,
        )

    async def _start_listeners(self, services: Services) -> list[web.AppRunner]:
        config = services.config
        apps = [
            (make_api_app(services), config.api.host, config.api.port),
            (
                make_callback_app(
                    services.connect, config.callback.path, config.callback.success_redirect
                ),
                config.callback.host,
                config.callback.port,
            ),
        ]
        runners = []
        for app, host, port in apps:
            runner = web.AppRunner(
                app, access_log_class=AccessLogger, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT
            )
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                for started in runners:
                    await started.cleanup()
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        return runners

    def _make_notifier(self, config: Config, session: aiohttp.ClientSession) -> WebhookNotifier:
        notify = config.notify
        return WebhookNotifier(
            session if notify.webhook_url else None,
            notify.webhook_url,
            notify.secret,
            timeout=notify.timeout.total_seconds(),
            clock=self.clock,
        )

    async def _close_notifier(self) -> None:
        if self._relay is not None:
            await self._relay.target.aclose(5.0)

    async def _report_status(self, services: Services, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_INTERVAL)
            if stop.is_set():
                return  # no STATUS= after STOPPING=1
            try:
                self._systemd.status(await self._status_text(services))
            except Exception as exc:  # a boundary: status reporting must never stop the daemon
                log.warning("daemon.status_failed", error=str(exc))

    async def _status_text(self, services: Services) -> str:
        counts = await services.storage.status_counts()
        services.metrics.set_accounts(
            {status.value: counts.get(status.value, 0) for status in AccountStatus}
        )
        return (
            f"{counts.get('active', 0)} active, {counts.get('expired', 0)} expired, "
            f"{counts.get('needs_reconnect', 0)} need reconnect, "
            f"{services.scheduler.in_flight} refreshing"
        )

    async def reload(self, config: Config) -> None:
        """Apply what can change live (SIGHUP); name what needs a restart."""
        services = self.services
        old = self.config
        cipher = None
        if services is not None:
            # Before anything changes: keys that cannot read the stored rows fail the reload.
            cipher = load_cipher(config.storage.encryption_keys, old.storage.path)
            await services.storage.verify_keys(cipher)
        configure_logging(config.log.format, config.log.level)
        restart_needed = [
            name
            for name, before, after in (
                ("[api] listen", (old.api.host, old.api.port), (config.api.host, config.api.port)),
                (
                    "[callback] listen",
                    (old.callback.host, old.callback.port),
                    (config.callback.host, config.callback.port),
                ),
                ("[storage] path", old.storage.path, config.storage.path),
                ("[storage] url", old.storage.url, config.storage.url),
                ("[intuit] redirect_uri", old.intuit.redirect_uri, config.intuit.redirect_uri),
                ("[refresh] lead", old.refresh.lead, config.refresh.lead),
                (
                    "[callback] success_redirect",
                    old.callback.success_redirect,
                    config.callback.success_redirect,
                ),
                (
                    "[refresh] shutdown_grace",
                    old.refresh.shutdown_grace,
                    config.refresh.shutdown_grace,
                ),
                (
                    "[storage] attempts_keep",
                    old.storage.attempts_keep,
                    config.storage.attempts_keep,
                ),
            )
            if before != after
        ]
        if services is not None and cipher is not None:
            services.storage.cipher = cipher
            services.intuit.config = config.intuit
            services.scheduler.set_concurrency(config.refresh.concurrency)
            services.scheduler.backoff_initial = config.refresh.backoff_initial.total_seconds()
            services.scheduler.backoff_max = config.refresh.backoff_max.total_seconds()
            services.scheduler.invalid_client_retry = (
                config.refresh.invalid_client_retry.total_seconds()
            )
            services.scheduler.hard_expiry_warning = config.refresh.hard_expiry_warning
            services.tokens.wait = config.refresh.token_wait
            services.scheduler.resume()
            if config.notify != old.notify and self._relay is not None and self._session:
                previous = self._relay.target
                self._relay.target = self._make_notifier(config, self._session)
                await previous.aclose(5.0)
            # Settings that cannot change live keep their old values.
            config = replace(
                config,
                api=replace(config.api, host=old.api.host, port=old.api.port),
                callback=old.callback,
                storage=replace(
                    config.storage,
                    path=old.storage.path,
                    url=old.storage.url,
                    attempts_keep=old.storage.attempts_keep,
                ),
                refresh=replace(
                    config.refresh, lead=old.refresh.lead, shutdown_grace=old.refresh.shutdown_grace
                ),
                intuit=replace(config.intuit, redirect_uri=old.intuit.redirect_uri),
            )
            services.intuit.config = config.intuit
            services.config = config
        self.config = config
        log.info(
            "daemon.reloaded",
            log_level=config.log.level,  # "level" is the record's own level
            api_key_count=len(config.api.keys),  # "*_keys" would be redacted by name
            encryption_key_count=len(config.storage.encryption_keys),
            restart_needed=restart_needed or None,
        )
