"""Claims and heartbeats: how several daemons on one database share the refreshes.

A claim is a lease on one account's row (``lease_owner``, ``lease_until``)
that a node takes right before it calls Intuit, with a new
``lease_generation`` each time: the fencing token its commit names. Leases
are timed by the database's clock (``clock_timestamp()``), so nodes whose
clocks disagree still agree on who holds what.

``inflight_since`` marks a call to Intuit that no commit has answered yet. A
claim keeps the oldest mark; the claim's commit clears it (always when it
stores new tokens). A node that claims a row still marked took over from a
node that died or was paused mid-call (:attr:`Claim.abandoned_since`): that
call may have rotated the refresh token, so a refusal is not final at once
(``engine/refresher.py``).
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import UTC, datetime

import asyncpg

from qbo_daemon.core.errors import ConfigError
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import Busy, Claim, Claimed, ClaimResult, NodeInfo, NotDue
from qbo_daemon.store.postgres.database import Conn, PgDatabase
from qbo_daemon.store.postgres.rows import POSTGRES_FORMS
from qbo_daemon.store.rows import ACCOUNT_COLUMNS, account_from_row

_COLUMNS = ", ".join(f"a.{column}" for column in ACCOUNT_COLUMNS)
# $1 account, $2 node, $3 lease seconds, $4 due-by (NULL: any time).
CLAIM = (
    "WITH prior AS (SELECT account_id, inflight_since AS prior_inflight FROM accounts "
    "WHERE account_id = $1 FOR UPDATE) "
    "UPDATE accounts a SET lease_owner = $2, "
    "lease_until = clock_timestamp() + $3 * interval '1 second', "
    "lease_generation = a.lease_generation + 1, "
    "inflight_since = coalesce(a.inflight_since, clock_timestamp()) "
    "FROM prior p WHERE a.account_id = p.account_id "
    "AND (a.lease_until IS NULL OR a.lease_until <= clock_timestamp() OR a.lease_owner = $2) "
    "AND ($4::timestamptz IS NULL OR a.reconnect_token_at <= $4::timestamptz) "
    f"RETURNING {_COLUMNS}, a.lease_generation, p.prior_inflight, "
    "extract(epoch from clock_timestamp() - p.prior_inflight)::float8 AS abandoned_for"
)
# Why a claim was not granted: who holds the row, and for how much longer.
HOLDER = (
    f"SELECT {_COLUMNS}, a.lease_owner, "
    "extract(epoch from a.lease_until - clock_timestamp())::float8 AS remaining "
    "FROM accounts a WHERE a.account_id = $1"
)
# A claim that made no call: the mark of an abandoned call goes back to what it was.
RELEASE = (
    "UPDATE accounts SET lease_owner = NULL, lease_until = NULL, inflight_since = $4 "
    "WHERE account_id = $1 AND lease_owner = $2 AND lease_generation = $3"
)
HEARTBEAT = (
    "INSERT INTO nodes (node_id, host, pid, started_at, heartbeat_at) "
    "VALUES ($1, $2, $3, $4, clock_timestamp()) ON CONFLICT (node_id) DO UPDATE SET "
    "host = EXCLUDED.host, pid = EXCLUDED.pid, started_at = EXCLUDED.started_at, "
    "heartbeat_at = clock_timestamp()"
)
NODES = (
    "SELECT node_id, host, pid, started_at, heartbeat_at, "
    "extract(epoch from clock_timestamp() - heartbeat_at)::float8 AS age FROM nodes "
    "ORDER BY node_id"
)
# A node's first heartbeat and its leaving are announced, so the others read the nodes
# at once instead of at their next heartbeat (and re-time their accounts; payload: its id).
NODES_CHANNEL = "qbo_nodes"
ANNOUNCE = f"SELECT pg_notify('{NODES_CHANNEL}', $1)"
# Rows of nodes silent this long are deleted: a crashed node's id does not linger.
FORGET_NODES = "DELETE FROM nodes WHERE heartbeat_at < clock_timestamp() - interval '1 day'"


class ClaimTable:
    """The claims on ``accounts`` and the ``nodes`` heartbeat rows of one node."""

    def __init__(self, database: PgDatabase, cipher: Cipher, node_id: str) -> None:
        self._db = database
        self.cipher = cipher
        self.node_id = node_id
        # Who holds a lease: the node and this process. Two processes given one node id
        # (a copied config) still never hold one account's claim at once.
        self.owner = f"{node_id}#{secrets.token_hex(4)}"
        self._host = socket.gethostname()
        self._started_at = datetime.now(UTC)
        self._announced = False  # whether a heartbeat has told the others this node is up

    async def claim(
        self, account_id: str, *, lease: float, due_by: datetime | None
    ) -> ClaimResult | None:
        # One statement, a transaction of its own; only a refusal reads who holds it.
        granted = await self._db.write_one(CLAIM, account_id, self.owner, lease, due_by)
        if granted is not None:
            account = account_from_row(self.cipher, granted, tokens=True, forms=POSTGRES_FORMS)
            claim = Claim(
                account_id,
                self.owner,
                granted["lease_generation"],
                lease,
                abandoned_since=granted["prior_inflight"],
                abandoned_for=granted["abandoned_for"],
            )
            return Claimed(account, claim)
        holder = await self._db.fetchrow(HOLDER, account_id)
        if holder is None:
            return None
        account = account_from_row(self.cipher, holder, tokens=True, forms=POSTGRES_FORMS)
        remaining = holder["remaining"]
        owner = holder["lease_owner"]
        if owner is not None and owner != self.owner and remaining is not None and remaining > 0:
            return Busy(account, owner, remaining)
        if due_by is not None and (
            account.reconnect_token_at is None or account.reconnect_token_at > due_by
        ):
            return NotDue(account)
        # The lease ran out between the two statements: free again, at once.
        return Busy(account, owner or "", 0.0)

    async def release(self, claim: Claim) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                RELEASE, claim.account_id, claim.owner, claim.generation, claim.abandoned_since
            )
        )

    async def join(self, live_within: float) -> None:
        """Refuse to start as a node id another live process is using.

        Raises :class:`ConfigError` when this id's heartbeat row is younger than
        ``live_within`` seconds and names another host or process.
        """
        record = await self._db.fetchrow(
            "SELECT host, pid, extract(epoch from clock_timestamp() - heartbeat_at)::float8 AS age "
            "FROM nodes WHERE node_id = $1",
            self.node_id,
        )
        if record is None or record["age"] > live_within:
            return
        if record["host"] == self._host and not _running(record["pid"]):
            return  # this host's previous daemon, killed and restarted at once
        if (record["host"], record["pid"]) == (self._host, os.getpid()):
            return
        raise ConfigError(
            f"node id {self.node_id!r} is in use by {record['host']} (PID {record['pid']}, "
            f"heartbeat {max(record['age'], 0.0):.1f} s ago): give each daemon its own "
            "[cluster] node_id, or leave it unset (HOST:PID)",
            key="cluster",
        )

    async def heartbeat(self) -> list[NodeInfo]:
        announce = not self._announced

        async def work(conn: Conn) -> list[asyncpg.Record]:
            await conn.execute(HEARTBEAT, self.node_id, self._host, os.getpid(), self._started_at)
            await conn.execute(FORGET_NODES)
            if announce:
                await conn.execute(ANNOUNCE, self.node_id)
            return await conn.fetch(NODES)

        records = await self._db.write(work)
        self._announced = True
        return [
            NodeInfo(
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                started_at=r["started_at"],
                heartbeat_at=r["heartbeat_at"],
                age=max(0.0, r["age"]),
            )
            for r in records
        ]

    async def leave(self) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute("DELETE FROM nodes WHERE node_id = $1", self.node_id)
            await conn.execute(ANNOUNCE, self.node_id)

        await self._db.write(work)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
