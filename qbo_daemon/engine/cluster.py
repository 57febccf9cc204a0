"""This daemon among several on one database: who is alive, who goes first, what changed.

Every node times the same accounts (each its own window of them) and any of
them may claim one when it falls due; the claim (``store.port.ClaimStore``)
makes sure only one calls Intuit. So that normally one node does each
account's work without racing the others, the accounts are spread by
rendezvous hashing over the live nodes: the node with the highest
``hash(node, account)`` is preferred and claims at the due time; the others
wait :attr:`Cluster.head_start` longer, and claim only if it has not. A dead
node's accounts are therefore taken over about a second late, and once its
heartbeat is older than ``dead_after`` it is no longer anyone's preference.

Node identity and liveness live in the database (the ``nodes`` heartbeat
rows), so every node sees the same list. A node's first heartbeat and its
leaving are announced (``listen_nodes``), and the others read the list at
once: a node that starts or stops is not raced for up to a heartbeat. A node
that dies announces nothing; its heartbeat ages out. The heartbeat also brings back a
LISTEN connection the server cut; the change notifications it carries wake
the askers waiting for another node's refresh (:meth:`Cluster.wait_change`)
and reschedule this node's timers (``Scheduler.heard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Iterator

import structlog

from qbo_daemon.core.errors import StorageError
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.store.port import AccountChange, ClaimStore, NodeInfo

log = structlog.get_logger("qbo_daemon.engine.cluster")

HEARTBEAT_EVERY = 1.0
DEAD_AFTER = 5.0  # a node silent this long is no longer anyone's preference
HEAD_START = 1.0  # how long the preferred node has a due account to itself
# Claims last the Intuit timeout plus this twice: once to start the call in time,
# once to commit its answer before the lease ends.
LEASE_MARGIN = 5.0
# How long after another node's unanswered call an invalid_grant is not believed: that
# call may have rotated the refresh token, and its node may yet come back and store it.
TAKEOVER_GRACE = 600.0


class Cluster:
    """The nodes sharing the database, as this node's heartbeat last read them."""

    def __init__(
        self,
        claims: ClaimStore,
        *,
        metrics: Metrics | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        dead_after: float = DEAD_AFTER,
        head_start: float = HEAD_START,
    ) -> None:
        self.claims = claims
        self._metrics = metrics
        self.node_id = claims.node_id
        self.head_start = head_start
        self._heartbeat_every = heartbeat_every
        self._dead_after = dead_after
        self.nodes: list[NodeInfo] = []
        self._live: tuple[str, ...] = (self.node_id,)
        self._waiters: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}  # askers per waiter, to drop it with the last
        self._listeners: list[Callable[[AccountChange | None], None]] = []
        self._live_listeners: list[Callable[[], None]] = []
        self.connected = False  # whether the latest heartbeat reached the database
        self._early_beat: asyncio.Task[None] | None = None  # one another node's notice asked for

    @property
    def live(self) -> tuple[str, ...]:
        """The ids of the nodes alive at the latest heartbeat, this one always among them."""
        return self._live

    # -- who goes first ----------------------------------------------------------------

    def preferred(self, account_id: str) -> str:
        """The live node that claims ``account_id`` first (rendezvous hashing)."""
        live = self._live
        if len(live) == 1:
            return live[0]  # alone: no hash to compute for each timer
        return max(live, key=lambda node: _score(node, account_id))

    def delay(self, account_id: str) -> float:
        """How long after an account's due time this node claims it."""
        return 0.0 if self.preferred(account_id) == self.node_id else self.head_start

    # -- changes ------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[AccountChange | None], None]) -> None:
        """Call ``listener`` for each change another node committed (None: some were missed)."""
        self._listeners.append(listener)

    def on_live_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a node joins or is found dead: preferences move."""
        self._live_listeners.append(listener)

    async def start(self) -> None:
        """Listen for changes and say this node is alive (before it serves or refreshes).

        Raises :class:`ConfigError` when another live process uses this node id.
        """
        await self.claims.join(self._dead_after)
        await self.claims.listen(self._heard)
        await self.claims.listen_nodes(self._node_announced)
        await self._beat()

    def _heard(self, change: AccountChange | None) -> None:
        if change is not None:
            waiter = self._waiters.pop(change.account_id, None)
            if waiter is not None:
                waiter.set()
            if change.origin == self.node_id:
                return  # this node acted on its own write already
        for listener in self._listeners:
            listener(change)

    def _node_announced(self, node_id: str) -> None:
        # Another node came up or left: read the nodes now, not at the next heartbeat, so
        # neither races the other for the accounts whose preference moved.
        if node_id != self.node_id and self._early_beat is None:
            self._early_beat = asyncio.create_task(self._beat_now(), name="cluster-beat")

    async def _beat_now(self) -> None:
        try:
            await self._beat()
        finally:
            self._early_beat = None

    @contextlib.contextmanager
    def watching(self, account_id: str) -> Iterator[asyncio.Event]:
        """An event set by the next committed change of ``account_id`` (any node's).

        Taken before the question that may make one wait, so a change that
        lands between the question and the wait is not missed.
        """
        waiter = self._waiters.setdefault(account_id, asyncio.Event())
        self._waiting[account_id] = self._waiting.get(account_id, 0) + 1
        try:
            yield waiter
        finally:
            left = self._waiting.pop(account_id) - 1
            if left:
                self._waiting[account_id] = left
            elif self._waiters.get(account_id) is waiter:
                del self._waiters[account_id]

    # -- the heartbeat ------------------------------------------------------------------

    async def run(self) -> None:
        """Beat every ``heartbeat_every`` seconds until cancelled (a supervised task)."""
        while True:
            await asyncio.sleep(self._heartbeat_every)
            await self._beat()

    async def _beat(self) -> None:
        try:
            nodes = await self.claims.heartbeat()
        except StorageError as exc:
            if self.connected:
                log.error(
                    "cluster.heartbeat_failed",
                    error=str(exc),
                    detail="this node reports unready until the database answers again",
                )
            self.connected = False
            return
        if not self.connected:
            log.info("cluster.joined", node_id=self.node_id, nodes=len(nodes))
        self.connected = True
        self.nodes = nodes
        if self._metrics is not None:
            self._metrics.set_cluster(self.node_id, {n.node_id: n.age for n in nodes})
        live = tuple(n.node_id for n in nodes if n.age <= self._dead_after)
        if self.node_id not in live:
            live = (*live, self.node_id)
        changed = set(live) != set(self._live)
        self._live = live
        if changed:
            log.info("cluster.changed", live=sorted(live))
            for listener in self._live_listeners:
                listener()

    async def leave(self) -> None:
        """Remove this node's heartbeat row, so the others stop waiting for it at once."""
        if self._early_beat is not None:
            self._early_beat.cancel()
            await asyncio.wait({self._early_beat})
        try:
            await self.claims.leave()
        except StorageError as exc:
            log.warning("cluster.leave_failed", error=str(exc))


def _score(node: str, account_id: str) -> int:
    digest = hashlib.blake2b(f"{node}\0{account_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
