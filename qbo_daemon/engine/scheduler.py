"""When to refresh: exact per-account timers, backoff, single flight, catch-up.

One heap holds ``(due, seq, account_id)`` for every scheduled account and one
dispatcher task sleeps until the earliest entry is due. A heap with one
sleeper costs one small tuple per account and O(log n) per change, where a
``call_at`` handle per account would keep 100,000 timer handles in the event
loop's own heap and make every reschedule a cancel plus a new handle. A
reschedule pushes a new entry and forgets the old one by sequence number
(lazy deletion), so nothing is ever searched for.

Due times are wall-clock instants (``reconnect_token_at``). The dispatcher
never waits longer than ``max_wait`` (30 s) before re-reading the wall clock:
asyncio's monotonic clock stops while a machine is suspended, so a long sleep
would wake late by the length of the suspend.

A due account is dispatched only when one of ``concurrency`` dispatch slots
is free, so a catch-up storm of overdue accounts drains in due order, most
overdue first, never all at once. The refresher holds a second limit of the
same size around each Intuit call, shared with refreshes the API asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal, Protocol

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import Account, TokenSet, iso
from qbo_daemon.engine.refresher import Outcome, OutcomeKind, Refresher
from qbo_daemon.intuit.parse import after
from qbo_daemon.store.repository import ScheduleEntry, Storage

log = structlog.get_logger("qbo_daemon.engine.scheduler")

# Floor of a retry delay, so full jitter never turns into a hot loop.
_MIN_RETRY_DELAY = 0.05
# Finished attempts remembered for askers that read the row just before one finished.
_RECENT_OUTCOMES = 1024

# What started a refresh, on every refresh.* log line of the attempt: its timer, a timer
# overdue at start-up, an import that left the access token dead, the token API (a token
# read or POST .../refresh), or the CLI (through that API).
Trigger = Literal["scheduled", "catch_up", "import", "api", "cli"]


class Events(Protocol):
    """Where account events go (the log, and webhooks when configured)."""

    def emit(self, event: str, account_id: str, **fields: object) -> None: ...


class Scheduler:
    def __init__(
        self,
        refresher: Refresher,
        storage: Storage,
        clock: Clock,
        metrics: Metrics,
        events: Events,
        *,
        concurrency: int,
        backoff_initial: timedelta,
        backoff_max: timedelta,
        invalid_client_retry: timedelta,
        hard_expiry_warning: timedelta,
        max_wait: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._refresher = refresher
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        self._events = events
        self.backoff_initial = backoff_initial.total_seconds()
        self.backoff_max = backoff_max.total_seconds()
        self.invalid_client_retry = invalid_client_retry.total_seconds()
        self.hard_expiry_warning = hard_expiry_warning
        self._max_wait = max_wait
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, str]] = []
        # The live heap entry of each scheduled account; any other entry is stale.
        self._current: dict[str, tuple[float, int, str]] = {}
        self._seq = itertools.count()
        self._inflight: dict[str, asyncio.Task[Outcome]] = {}
        # Why a timer was set, where that is not simply "scheduled" (catch-up, import).
        self._triggers: dict[str, Trigger] = {}
        # (finish number, outcome) of the latest finished attempt, for recent accounts.
        self._finished = 0
        self._recent: OrderedDict[str, tuple[int, Outcome]] = OrderedDict()
        self._failures: dict[str, int] = {}
        self._warned_hard_expiry: set[str] = set()
        self._dispatch_slots = asyncio.Semaphore(_dispatch_width(concurrency))
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        # invalid_client: refreshes pause until this wall time, then one probe goes out.
        self._paused_until: float | None = None
        self._probing = False
        # time.monotonic() of the dispatcher's latest turn. It turns at least every
        # max_wait seconds whatever it waits for, so an old value means it is wedged:
        # the systemd watchdog is fed only while it is recent (runtime/daemon.py).
        self.last_turn = time.monotonic()

    # -- state for the API, health and metrics --------------------------------

    @property
    def dispatcher(self) -> asyncio.Task[None] | None:
        """The dispatcher task once started (the daemon's supervisor watches it)."""
        return self._dispatcher

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    @property
    def credentials_ok(self) -> bool:
        return self._paused_until is None

    @property
    def scheduled(self) -> int:
        return len(self._current)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def due_at(self, account_id: str) -> datetime | None:
        entry = self._current.get(account_id)
        if entry is None:
            return None
        return datetime.fromtimestamp(entry[0], self._clock.now().tzinfo)

    def next_due_in(self) -> float | None:
        self._drop_stale()
        if not self._heap:
            return None
        return self._heap[0][0] - self._clock.now().timestamp()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> int:
        """Schedule every active or expired account; overdue ones are due at once."""
        entries = await self._storage.schedule_entries()
        self._load(entries)
        now = self._clock.now()
        for entry in entries:
            self._check_hard_expiry(entry.account_id, entry.refresh_token_hard_expires_at, now)
            if entry.reconnect_token_at <= now:
                self._triggers[entry.account_id] = "catch_up"
        overdue = sum(1 for due, _, _ in self._heap if due <= now.timestamp())
        self._dispatcher = asyncio.create_task(self._dispatch(), name="scheduler")
        log.info("scheduler.started", scheduled=len(self._current), overdue=overdue)
        return len(self._current)

    async def stop(self, grace: float) -> None:
        """Stop dispatching; let in-flight refreshes finish within ``grace`` seconds."""
        self._stopping = True
        if self._dispatcher is not None:
            # It may be waiting for a dispatch slot, i.e. for the refreshes drained below.
            # asyncio.wait: one that died (the supervisor reported it) must not skip the drain.
            self._dispatcher.cancel()
            await asyncio.wait({self._dispatcher})
        tasks = list(self._inflight.values())
        if tasks:
            log.info("scheduler.drain_started", in_flight=len(tasks), grace=grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("scheduler.refreshes_cancelled", cancelled=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        log.info("scheduler.stopped")

    # -- scheduling --------------------------------------------------------------

    def schedule(self, account_id: str, due: datetime, *, trigger: Trigger = "scheduled") -> None:
        """(Re)schedule ``account_id`` at ``due``; replaces any earlier timer."""
        entry = (due.timestamp(), next(self._seq), account_id)
        self._current[account_id] = entry
        heapq.heappush(self._heap, entry)
        if trigger == "scheduled":
            self._triggers.pop(account_id, None)
        else:
            self._triggers[account_id] = trigger
        self._wakeup.set()
        log.debug("refresh.scheduled", account_id=account_id, due=iso(due), trigger=trigger)

    def schedule_account(self, account: Account, *, trigger: Trigger = "scheduled") -> None:
        """Schedule a newly stored, reconnected or imported account at once.

        ``trigger`` names what asked, for a refresh due at once (an import
        without a live access token); a later one is simply ``scheduled``.
        """
        self._failures.pop(account.account_id, None)
        due = account.reconnect_token_at
        if account.status.scheduled and due is not None:
            self.schedule(
                account.account_id,
                due,
                trigger=trigger if due <= self._clock.now() else "scheduled",
            )
            self._check_hard_expiry(
                account.account_id, account.refresh_token_hard_expires_at, self._clock.now()
            )
        else:
            self.unschedule(account.account_id)

    def unschedule(self, account_id: str) -> None:
        if self._current.pop(account_id, None) is not None:
            log.debug("refresh.unscheduled", account_id=account_id)
        self._failures.pop(account_id, None)
        self._triggers.pop(account_id, None)

    def resume(self) -> None:
        """Credentials changed (reload): end an ``invalid_client`` pause now."""
        if self._paused_until is not None:
            self._paused_until = self._clock.now().timestamp()
            self._wakeup.set()

    def set_concurrency(self, concurrency: int) -> None:
        self._dispatch_slots = asyncio.Semaphore(_dispatch_width(concurrency))
        self._refresher.set_concurrency(concurrency)
        self._wakeup.set()

    # -- refreshing ----------------------------------------------------------------

    def attempt_mark(self) -> int:
        """A mark for :meth:`refresh`'s ``since``: take it before reading the row."""
        return self._finished

    async def refresh(
        self,
        account_id: str,
        *,
        since: int | None = None,
        patient: bool = False,
        trigger: Trigger = "api",
    ) -> Outcome:
        """Refresh now, single flight: a second asker waits for the first attempt.

        With ``since`` (from :meth:`attempt_mark`), an attempt that finished after
        the mark answers as well: the asker's row may predate that attempt's commit.
        A ``patient`` asker (a token read, not an operator's "refresh now") starts no
        attempt while the account waits out a failure's backoff or ``Retry-After``.
        ``trigger`` is logged with an attempt this call starts; a joined one keeps its own.
        """
        task = self._inflight.get(account_id)
        if task is None:
            recent = self._recent.get(account_id)
            if since is not None and recent is not None and recent[0] > since:
                return recent[1]
            if self._stopping:
                return Outcome(OutcomeKind.TRANSIENT, None, message="the daemon is shutting down")
            if self._refusing():
                return Outcome(
                    OutcomeKind.INVALID_CLIENT,
                    None,
                    message="refreshes are paused: Intuit refuses the client credentials",
                )
            if patient and self._backing_off(account_id):
                return Outcome(
                    OutcomeKind.TRANSIENT,
                    None,
                    message="Intuit failed; the next try waits for its backoff",
                )
            task = self._start(account_id, due=None, trigger=trigger)
        return await asyncio.shield(task)

    async def wait_idle(self, account_id: str) -> None:
        """Wait until no refresh of ``account_id`` is in flight."""
        task = self._inflight.get(account_id)
        if task is not None:
            await asyncio.wait({task})

    def held_tokens(self, account: Account) -> TokenSet | None:
        """New tokens Intuit gave that the database has not taken yet (see Refresher)."""
        return self._refresher.held_tokens(account)

    def refresh_in_background(self, account_id: str, *, trigger: Trigger = "api") -> None:
        if (
            account_id not in self._inflight
            and not self._stopping
            and not self._refusing()
            and not self._backing_off(account_id)
        ):
            self._start(account_id, due=None, trigger=trigger)

    def _backing_off(self, account_id: str) -> bool:
        """A failed account's retry is timed (backoff, ``Retry-After``) and not yet due.

        Without this, an app reading a dead token in a loop during an outage would
        make every read a call to Intuit, past the backoff and ``Retry-After``.
        """
        entry = self._current.get(account_id)
        return (
            account_id in self._failures
            and entry is not None
            and entry[0] > self._clock.now().timestamp()
        )

    def _refusing(self) -> bool:
        """Paused by ``invalid_client``: only the timed probe may call Intuit.

        Without this every API asker would call Intuit with credentials it refuses.
        """
        if self._paused_until is None:
            return False
        return self._probing or self._clock.now().timestamp() < self._paused_until

    def _start(
        self,
        account_id: str,
        *,
        due: float | None,
        trigger: Trigger,
        slot: asyncio.Semaphore | None = None,
    ) -> asyncio.Task[Outcome]:
        task = asyncio.create_task(
            self._run(account_id, due, trigger), name=f"refresh:{account_id}"
        )
        self._inflight[account_id] = task

        def done(_: asyncio.Task[Outcome]) -> None:
            if self._inflight.get(account_id) is task:
                del self._inflight[account_id]
            if not task.cancelled() and task.exception() is None:
                self._finished += 1
                self._recent[account_id] = (self._finished, task.result())
                self._recent.move_to_end(account_id)
                if len(self._recent) > _RECENT_OUTCOMES:
                    self._recent.popitem(last=False)
            if slot is not None:
                slot.release()
            self._wakeup.set()

        task.add_done_callback(done)
        return task

    async def _run(self, account_id: str, due: float | None, trigger: Trigger) -> Outcome:
        # The task's own context: every line of this attempt names the account and the asker.
        structlog.contextvars.bind_contextvars(account_id=account_id, trigger=trigger)
        due_at = datetime.fromtimestamp(due, self._clock.now().tzinfo) if due else None
        try:
            outcome = await self._refresher.attempt(account_id, due=due_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a boundary: a database fault must not kill the timer
            log.exception("refresh.crashed", error=str(exc))
            # A probe that failed this way proved nothing; the next due account probes.
            self._probing = False
            self._retry_later(account_id, None, reason=str(exc))
            return Outcome(OutcomeKind.TRANSIENT, None, message=str(exc))
        try:
            self._after(account_id, outcome)
        except Exception as exc:  # a boundary: the timer must outlive a bug in its aftermath
            log.error(
                "refresh.reschedule_failed",
                account_id=account_id,
                error=type(exc).__name__,
                exc_info=True,
                detail="retrying at the backoff cap",
            )
            self.schedule(account_id, after(self._clock.now(), self.backoff_max))
        return outcome

    def _after(self, account_id: str, outcome: Outcome) -> None:
        now = self._clock.now()
        kind = outcome.kind
        # Intuit accepting our client (a success, or a refusal of the grant itself)
        # from any asker proves the credentials.
        if kind in (OutcomeKind.SUCCESS, OutcomeKind.INVALID_GRANT):
            self._probing = False
            if self._paused_until is not None:
                self._paused_until = None
                log.info("intuit.credentials_accepted", detail="refreshes resume")
                self._metrics.set_healthy(True)
                self._wakeup.set()
        elif self._probing and kind is not OutcomeKind.INVALID_CLIENT:
            # The probe proved nothing: an outage answers again after the retry
            # interval; a skipped account hands the probe to the next due one.
            self._probing = False
            if kind is OutcomeKind.TRANSIENT and self._paused_until is not None:
                self._paused_until = now.timestamp() + self.invalid_client_retry
            self._wakeup.set()
        if kind is OutcomeKind.SUCCESS and outcome.account is not None:
            account = outcome.account
            failures = self._failures.pop(account_id, 0)
            if account.reconnect_token_at is not None:
                self.schedule(account_id, account.reconnect_token_at)
            log.info(
                "refresh.succeeded",
                duration_ms=round((outcome.duration or 0.0) * 1000, 1),
                next_due=iso(account.reconnect_token_at),
                token_expires_at=iso(account.token_expires_at),
                intuit_tid=outcome.intuit_tid,
            )
            if failures:
                self._events.emit("account.recovered", account_id, after_failures=failures)
            self._check_hard_expiry(account_id, account.refresh_token_hard_expires_at, now)
        elif kind is OutcomeKind.TRANSIENT:
            self._retry_later(account_id, outcome, reason=str(outcome.error))
        elif kind in (OutcomeKind.INVALID_GRANT, OutcomeKind.REFRESH_TOKEN_EXPIRED):
            self.unschedule(account_id)
            reason = str(outcome.error) if outcome.error else (outcome.message or kind.value)
            self._events.emit(
                "account.reconnect_needed",
                account_id,
                reason=reason,
                intuit_tid=outcome.error.intuit_tid if outcome.error else None,
            )
        elif kind is OutcomeKind.INVALID_CLIENT:
            self._pause(account_id, outcome)
        elif kind is OutcomeKind.SKIPPED:
            current = outcome.account
            if current is not None and current.status.scheduled:
                self.schedule_account(current)
            else:
                self.unschedule(account_id)

    def _retry_later(self, account_id: str, outcome: Outcome | None, *, reason: str) -> None:
        now = self._clock.now()
        failures = self._failures.get(account_id, 0) + 1
        self._failures[account_id] = failures
        account = outcome.account if outcome else None
        expired = bool(account and account.token_expires_at and account.token_expires_at <= now)
        if expired:
            # The access token is dead; the refresh token is not: keep trying at the cap.
            delay = self._rng.uniform(self.backoff_max / 2, self.backoff_max)
        else:
            cap = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 32))
            delay = self._rng.uniform(0, cap)
        retry_after = outcome.retry_after if outcome else None
        if retry_after is not None:
            # A floor under the backoff, but never past its cap: Intuit's word is not law.
            delay = max(delay, min(retry_after, self.backoff_max))
        delay = max(delay, _MIN_RETRY_DELAY)
        due = after(now, delay)
        if account and account.refresh_token_expires_at and due > account.refresh_token_expires_at:
            # The last chance is just before the refresh token dies; at that instant
            # the refresher marks the account needs_reconnect without calling Intuit.
            due = max(account.refresh_token_expires_at, now)
        self.schedule(account_id, due)
        self._metrics.retry_scheduled()
        error = outcome.error if outcome else None
        log.warning(
            "refresh.retry_scheduled",
            attempt=failures,
            delay=round(delay, 3),
            error=reason,
            status=account.status.value if account else None,
            intuit_tid=error.intuit_tid if error else None,
        )

    def _pause(self, account_id: str, outcome: Outcome) -> None:
        now = self._clock.now().timestamp()
        first = self._paused_until is None
        self._probing = False
        self._paused_until = now + self.invalid_client_retry
        self.schedule(account_id, self._clock.now())
        self._metrics.set_healthy(False)
        log_method = log.error if first else log.warning
        log_method(
            "intuit.client_refused",
            error=str(outcome.error),
            intuit_tid=outcome.error.intuit_tid if outcome.error else None,
            detail="refreshes are paused; no account is marked; retrying",
            retry_in=self.invalid_client_retry,
        )

    def _check_hard_expiry(self, account_id: str, hard: datetime | None, now: datetime) -> None:
        if hard is None:
            return
        if hard - now > self.hard_expiry_warning:
            # A reconnect brings a new hard expiry: warn again when that one nears.
            self._warned_hard_expiry.discard(account_id)
        elif account_id not in self._warned_hard_expiry:
            self._warned_hard_expiry.add(account_id)
            self._events.emit(
                "account.hard_expiry_approached", account_id, hard_expires_at=iso(hard)
            )

    # -- the dispatcher ----------------------------------------------------------------

    def _load(self, entries: Iterable[ScheduleEntry]) -> None:
        for entry in entries:
            item = (entry.reconnect_token_at.timestamp(), next(self._seq), entry.account_id)
            self._current[entry.account_id] = item
            self._heap.append(item)
        heapq.heapify(self._heap)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._current.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)

    def _dispatchable(self, now: float) -> bool:
        if self._paused_until is None:
            return True
        return not self._probing and now >= self._paused_until

    async def _dispatch(self) -> None:
        while not self._stopping:
            self.last_turn = time.monotonic()
            self._wakeup.clear()
            self._drop_stale()
            now = self._clock.now().timestamp()
            if self._heap and self._heap[0][0] <= now and self._dispatchable(now):
                slot = self._dispatch_slots
                try:
                    # Capped, so the loop keeps turning while every slot is busy.
                    async with asyncio.timeout(self._max_wait):
                        await slot.acquire()
                except TimeoutError:
                    continue
                self._drop_stale()
                now = self._clock.now().timestamp()
                # Waiting for the slot, the head may have changed or a pause begun.
                if (
                    self._stopping
                    or not self._heap
                    or self._heap[0][0] > now
                    or not self._dispatchable(now)
                ):
                    slot.release()
                    continue
                due, _, account_id = heapq.heappop(self._heap)
                del self._current[account_id]
                trigger = self._triggers.pop(account_id, "scheduled")
                if account_id in self._inflight:
                    # An API refresh is already under way; its result reschedules.
                    slot.release()
                    continue
                if self._paused_until is not None:
                    self._probing = True
                self._start(account_id, due=due, trigger=trigger, slot=slot)
                continue
            wait = self._max_wait
            if self._heap and not self._probing:
                # Paused, the next dispatch is when both the entry and the pause are due;
                # waiting for only one of them would spin until the other comes.
                next_at = self._heap[0][0]
                if self._paused_until is not None:
                    next_at = max(next_at, self._paused_until)
                wait = min(wait, max(next_at - now, 0.0))
            self._metrics.set_next_due(self._heap[0][0] - now if self._heap else None)
            await self._wait(wait)

    async def _wait(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _dispatch_width(concurrency: int) -> int:
    """Timer refreshes in flight at once: twice the Intuit calls allowed.

    An attempt holds its Intuit slot only for the call; the other half are
    reading rows or committing, so Intuit's capacity never idles on the database.
    """
    return 2 * concurrency
