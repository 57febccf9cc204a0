"""When to refresh: exact per-account timers, backoff, single flight, catch-up, the pause.

One heap holds ``(key, seq, account_id, due)`` for every scheduled account and one
dispatcher task sleeps until the earliest entry is due. A heap with one
sleeper costs one small tuple per account and O(log n) per change, where a
``call_at`` handle per account would keep 100,000 timer handles in the event
loop's own heap and make every reschedule a cancel plus a new handle. A
reschedule pushes a new entry and forgets the old one (lazy deletion, checked
by identity against ``_current``), so nothing is ever searched for.

Due times are wall-clock instants (``reconnect_token_at``). The dispatcher
never waits longer than ``max_wait`` (30 s) before re-reading the wall clock:
asyncio's monotonic clock stops while a machine is suspended, so a long sleep
would wake late by the length of the suspend.

``[refresh] concurrency`` bounds the calls to Intuit in flight (the
refresher's slots, shared with every asker). Timer attempts are dispatched
through twice as many dispatch slots (:func:`_dispatch_width`), so an overdue
storm drains in due order, most overdue first, and Intuit's capacity never
idles while the other half read rows or commit.

Every attempt runs as a task in its account's
:class:`~qbo_daemon.engine.state.AccountState`; any other asker (the API, the
CLI, a token read) awaits that same task: single flight. What an attempt's
outcome means for the timer is decided in one place, :meth:`Scheduler._after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import StorageError
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import Account, TokenSet, iso
from qbo_daemon.engine.cluster import Cluster
from qbo_daemon.engine.outcome import Outcome, OutcomeKind
from qbo_daemon.engine.policy import RefreshPolicy, valid_for
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.state import AccountState, AccountStates, ClientPause, PauseState
from qbo_daemon.engine.triggers import Trigger
from qbo_daemon.intuit.parse import after
from qbo_daemon.store.port import AccountChange, AccountStore, ScheduleEntry

log = structlog.get_logger("qbo_daemon.engine.scheduler")

# Start-up times the accounts due within this many seconds before it says ready.
FIRST_STRETCH = 60.0
# A timer: when this node dispatches it, a tie-breaker, the account, and when the
# account is due. The key is the due time itself where this node goes first, and
# later by the head start another node has where it does not.
_Entry = tuple[float, int, str, float]
# Timers a read of the window sets before it lets the dispatcher run.
_TIMERS_PER_TURN = 2000


class Events(Protocol):
    """Where account events go (the log, and webhooks when configured)."""

    def emit(self, event: str, account_id: str, **fields: object) -> None: ...


class Scheduler:
    def __init__(
        self,
        refresher: Refresher,
        storage: AccountStore,
        clock: Clock,
        metrics: Metrics,
        events: Events,
        policy: RefreshPolicy,
        states: AccountStates,
        *,
        concurrency: int,
        max_wait: float = 30.0,
        rng: random.Random | None = None,
        window: float | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self._refresher = refresher
        # Timers only for the accounts due within ``window`` seconds (None: all of them),
        # read again from the database's index as time moves on (:meth:`_refill`).
        self._window = window
        self._window_end: datetime | None = None
        self._refill_failed_at: float | None = None
        self._refilling: asyncio.Task[None] | None = None
        # Several daemons: who goes first, and the changes the others commit.
        self._cluster = cluster
        if cluster is not None:
            cluster.subscribe(self.heard)
            cluster.on_live_change(self._live_changed)
        self._rekeying: asyncio.Task[None] | None = None
        self._rekey_again = False  # the live nodes changed again during a re-key
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        self._events = events
        self._policy = policy
        self._states = states
        self._max_wait = max_wait
        self._rng = rng or random.Random()
        self._no_jitter = _NoJitter()
        self._heap: list[_Entry] = []
        # The live heap entry of each scheduled account; any other entry is stale.
        self._current: dict[str, _Entry] = {}
        self._seq = itertools.count()
        # Why a timer was set, where that is not simply "scheduled" (catch-up, import).
        self._triggers: dict[str, Trigger] = {}
        self._pause = ClientPause()
        self._dispatch_slots = asyncio.Semaphore(_dispatch_width(concurrency))
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._resync = False  # changes were missed: read the whole window again
        # Changes other nodes committed while this node had an attempt in flight.
        self._heard_in_flight: dict[str, AccountChange] = {}
        # time.monotonic() of the dispatcher's latest turn. It turns at least every
        # max_wait seconds whatever it waits for, so an old value means it is wedged:
        # the systemd watchdog is fed only while it is recent (runtime/daemon.py).
        self.last_turn = time.monotonic()
        # Whether the dispatcher is asleep until its next due time (or a wake-up):
        # nothing of the scheduler's own is under way.
        self.waiting = False

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
        return self._pause.state is PauseState.RUNNING

    @property
    def scheduled(self) -> int:
        """Accounts with a timer."""
        return len(self._current)

    @property
    def idle(self) -> bool:
        """Nothing of the scheduler's own under way: the dispatcher sleeps, no read runs."""
        return self.waiting and self._refilling is None and self._rekeying is None

    @property
    def in_flight(self) -> int:
        """Refresh attempts in flight (reading, calling Intuit or committing)."""
        return self._states.attempts

    @property
    def holding_tokens(self) -> bool:
        """Whether new tokens wait in memory because the database refuses them."""
        return self._states.holding

    def due_at(self, account_id: str) -> datetime | None:
        """When ``account_id``'s timer is due (without the head start another node has)."""
        entry = self._current.get(account_id)
        if entry is None:
            return None
        return datetime.fromtimestamp(entry[3], self._clock.now().tzinfo)

    def next_refresh(self, account: Account) -> datetime | None:
        """When ``account`` is refreshed next: its timer, or its due time beyond the window."""
        due = self.due_at(account.account_id)
        if (
            due is None
            and account.status.scheduled
            and self._beyond_window(account.reconnect_token_at)
        ):
            return account.reconnect_token_at
        return due

    def preferred_node(self, account_id: str) -> str | None:
        """Several daemons: the node that claims ``account_id`` first; else None."""
        return None if self._cluster is None else self._cluster.preferred(account_id)

    def next_due_in(self) -> float | None:
        self._drop_stale()
        if not self._heap:
            return None
        return self._heap[0][0] - self._clock.now().timestamp()

    def held_token(self, account: Account) -> TokenSet | None:
        """New tokens Intuit gave for ``account``'s row that the database has not taken yet."""
        return self._states.held_for(account)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> int:
        """Schedule every active or expired account; overdue ones are due at once."""
        now = self._clock.now()
        if self._window is not None:
            # Ready once the first minute is timed; the dispatcher reads the rest of the
            # window at once, beside its work (a million accounts: a fifth of them).
            self._window_end = after(now, min(self._window, FIRST_STRETCH))
        entries = await self._storage.schedule_entries(self._window_end)
        self._load(entries)
        for entry in entries:
            self._check_hard_expiry(entry.account_id, entry.refresh_token_hard_expires_at, now)
            if entry.reconnect_token_at <= now:
                self._triggers[entry.account_id] = "catch_up"
        overdue = sum(1 for entry in self._heap if entry[3] <= now.timestamp())
        self._dispatcher = asyncio.create_task(self._dispatch(), name="scheduler")
        log.info("scheduler.started", scheduled=len(self._current), overdue=overdue)
        return len(self._current)

    async def stop(self, grace: float) -> None:
        """Stop dispatching; let in-flight refreshes finish within ``grace`` seconds."""
        self._stopping = True
        for reader in (self._refilling, self._rekeying):
            if reader is not None:
                reader.cancel()
                await asyncio.wait({reader})
        if self._dispatcher is not None:
            # It may be waiting for a dispatch slot, i.e. for the refreshes drained below.
            # asyncio.wait: one that died (the supervisor reported it) must not skip the drain.
            self._dispatcher.cancel()
            await asyncio.wait({self._dispatcher})
        tasks = list(self._states.in_flight())
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
        """(Re)schedule ``account_id`` at ``due``; replaces any earlier timer.

        With several daemons, a node that is not the account's preferred one
        gives that node a head start (:meth:`Cluster.delay`).
        """
        entry = self._entry(account_id, due.timestamp())
        self._current[account_id] = entry
        heapq.heappush(self._heap, entry)
        if trigger == "scheduled":
            self._triggers.pop(account_id, None)
        else:
            self._triggers[account_id] = trigger
        self._wakeup.set()
        log.debug("refresh.scheduled", account_id=account_id, due=iso(due), trigger=trigger)

    def schedule_account(self, account: Account, *, trigger: Trigger = "scheduled") -> None:
        """Time a newly stored, reconnected or imported account (or drop its timer).

        ``trigger`` names what asked, for a refresh due at once (an import
        without a live access token); a later one is simply ``scheduled``.
        """
        state = self._states.get(account.account_id)
        if state is not None:
            state.recovered()  # a new connection: earlier failures were another's
            self._states.forget_if_idle(account.account_id)
        due = account.reconnect_token_at
        if account.status.scheduled and due is not None and self._beyond_window(due):
            self.unschedule(account.account_id)  # a refill of the window brings it back
        elif account.status.scheduled and due is not None:
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
        self._triggers.pop(account_id, None)
        state = self._states.get(account_id)
        if state is not None:
            state.recovered()
            self._states.forget_if_idle(account_id)

    def resume(self) -> None:
        """Credentials changed (reload): end an ``invalid_client`` pause now."""
        self._pause.resume(self._clock.now().timestamp())
        self._wakeup.set()

    def set_concurrency(self, concurrency: int) -> None:
        self._dispatch_slots = asyncio.Semaphore(_dispatch_width(concurrency))
        self._refresher.set_concurrency(concurrency)
        self._wakeup.set()

    # -- asking for a refresh ----------------------------------------------------

    async def refresh_now(
        self, account_id: str, *, trigger: Trigger = "api", seen_version: int | None = None
    ) -> Outcome:
        """Refresh now (an operator asks), single flight: join an attempt in flight.

        ``trigger`` is logged with an attempt this call starts; a joined one keeps
        its own. ``seen_version`` as in :meth:`Refresher.attempt`.
        """
        state = self._states.get(account_id)
        if state is not None and state.attempt is not None:
            return await self._refresher.follow(await asyncio.shield(state.attempt))
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        outcome = await asyncio.shield(
            self._start(account_id, trigger=trigger, seen_version=seen_version)
        )
        return await self._refresher.follow(outcome)

    async def refresh_for_token(self, account: Account, *, trigger: Trigger = "api") -> Outcome:
        """A fresh token is wanted: ``account``, as the reader loaded it, has none worth serving.

        Joins an attempt in flight. While a failure's backoff runs, a token that
        still lives waits for the timed retry: an app reading it in a loop during
        an outage must not make every read a call to Intuit. A dead one means the
        app is down until a refresh lands: an attempt starts now, once
        ``Retry-After`` has passed and at most one per ``backoff_initial``.
        """
        account_id = account.account_id
        state = self._states.get(account_id)
        if state is not None and state.attempt is not None:
            return await self._refresher.follow(await asyncio.shield(state.attempt))
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        now = self._clock.now()
        if state is not None and state.backing_off(now):
            dead = valid_for(account, now) <= timedelta(0)
            every = self._policy.dead_token_retry_every
            if not (dead and state.may_retry_early(now, self._clock.monotonic(), every)):
                return state.last or Outcome(
                    OutcomeKind.TRANSIENT,
                    None,
                    message="Intuit failed; the next try waits for its backoff",
                )
        outcome = await asyncio.shield(
            self._start(account_id, trigger=trigger, seen_version=account.version)
        )
        return await self._refresher.follow(outcome)

    def refresh_in_background(self, account_id: str, *, trigger: Trigger = "api") -> None:
        """A valid token inside the lead was served: refresh it, unless one is under way."""
        state = self._states.get(account_id)
        if state is not None and (
            state.attempt is not None or state.backing_off(self._clock.now())
        ):
            return
        if self._refusal() is None:
            self._start(account_id, trigger=trigger)

    async def wait_idle(self, account_id: str) -> None:
        """Wait until no refresh of ``account_id`` is in flight."""
        state = self._states.get(account_id)
        if state is not None and state.attempt is not None:
            await asyncio.wait({state.attempt})

    def _refusal(self) -> Outcome | None:
        """Why no attempt may start now, or None."""
        if self._stopping:
            return Outcome(OutcomeKind.TRANSIENT, None, message="the daemon is shutting down")
        if not self._pause.allows_call(self._clock.now().timestamp()):
            # Every asker would call Intuit with credentials it refuses.
            return Outcome(
                OutcomeKind.INVALID_CLIENT,
                None,
                message="refreshes are paused: Intuit refuses the client credentials",
            )
        return None

    # -- one attempt -------------------------------------------------------------

    def _start(
        self,
        account_id: str,
        *,
        trigger: Trigger,
        due: float | None = None,
        slot: asyncio.Semaphore | None = None,
        seen_version: int | None = None,
    ) -> asyncio.Task[Outcome]:
        self._pause.starting(account_id)
        task = asyncio.create_task(
            self._run(account_id, due, seen_version, trigger), name=f"refresh:{account_id}"
        )
        self._states.began(account_id, task)
        self._states.of(account_id).started = self._clock.monotonic()

        def done(_: asyncio.Task[Outcome]) -> None:
            self._states.ended(account_id, task)
            if slot is not None:
                slot.release()
            self._wakeup.set()

        task.add_done_callback(done)
        return task

    async def _run(
        self, account_id: str, due: float | None, seen_version: int | None, trigger: Trigger
    ) -> Outcome:
        # The task's own context: every line of this attempt names the account and the asker.
        structlog.contextvars.bind_contextvars(account_id=account_id, trigger=trigger)
        due_at = datetime.fromtimestamp(due, self._clock.now().tzinfo) if due else None
        try:
            outcome = await self._refresher.attempt(
                account_id, due=due_at, seen_version=seen_version
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a boundary: a database fault must not kill the timer
            self._heard_in_flight.pop(account_id, None)
            log.exception("refresh.crashed", error=str(exc))
            # A probe that failed this way proved nothing; the next due account probes.
            self._pause.inconclusive(account_id, self._clock.now().timestamp(), retry=None)
            self._wakeup.set()
            self._retry_later(account_id, None, reason=str(exc))
            return Outcome(OutcomeKind.TRANSIENT, None, message=str(exc))
        try:
            self._after(account_id, outcome)
            heard = self._heard_in_flight.pop(account_id, None)
            if heard is not None and outcome.kind is OutcomeKind.ELSEWHERE:
                self._retime(heard)
        except Exception as exc:  # a boundary: the timer must outlive a bug in its aftermath
            log.error(
                "refresh.reschedule_failed",
                account_id=account_id,
                error=type(exc).__name__,
                exc_info=True,
                detail="retrying at the backoff cap",
            )
            backoff_max = self._policy.settings.backoff_max.total_seconds()
            self.schedule(account_id, after(self._clock.now(), backoff_max))
        return outcome

    def _after(self, account_id: str, outcome: Outcome) -> None:
        """What an attempt's outcome means for the credentials and the account's timer."""
        self._credentials_after(account_id, outcome)
        kind = outcome.kind
        if kind is OutcomeKind.SUCCESS and outcome.account is not None:
            self._succeeded(account_id, outcome, outcome.account)
        elif kind is OutcomeKind.CURRENT and outcome.account is not None:
            if account_id not in self._current:
                self.schedule_account(outcome.account)
        elif kind is OutcomeKind.TRANSIENT:
            self._retry_later(account_id, outcome, reason=outcome.reason)
        elif kind in (OutcomeKind.INVALID_GRANT, OutcomeKind.REFRESH_TOKEN_EXPIRED):
            self.unschedule(account_id)
            self._events.emit(
                "account.reconnect_needed",
                account_id,
                reason=outcome.reason,
                intuit_tid=outcome.error.intuit_tid if outcome.error else None,
            )
        elif kind is OutcomeKind.INVALID_CLIENT:
            self._paused(account_id, outcome)
        elif kind is OutcomeKind.ELSEWHERE:
            # Its commit is announced and reschedules this timer; this one is in case
            # it never commits (its node died mid-call): try once its claim is over.
            retry_in = (outcome.retry_in or 0.0) + self._rng.uniform(0.05, 0.25)
            self.schedule(account_id, after(self._clock.now(), retry_in))
        elif kind is OutcomeKind.SKIPPED:
            current = outcome.account
            if current is not None and current.status.scheduled:
                self.schedule_account(current)
            else:
                self.unschedule(account_id)

    def _credentials_after(self, account_id: str, outcome: Outcome) -> None:
        """Intuit accepting our client (a success, or a refusal of the grant itself)
        from any asker proves the credentials; a probe that proved nothing hands on."""
        kind = outcome.kind
        if kind in (OutcomeKind.SUCCESS, OutcomeKind.INVALID_GRANT):
            if self._pause.accepted():
                log.info("intuit.credentials_accepted", detail="refreshes resume")
                self._metrics.set_healthy(True)
                self._wakeup.set()
        elif kind is not OutcomeKind.INVALID_CLIENT:
            # An outage answers again after the retry interval; an account that needed
            # no call hands the probe to the next due one.
            retry = self._invalid_client_retry if kind is OutcomeKind.TRANSIENT else None
            self._pause.inconclusive(account_id, self._clock.now().timestamp(), retry)
            self._wakeup.set()

    def _succeeded(self, account_id: str, outcome: Outcome, account: Account) -> None:
        state = self._states.get(account_id)
        failures = state.recovered() if state is not None else 0
        if account.reconnect_token_at is not None:
            if self._beyond_window(account.reconnect_token_at):
                self.unschedule(account_id)  # a refill of the window brings it back
            else:
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
        self._check_hard_expiry(
            account_id, account.refresh_token_hard_expires_at, self._clock.now()
        )

    def _retry_later(self, account_id: str, outcome: Outcome | None, *, reason: str) -> None:
        now = self._clock.now()
        state = self._states.of(account_id)
        state.failures += 1
        account = outcome.account if outcome else None
        expired = bool(account and account.token_expires_at and account.token_expires_at <= now)
        retry_after = outcome.retry_after if outcome else None
        delay = self._policy.retry_delay(
            state.failures, expired=expired, retry_after=retry_after, rng=self._rng
        )
        state.backoff_until = self._policy.retry_at(account, delay, now)
        state.retry_after_until = (
            now + timedelta(seconds=retry_after) if retry_after is not None else None
        )
        self.schedule(account_id, state.backoff_until)
        self._metrics.retry_scheduled()
        error = outcome.error if outcome else None
        log.warning(
            "refresh.retry_scheduled",
            attempt=state.failures,
            delay=round(delay, 3),
            error=reason,
            status=account.status.value if account else None,
            intuit_tid=error.intuit_tid if error else None,
        )

    def _paused(self, account_id: str, outcome: Outcome) -> None:
        now = self._clock.now()
        first = self._pause.refused(now.timestamp(), self._invalid_client_retry)
        self.schedule(account_id, now)  # the first to probe when the pause ends
        self._metrics.set_healthy(False)
        log_method = log.error if first else log.warning
        log_method(
            "intuit.client_refused",
            error=outcome.reason,
            intuit_tid=outcome.error.intuit_tid if outcome.error else None,
            detail="refreshes are paused; no account is marked; retrying",
            retry_in=self._invalid_client_retry,
        )

    @property
    def _invalid_client_retry(self) -> float:
        return self._policy.settings.invalid_client_retry.total_seconds()

    def _check_hard_expiry(self, account_id: str, hard: datetime | None, now: datetime) -> None:
        if hard is None:
            return
        state = self._states.get(account_id)
        if hard - now > self._policy.settings.hard_expiry_warning:
            # A reconnect brings a new hard expiry: warn again when that one nears.
            if state is not None and state.hard_expiry_warned:
                state.hard_expiry_warned = False
                self._states.forget_if_idle(account_id)
        elif state is None or not state.hard_expiry_warned:
            self._states.of(account_id).hard_expiry_warned = True
            self._events.emit(
                "account.hard_expiry_approached", account_id, hard_expires_at=iso(hard)
            )

    # -- what other daemons did ---------------------------------------------------------

    def heard(self, change: AccountChange | None) -> None:
        """Another daemon committed ``change``: time the account as its row now asks.

        None: changes may have been missed; the window is read again.
        """
        if change is None:
            self._resync = True
            self._wakeup.set()
            return
        account_id = change.account_id
        if self._in_flight(account_id):
            # This node's attempt decides when it ends, unless it found the account
            # claimed elsewhere: then this change is that claim's outcome (:meth:`_after`).
            self._heard_in_flight[account_id] = change
            return
        self._retime(change)

    def _retime(self, change: AccountChange) -> None:
        """Time ``change``'s account as its row now asks (no attempt of ours in flight)."""
        account_id = change.account_id
        due = change.reconnect_token_at
        if not change.status.scheduled or due is None:
            self.unschedule(account_id)
            return
        state = self._states.get(account_id)
        if change.failure_count == 0:
            if state is not None:
                state.recovered()
                self._states.forget_if_idle(account_id)
        elif change.last_failure_at is not None:
            # Its backoff, as the failing node may have timed it (without its jitter).
            delay = self._policy.retry_delay(
                change.failure_count, expired=False, retry_after=None, rng=self._no_jitter
            )
            due = max(due, after(change.last_failure_at, delay))
        if self._beyond_window(change.reconnect_token_at):
            self.unschedule(account_id)  # a refill of the window brings it back
        else:
            # A backoff past the window is kept: its time is not in the row, and no
            # refill would bring it back.
            self.schedule(account_id, due)

    # -- the window ----------------------------------------------------------------------

    def _beyond_window(self, due: datetime | None) -> bool:
        return due is not None and self._window_end is not None and due > self._window_end

    def _entry(
        self, account_id: str, due: float, *, now: float | None = None, delay: float | None = None
    ) -> _Entry:
        """``account_id``'s heap entry for ``due``: later by the head start another node has."""
        if self._cluster is None:
            return (due, next(self._seq), account_id, due)
        if delay is None:
            delay = self._cluster.delay(account_id)
        if delay:
            # An overdue account goes after every one this node is preferred for.
            now = self._clock.now().timestamp() if now is None else now
            return (max(due, now) + delay, next(self._seq), account_id, due)
        return (due, next(self._seq), account_id, due)

    # -- the live nodes ------------------------------------------------------------------

    def _live_changed(self) -> None:
        """A node joined or died: each timer's head start is that of the new preference."""
        if self._stopping:
            return
        self._rekey_again = True  # a pass under way goes round again
        if self._rekeying is None:
            self._rekeying = asyncio.create_task(self._rekey(), name="scheduler-rekey")

    async def _rekey(self) -> None:
        # Without it, a node that started alone (or before the others' heartbeats) would
        # go on taking every account of its window first and race the others for each.
        cluster = self._cluster
        assert cluster is not None  # only a cluster's live nodes change
        try:
            while self._rekey_again:
                self._rekey_again = False
                now = self._clock.now().timestamp()
                moved = 0
                for n, account_id in enumerate(list(self._current), 1):
                    entry = self._current.get(account_id)
                    if entry is not None:
                        delay = cluster.delay(account_id)
                        if bool(delay) != (entry[0] != entry[3]):
                            fresh = self._entry(account_id, entry[3], now=now, delay=delay)
                            self._current[account_id] = fresh
                            heapq.heappush(self._heap, fresh)
                            moved += 1
                    if n % _TIMERS_PER_TURN == 0:
                        await asyncio.sleep(0)  # the dispatcher's turn
                        now = self._clock.now().timestamp()
                if len(self._heap) > 2 * len(self._current) + _TIMERS_PER_TURN:
                    # Replaced entries wait in the heap until their time (lazy deletion):
                    # once they outnumber the live ones, the heap is built again.
                    self._heap = list(self._current.values())
                    heapq.heapify(self._heap)
                log.debug("scheduler.rekeyed", moved=moved)
        except Exception:  # a boundary: the timers keep their head starts until the next change
            log.exception("scheduler.rekey_crashed")
        finally:
            self._rekeying = None
            self._wakeup.set()

    def _refill_wanted(self) -> bool:
        """Whether to read the next stretch: half the window is used, or changes were missed."""
        if self._refill_failed_at is not None and time.monotonic() - self._refill_failed_at < 1:
            return False
        if self._resync:
            return True
        end = self._window_end
        if self._window is None or end is None:
            return False
        return (end - self._clock.now()).total_seconds() <= self._window / 2

    def _start_refill(self) -> None:
        """Read the next stretch beside the dispatcher, which goes on dispatching meanwhile."""
        if self._refilling is None and self._refill_wanted():
            self._refilling = asyncio.create_task(self._refill(), name="scheduler-refill")

    async def _refill(self) -> None:
        """Move the window on: time the accounts that fall due in the next stretch
        (or, after missed changes, every account of the window again)."""
        try:
            await self._read_window()
        except Exception:  # a boundary: the next turn tries again
            log.exception("scheduler.refill_crashed", detail="retrying")
            self._refill_failed_at = time.monotonic()
        finally:
            self._refilling = None
            self._wakeup.set()

    async def _read_window(self) -> None:
        resync, self._resync = self._resync, False
        previous = end = self._window_end
        if self._window is not None:
            end = after(self._clock.now(), self._window)
        # Moved before the read: a due time between the two ends set while it runs
        # (a connect, a change heard, a refresh) is kept, and the read skips timers set.
        self._window_end = end
        try:
            entries = await self._storage.schedule_entries(end, after=None if resync else previous)
        except StorageError as exc:
            self._window_end = previous
            self._resync = self._resync or resync
            self._refill_failed_at = time.monotonic()
            log.warning("scheduler.refill_failed", error=str(exc), detail="retrying")
            return
        self._refill_failed_at = None
        added = 0
        for n, entry in enumerate(entries, 1):
            account_id = entry.account_id
            # A timer already set knows better (a retry's backoff, another node's change).
            if account_id not in self._current and not self._in_flight(account_id):
                self.schedule(account_id, entry.reconnect_token_at)
                added += 1
            if n % _TIMERS_PER_TURN == 0:
                await asyncio.sleep(0)  # the dispatcher's turn: timers due meanwhile fire
        log.debug("scheduler.window_moved", until=iso(end), added=added, resync=resync)

    # -- the dispatcher ----------------------------------------------------------------

    def _load(self, entries: Iterable[ScheduleEntry]) -> None:
        now = self._clock.now().timestamp()
        for entry in entries:
            item = self._entry(entry.account_id, entry.reconnect_token_at.timestamp(), now=now)
            self._current[entry.account_id] = item
            self._heap.append(item)
        heapq.heapify(self._heap)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._current.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)

    def _in_flight(self, account_id: str) -> bool:
        state: AccountState | None = self._states.get(account_id)
        return state is not None and state.attempt is not None

    async def _dispatch(self) -> None:
        while not self._stopping:
            self.last_turn = time.monotonic()
            self._wakeup.clear()
            self._start_refill()
            self._drop_stale()
            now = self._clock.now().timestamp()
            if self._heap and self._heap[0][0] <= now and self._pause.allows_call(now):
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
                    or not self._pause.allows_call(now)
                ):
                    slot.release()
                    continue
                _, _, account_id, due = heapq.heappop(self._heap)
                del self._current[account_id]
                trigger = self._triggers.pop(account_id, "scheduled")
                if self._in_flight(account_id):
                    # An API refresh is already under way; its result reschedules.
                    slot.release()
                    continue
                # Lateness counts from the account's own due time, a head start included.
                self._start(account_id, trigger=trigger, due=due, slot=slot)
                continue
            wait = self._max_wait
            if self._window_end is not None and self._window is not None:
                # Wake when the window is half used, to move it on.
                half_used = self._window_end.timestamp() - self._window / 2
                wait = min(wait, max(half_used - now, 0.0) + 0.001)
            if self._heap and self._pause.state is not PauseState.PROBING:
                # Paused, the next dispatch is when both the entry and the pause are due;
                # waiting for only one of them would spin until the other comes.
                next_at = self._heap[0][0]
                if self._pause.state is PauseState.PAUSED:
                    next_at = max(next_at, self._pause.until)
                wait = min(wait, max(next_at - now, 0.0))
            self._metrics.set_next_due(self._heap[0][0] - now if self._heap else None)
            await self._wait(wait)

    async def _wait(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.sleep(0)  # both have started: the sleep is counted from now
            self.waiting = True
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting = False
            for task in (sleeper, waker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class _NoJitter(random.Random):
    """The top of each jitter range: when another node's backoff ends at the latest."""

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)


def _dispatch_width(concurrency: int) -> int:
    """Timer attempts in flight at once: twice the Intuit calls allowed.

    An attempt holds its Intuit slot only while it loads its row and calls
    Intuit; the other half are committing, so Intuit's capacity never idles on
    the database.
    """
    return 2 * concurrency
