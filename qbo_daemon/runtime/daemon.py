"""Builds the object graph and runs the daemon's lifecycle.

Start-up: take the database lock, open and check the database (a wrong key
fails here, naming the key id), start the HTTP client, the listeners and the
scheduler (which loads every account, overdue ones due at once), then tell
systemd READY=1. From then on a :class:`Supervisor` watches the long-lived
tasks (the refresh dispatcher, the database writer, the listeners, the webhook
workers, the watchdog, the status reporter, the reloader): one that ends
unasked stops the daemon, which then exits non-zero (:class:`TaskDiedError`).
Shutdown, in reverse: finish a reload under way, stop dispatching refreshes
and let the in-flight ones finish and persist (``shutdown_grace``), close the
listeners, flush webhooks, close the HTTP client and the database, release
the lock.

The systemd watchdog is fed by the dispatcher's heartbeat, not by a timer of
its own: the dispatcher turns at least every ``max_wait`` seconds whatever it
waits for, and the pings stop once its last turn is older than that allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import timedelta

import aiohttp
import structlog

from qbo_daemon import __version__
from qbo_daemon.config.load import Config
from qbo_daemon.core.clock import Clock, SystemClock
from qbo_daemon.core.errors import ConfigError, QboDaemonError
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.engine.accounts import AccountService
from qbo_daemon.engine.cluster import Cluster
from qbo_daemon.engine.connect import ConnectFlow
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.engine.realm_check import RealmCheck
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.engine.services import Services
from qbo_daemon.engine.state import AccountStates
from qbo_daemon.engine.status_page import StatusPage
from qbo_daemon.engine.tokens import TokenService
from qbo_daemon.http.api import make_api_app
from qbo_daemon.http.callback import error_page, make_callback_app
from qbo_daemon.http.listener import (
    Listener,
    ListenerLimits,
    plain_error_page,
    raise_open_file_limit,
)
from qbo_daemon.http.ui.app import mount_ui
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.intuit.company import CompanyInfoClient
from qbo_daemon.runtime.logs import AccessLevel, access_logger_class, configure_logging
from qbo_daemon.runtime.supervisor import Supervisor, TaskDiedError
from qbo_daemon.runtime.systemd import SystemdNotifier
from qbo_daemon.runtime.webhooks import WebhookNotifier
from qbo_daemon.store.keys import load_cipher
from qbo_daemon.store.postgres.storage import PgSettings, PostgresStorage
from qbo_daemon.store.repository import DatabaseLock, Storage

log = structlog.get_logger("qbo_daemon.runtime.daemon")

# aiohttp waits up to this long for open requests when a listener closes (it
# can take twice as long); the systemd unit's TimeoutStopSec counts on it.
HTTP_SHUTDOWN_TIMEOUT = 10.0
STATUS_INTERVAL = 15.0
# The longest the dispatcher waits between turns without a watchdog to feed.
DISPATCHER_MAX_WAIT = 30.0
# How long a shutdown waits for a reload under way.
RELOAD_SHUTDOWN_WAIT = 10.0
# The scheduler keeps timers for the accounts due within this many seconds and reads
# the next ones from the database's index as time moves on: memory follows the
# accounts due soon, not all of them.
SCHEDULER_WINDOW = 600.0
# Pool connections for work, at most (plus 4), whatever [refresh] concurrency is.
PG_POOL_CAP = 16
# File descriptors kept for the database, the log, sd_notify and the like,
# beside the listeners' caps and the HTTP client's pool.
FD_RESERVE = 64


class EventRelay:
    """Forwards account events to the current notifier, which a reload may replace."""

    def __init__(self, target: WebhookNotifier) -> None:
        self.target = target

    def emit(self, event: str, account_id: str, **fields: object) -> None:
        self.target.emit(event, account_id, **fields)


class Daemon:
    """One running qbo-daemon. ``run`` returns when ``stop`` is set.

    It raises :class:`TaskDiedError` after an orderly shutdown when a supervised
    task ended unasked, and :class:`ConfigError` when a listen address is taken.
    """

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
        self._supervisor: Supervisor | None = None
        self._stopping = False
        # SIGHUP reloads: one at a time (the lock), signals meanwhile coalesced into one more.
        self._reload_lock = asyncio.Lock()
        self._reload_wanted = asyncio.Event()
        self._reload_source: Callable[[], Config] | None = None
        interval = self._systemd.watchdog_interval()
        self._max_wait = DISPATCHER_MAX_WAIT
        self._stale_after: float | None = None
        if interval is not None:
            self._max_wait = max(0.05, min(DISPATCHER_MAX_WAIT, interval))
            self._stale_after = self._max_wait + 2 * interval
        self._access = AccessLevel(config.log.access)

    async def run(self, stop: asyncio.Event) -> None:
        supervisor = Supervisor(stop)
        self._supervisor = supervisor
        async with AsyncExitStack() as stack:
            stack.push_async_callback(supervisor.aclose)
            try:
                failure = await self._run(stack, supervisor, stop)
            finally:
                # Whatever ends from here on is the shutdown's doing (or a failed start's).
                supervisor.stand_down()
        log.info("daemon.stopped")
        if failure is not None:
            raise TaskDiedError(failure)

    async def _run(
        self, stack: AsyncExitStack, supervisor: Supervisor, stop: asyncio.Event
    ) -> str | None:
        """Start everything onto ``stack``; wait for ``stop`` or a death; begin the shutdown."""
        config = self.config
        if config.refresh.shutdown_grace <= config.intuit.timeout:
            log.warning(
                "config.shutdown_grace_flagged",
                shutdown_grace=config.refresh.shutdown_grace.total_seconds(),
                intuit_timeout=config.intuit.timeout.total_seconds(),
                detail="a refresh Intuit answers during a shutdown may be cut off and a "
                "rotated refresh token lost; keep [refresh] shutdown_grace above it",
            )
        metrics = Metrics()
        cipher = load_cipher(config.storage.encryption_keys, config.storage.path)
        storage: Storage | PostgresStorage
        cluster: Cluster | None = None
        lock: DatabaseLock | None = None
        if config.storage.url is not None:
            # Several daemons may share it: claims, not a lock, keep them apart.
            storage = await PostgresStorage.open(
                config.storage.url.reveal(),
                cipher,
                attempts_keep=config.storage.attempts_keep,
                # Attempts hold a connection for one statement (a claim, a commit), never
                # across a call: a few serve many, and nodes fit a server's 100 clients.
                settings=PgSettings(max_size=min(config.refresh.concurrency, PG_POOL_CAP) + 4),
                node_id=config.cluster.resolved_node_id(host=socket.gethostname(), pid=os.getpid()),
            )
            stack.push_async_callback(storage.close)
            cluster = Cluster(storage, metrics=metrics)
        else:
            lock = DatabaseLock(config.storage.path)
            lock.acquire()
            stack.callback(lock.release)
            storage = await Storage.open(
                config.storage.path, cipher, attempts_keep=config.storage.attempts_keep
            )
            stack.push_async_callback(storage.close)
            if storage.writer is not None:
                supervisor.watch("storage-writer", storage.writer)
        await storage.verify_keys()

        pool = max(100, config.refresh.concurrency * 2)
        self._check_open_file_limit(config, pool)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool),
            timeout=aiohttp.ClientTimeout(total=config.intuit.timeout.total_seconds()),
        )
        self._session = session
        stack.push_async_callback(session.close)
        notifier = self._make_notifier(config, session)
        relay = EventRelay(notifier)
        self._relay = relay
        stack.push_async_callback(self._close_notifier)

        services = self._build(config, storage, session, metrics, relay, cluster)
        self.services = services
        if cluster is not None:
            # Heard of and alive before it serves: the others count on it from here on.
            await cluster.start()
            stack.push_async_callback(cluster.leave)
            supervisor.start("heartbeat", cluster.run())
        listeners = await self._start_listeners(services)
        for listener in reversed(listeners):
            stack.push_async_callback(listener.close)
        stack.push_async_callback(
            self._stop_scheduler, services.scheduler, config.refresh.shutdown_grace
        )
        scheduled = await services.scheduler.start()
        if services.scheduler.dispatcher is not None:
            supervisor.watch("dispatcher", services.scheduler.dispatcher)
        for listener in listeners:
            assert listener.task is not None
            supervisor.watch(f"listener:{listener.name}", listener.task)

        # Counted once for the log line and for systemd (a full scan at a million rows).
        counts = await services.count_accounts()
        if lock is not None:
            # Where the CLI finds us, even after a reload changed [api] listen in the file.
            lock.advertise(config.api.url)
        log.info(
            "daemon.started",
            version=__version__,
            database=(
                storage.where
                if isinstance(storage, PostgresStorage)
                else str(config.storage.path.resolve())
            ),
            node_id=cluster.node_id if cluster is not None else None,
            accounts={status: n for status, n in counts.items() if n},
            accounts_scheduled=scheduled,
            api=config.api.url,
            callback=f"http://{config.callback.host}:{config.callback.port}{config.callback.path}",
        )
        self._systemd.ready(self._status_text(services, counts))
        # After READY=1: systemd arms the watchdog only once start-up is complete.
        if self._systemd.enabled and self._stale_after is not None:
            supervisor.start(
                "watchdog", self._systemd.watchdog(stop, self._heartbeat(services.scheduler))
            )
        supervisor.start("status", self._report_status(services, stop))
        reloader = supervisor.start("reloader", self._reloader())
        self.ready.set()
        failure = await supervisor.wait()
        log.info("daemon.shutdown_started", reason=f"{failure} stopped" if failure else "asked")
        self._systemd.stopping()
        await self._finish_reloads(reloader)
        await supervisor.aclose()
        return failure

    def _build(
        self,
        config: Config,
        storage: Storage | PostgresStorage,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        events: EventRelay,
        cluster: Cluster | None,
    ) -> Services:
        clock = self.clock
        refresh = config.refresh
        intuit = IntuitClient(session, config.intuit, clock)
        policy = RefreshPolicy(refresh)
        states = AccountStates()
        realm_check = RealmCheck(storage, CompanyInfoClient(session, intuit), intuit, clock, policy)
        refresher = Refresher(
            storage,
            intuit,
            clock,
            metrics,
            policy,
            states,
            concurrency=refresh.concurrency,
            realm_check=realm_check,
            cluster=cluster,
        )
        scheduler = Scheduler(
            refresher,
            storage,
            clock,
            metrics,
            events,
            policy,
            states,
            concurrency=refresh.concurrency,
            max_wait=self._max_wait,
            window=SCHEDULER_WINDOW,
            cluster=cluster,
        )
        return Services(
            config=config,
            clock=clock,
            storage=storage,
            intuit=intuit,
            scheduler=scheduler,
            connect=ConnectFlow(
                storage,
                intuit,
                scheduler,
                clock,
                metrics,
                events,
                realm_check,
                policy,
                allow_shared_realm=config.callback.allow_shared_realm,
            ),
            tokens=TokenService(storage, scheduler, clock, policy),
            accounts=AccountService(storage, intuit, scheduler, clock, events, policy),
            status=StatusPage(storage, scheduler),
            policy=policy,
            metrics=metrics,
            events=events,
            cluster=cluster,
        )

    async def _start_listeners(self, services: Services) -> list[Listener]:
        config = services.config
        api, callback = config.api, config.callback
        api_app = make_api_app(services)
        mount_ui(api_app, services)
        specs = [
            (
                "api",
                api_app,
                api.host,
                api.port,
                ListenerLimits(api.max_connections, api.read_timeout.total_seconds()),
                plain_error_page,
            ),
            (
                "callback",
                make_callback_app(services.connect, callback.path, callback.success_redirect),
                callback.host,
                callback.port,
                ListenerLimits(callback.max_connections, callback.read_timeout.total_seconds()),
                error_page,
            ),
        ]
        listeners: list[Listener] = []
        try:
            for name, app, host, port, limits, page in specs:
                listener = Listener(
                    name,
                    app,
                    host,
                    port,
                    limits,
                    access_log_class=access_logger_class(self._access),
                    shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT,
                    error_page=page,
                )
                try:
                    await listener.start()
                except OSError as exc:
                    raise _listen_error(config, name, host, port, exc) from None
                listeners.append(listener)
        except BaseException:
            for started in listeners:
                await started.close()
            raise
        return listeners

    def _check_open_file_limit(self, config: Config, pool: int) -> None:
        """Make room for every connection the caps allow, or say what will run out."""
        wanted = config.api.max_connections + config.callback.max_connections + pool + FD_RESERVE
        limit = raise_open_file_limit(wanted)
        if limit < wanted:
            log.warning(
                "daemon.file_limit_flagged",
                limit=limit,
                wanted=wanted,
                detail="full listeners could run the daemon out of file descriptors; lower "
                "[api] max_connections and [callback] max_connections, or raise the limit "
                "(LimitNOFILE= in the unit, ulimit -n)",
            )

    async def _stop_scheduler(self, scheduler: Scheduler, grace: timedelta) -> None:
        try:
            await scheduler.stop(grace.total_seconds())
        except Exception as exc:  # a boundary: a dead dispatcher must not stop the shutdown
            log.error("scheduler.stop_failed", error=repr(exc))

    def _heartbeat(self, scheduler: Scheduler) -> Callable[[], bool]:
        """Whether the dispatcher turned recently enough to feed the watchdog."""
        stale_after = self._stale_after
        stalled = False

        def alive() -> bool:
            nonlocal stalled
            age = time.monotonic() - scheduler.last_turn
            if stale_after is None or age <= stale_after:
                stalled = False
                return True
            if not stalled:
                stalled = True
                log.critical(
                    "watchdog.dispatcher_stalled",
                    stalled_for=round(age, 1),
                    detail="the refresh dispatcher stopped turning; WATCHDOG=1 pings stop, "
                    "so systemd restarts the daemon",
                )
            return False

        return alive

    def _make_notifier(self, config: Config, session: aiohttp.ClientSession) -> WebhookNotifier:
        notify = config.notify
        return WebhookNotifier(
            session if notify.webhook_url else None,
            notify.webhook_url,
            notify.secret,
            timeout=notify.timeout.total_seconds(),
            clock=self.clock,
            supervisor=self._supervisor,
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
                counts = await services.count_accounts()
                self._systemd.status(self._status_text(services, counts))
            except Exception as exc:  # a boundary: status reporting must never stop the daemon
                log.warning("daemon.status_failed", error=str(exc))

    def _status_text(self, services: Services, counts: Mapping[str, int]) -> str:
        return (
            f"{counts.get('active', 0)} active, {counts.get('expired', 0)} expired, "
            f"{counts.get('needs_reconnect', 0)} need reconnect, "
            f"{services.scheduler.in_flight} refreshing"
        )

    def request_reload(self, source: Callable[[], Config]) -> None:
        """SIGHUP: re-read the configuration from ``source`` after the reload under way.

        Reloads run one at a time; signals that arrive during one make one more
        reload, not one each. A shutdown waits for the reload under way.
        """
        if self._stopping:
            log.info("daemon.reload_ignored", detail="the daemon is stopping")
            return
        self._reload_source = source
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            source = self._reload_source
            if self._stopping or source is None:
                return
            try:
                await self.reload(source())
            except QboDaemonError as exc:
                log.error("daemon.reload_failed", error=str(exc), detail="the old settings stay")
            except Exception as exc:  # a boundary: a failed reload must not stop the daemon
                log.exception(
                    "daemon.reload_failed", error=repr(exc), detail="the old settings stay"
                )

    async def _finish_reloads(self, reloader: asyncio.Task[None]) -> None:
        """Let a reload under way finish before anything closes; start no other."""
        self._stopping = True
        self._reload_wanted.set()  # an idle reloader returns
        try:
            async with asyncio.timeout(RELOAD_SHUTDOWN_WAIT):
                await asyncio.wait({reloader})
                async with self._reload_lock:  # a reload called directly (tests)
                    pass
        except TimeoutError:
            log.warning("daemon.reload_abandoned", waited=RELOAD_SHUTDOWN_WAIT)

    async def reload(self, config: Config) -> None:
        """Apply what can change live (SIGHUP); name what needs a restart."""
        async with self._reload_lock:
            log.info("daemon.reload_started")
            await self._reload(config)

    async def _reload(self, config: Config) -> None:
        services = self.services
        old = self.config
        cipher = None
        if services is not None:
            # Before anything changes: keys that cannot read the stored rows fail the reload.
            cipher = load_cipher(config.storage.encryption_keys, old.storage.path)
            await services.storage.verify_keys(cipher)
        configure_logging(config.log.format, config.log.level)
        self._access.value = config.log.access
        restart_needed = [
            name
            for name, before, after in (
                ("[api] listen", (old.api.host, old.api.port), (config.api.host, config.api.port)),
                (
                    "[callback] listen",
                    (old.callback.host, old.callback.port),
                    (config.callback.host, config.callback.port),
                ),
                *(
                    (f"[{section}] {key}", getattr(before, key), getattr(after, key))
                    for section, before, after in (
                        ("api", old.api, config.api),
                        ("callback", old.callback, config.callback),
                    )
                    for key in ("max_connections", "read_timeout")
                ),
                ("[storage] path", old.storage.path, config.storage.path),
                ("[storage] url", old.storage.url, config.storage.url),
                ("[intuit] redirect_uri", old.intuit.redirect_uri, config.intuit.redirect_uri),
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
            services.storage.use_cipher(cipher)
            services.intuit.config = config.intuit
            services.scheduler.set_concurrency(config.refresh.concurrency)
            services.policy.update(
                replace(config.refresh, shutdown_grace=old.refresh.shutdown_grace)
            )
            services.connect.allow_shared_realm = config.callback.allow_shared_realm
            services.scheduler.resume()
            if config.notify != old.notify and self._relay is not None and self._session:
                previous = self._relay.target
                self._relay.target = self._make_notifier(config, self._session)
                await previous.aclose(5.0)
            # Settings that cannot change live keep their old values.
            config = replace(
                config,
                api=replace(
                    config.api,
                    host=old.api.host,
                    port=old.api.port,
                    max_connections=old.api.max_connections,
                    read_timeout=old.api.read_timeout,
                ),
                callback=replace(
                    old.callback, allow_shared_realm=config.callback.allow_shared_realm
                ),
                storage=replace(
                    config.storage,
                    path=old.storage.path,
                    url=old.storage.url,
                    attempts_keep=old.storage.attempts_keep,
                ),
                refresh=replace(config.refresh, shutdown_grace=old.refresh.shutdown_grace),
                intuit=replace(config.intuit, redirect_uri=old.intuit.redirect_uri),
            )
            services.intuit.config = config.intuit
            services.config = config
        self.config = config
        log.info(
            "daemon.reloaded",
            log_level=config.log.level,  # "level" is the record's own level
            access_log=config.log.access,
            api_key_count=len(config.api.keys),  # "*_keys" would be redacted by name
            encryption_key_count=len(config.storage.encryption_keys),
            restart_needed=restart_needed or None,
        )
        if restart_needed:
            log.warning(
                "daemon.restart_needed",
                settings=restart_needed,
                detail="these changed settings keep their old values until the daemon is "
                "restarted (systemctl restart qbo-daemon); the CLI finds the API where it "
                "still listens",
            )


def _listen_error(config: Config, section: str, host: str, port: int, exc: OSError) -> Exception:
    """A bind failure naming its setting: a configuration error (exit 2) when restarting
    cannot help (the address is taken, or the port needs privileges we lack)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        reason = f"{address} is already in use by another process; stop it or choose another"
    elif exc.errno == errno.EACCES:
        reason = f"{address}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    else:
        return OSError(f"cannot listen on {address} ([{section}] listen): {exc.strerror or exc}")
    error = ConfigError(
        f"listen: {reason}", key=section, path=str(config.source) if config.source else None
    )
    error.key = f"{section}.listen"
    return error
