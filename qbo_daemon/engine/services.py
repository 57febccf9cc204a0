"""The running daemon's parts, as the HTTP handlers and the CLI see them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbo_daemon.config.load import Config
from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import StorageError
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.engine.accounts import AccountService
from qbo_daemon.engine.connect import ConnectFlow
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.engine.tokens import TokenService
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.store.port import AccountStore


@dataclass
class Services:
    """Built once by :class:`qbo_daemon.runtime.daemon.Daemon`; ``config`` is swapped on reload."""

    config: Config
    clock: Clock
    storage: AccountStore
    intuit: IntuitClient
    refresher: Refresher
    scheduler: Scheduler
    connect: ConnectFlow
    tokens: TokenService
    accounts: AccountService
    metrics: Metrics
    events: Events
    policy: RefreshPolicy

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
        checks["scheduler"] = "ok" if self.scheduler.running else "not running"
        checks["intuit_credentials"] = (
            "ok"
            if self.scheduler.credentials_ok
            else "refused by Intuit (invalid_client): check [intuit] client_id and client_secret"
        )
        ready = all(value == "ok" for value in checks.values())
        return ready, checks
