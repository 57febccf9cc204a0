"""The running daemon's parts, as the HTTP handlers and the runtime see them.

HTTP handlers use the engine's services (``accounts``, ``tokens``,
``connect``, ``status`` for the status page) and the methods here; the store,
the scheduler and the client are here for the runtime (start-up, reload,
shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from qbo_daemon.config.load import Config
from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import StorageError
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import AccountStatus
from qbo_daemon.engine.accounts import AccountService
from qbo_daemon.engine.cluster import Cluster
from qbo_daemon.engine.connect import ConnectFlow
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.engine.status_page import StatusPage
from qbo_daemon.engine.tokens import TokenService
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.store.port import AccountStore

log = structlog.get_logger("qbo_daemon.engine.services")


@dataclass
class Services:
    """Built once by :class:`qbo_daemon.runtime.daemon.Daemon`; ``config`` is swapped on reload."""

    config: Config
    clock: Clock
    storage: AccountStore
    intuit: IntuitClient
    scheduler: Scheduler
    connect: ConnectFlow
    tokens: TokenService
    accounts: AccountService
    status: StatusPage
    metrics: Metrics
    events: Events
    policy: RefreshPolicy
    cluster: Cluster | None = None  # several daemons on one PostgreSQL database

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the daemon can do its job, and each check's verdict."""
        checks: dict[str, Any] = {}
        try:
            await self.storage.ping()
            checks["database"] = "ok"
        except StorageError as exc:
            checks["database"] = f"failing: {exc}"
        if self.scheduler.holding_tokens:
            checks["database"] = "failing: token writes are failing; new tokens held in memory"
        if self.cluster is not None and not self.cluster.connected:
            checks["database"] = "failing: the heartbeat cannot reach the database"
        checks["scheduler"] = "ok" if self.scheduler.running else "not running"
        checks["intuit_credentials"] = (
            "ok"
            if self.scheduler.credentials_ok
            else "refused by Intuit (invalid_client): check [intuit] client_id and client_secret"
        )
        ready = all(value == "ok" for value in checks.values())
        return ready, checks

    async def count_accounts(self) -> dict[str, int]:
        """Accounts per status (every status, zeros included); sets the account gauges."""
        stored = await self.storage.status_counts()
        counts = {status.value: stored.get(status.value, 0) for status in AccountStatus}
        self.metrics.set_accounts(counts)
        return counts

    async def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition, gauges read now; (body, content type).

        The daemon's own update of the gauges runs only every few seconds. When the
        database cannot count, the rest is still served (``qbo_up`` included).
        """
        try:
            await self.count_accounts()
        except StorageError as exc:
            log.warning("metric.update_failed", error=str(exc))
        self.metrics.set_next_due(self.scheduler.next_due_in())
        return self.metrics.render()
