"""The daemon's long-lived tasks under one watch: the first to end unasked ends the daemon.

The refresh dispatcher, the database writer, the listeners' accept loops, the
webhook workers, the watchdog, the status reporter and the reloader are each
a task that must run as long as the daemon does. A task that ends early
(raises, is cancelled, or simply returns) leaves a daemon that looks alive
and does part of its job: refreshes stop while ``/healthz`` answers, or the
callback stops accepting while the timers run. The supervisor turns that into
an honest failure: it logs the task's end at critical level, the daemon
stops in its usual order (in-flight refreshes still drain and persist), and
the process exits non-zero so that its service manager starts a fresh one.

It plays the part of an ``asyncio.TaskGroup`` with two differences the
daemon needs: returning counts as dying, and a death does not cancel the
others at once, so the orderly shutdown can run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from qbo_daemon.core.errors import QboDaemonError

log = structlog.get_logger("qbo_daemon.runtime.supervisor")


class TaskDiedError(QboDaemonError):
    """A supervised task ended while the daemon was running."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the daemon's {name} task stopped unexpectedly (see the log); "
            "exiting so that the service manager restarts the daemon"
        )
        self.name = name


class Supervisor:
    """Watches tasks by name; :meth:`wait` returns when ``stop`` is set or one dies.

    A task that ends once ``stop`` is set is taken to be stopping with the daemon.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._watched: dict[asyncio.Task[Any], tuple[str, Callable[[], bool] | None]] = {}
        self._owned: set[asyncio.Task[Any]] = set()
        self._died = asyncio.Event()
        self._stopping = False
        self.failure: str | None = None

    def watch(
        self,
        name: str,
        task: asyncio.Task[Any],
        *,
        ended_by_owner: Callable[[], bool] | None = None,
    ) -> None:
        """Treat ``task`` ending as a death, unless the daemon is stopping by then or
        ``ended_by_owner()`` says its owner ended it on purpose (e.g. a notifier replaced
        by a reload closes its workers)."""
        if task.done():
            self._ended(name, ended_by_owner, task)
            return
        self._watched[task] = (name, ended_by_owner)
        task.add_done_callback(self._on_done)

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a watched task that :meth:`aclose` cancels."""
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        self.watch(name, task)
        return task

    async def wait(self) -> str | None:
        """Until ``stop`` is set or a watched task dies: the dead task's name, or None.

        From then on, tasks ending are the shutdown's doing, not deaths.
        """
        if not self._died.is_set():
            stopped = asyncio.ensure_future(self._stop.wait())
            died = asyncio.ensure_future(self._died.wait())
            try:
                await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (stopped, died):
                    waiter.cancel()
        self._stopping = True
        return self.failure

    def stand_down(self) -> None:
        """From now on tasks ending are the shutdown's doing (a failed start's too)."""
        self._stopping = True

    async def aclose(self) -> None:
        """Cancel the tasks :meth:`start` made and wait for them."""
        self._stopping = True
        tasks = [task for task in self._owned if not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._owned.clear()

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        name, ended_by_owner = self._watched.pop(task)
        self._ended(name, ended_by_owner, task)

    def _ended(
        self, name: str, ended_by_owner: Callable[[], bool] | None, task: asyncio.Task[Any]
    ) -> None:
        stopping = self._stopping or self._stop.is_set()
        if stopping or (ended_by_owner is not None and ended_by_owner()):
            if not task.cancelled():
                task.exception()  # retrieved: asyncio must not report it "never retrieved"
            return
        error: BaseException | None = None
        if task.cancelled():
            how = "cancelled"
        else:
            error = task.exception()
            how = "raised" if error is not None else "returned"
        log.critical(
            "supervisor.task_died",
            task=name,
            how=how,
            error=repr(error) if error is not None else None,
            exc_info=error,
            detail="the daemon stops and exits non-zero so that its service manager restarts it",
        )
        if self.failure is None:
            self.failure = name
        self._died.set()
