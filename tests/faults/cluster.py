"""Several real ``qbo-daemon run`` processes on one database, against one simulator process.

:class:`Cluster` is a context manager that starts, in order: the simulator
(``qbo-daemon simulator``, its own process), a fresh PostgreSQL database
(``tests/pg.py``; or, with ``storage="sqlite"`` and one node, an SQLite file),
and N daemons sharing ``[storage] url``, the encryption key and the API key,
each with its own ``[cluster] node_id``, ``[api] listen`` and
``[callback] listen``. It waits until every node answers ``GET /readyz`` with
200. On exit, even after a failed assertion or an interrupt, it resumes paused
nodes, stops every node (SIGTERM to all at once, SIGKILL after the bounded
wait), stops the simulator and drops the database: nothing is left behind.

Around it: :meth:`Cluster.seed` mints connections at the simulator and imports
them through one node's ``POST /v1/import``, each falling due when the test
says; :meth:`Cluster.kill9`, :meth:`Cluster.pause`, :meth:`Cluster.resume`,
:meth:`Cluster.restart` act on one node; :meth:`Cluster.cut_database`
terminates every PostgreSQL connection of the nodes (never the server);
:class:`Ledger` follows each account's refresh-token chain through the
simulator's request log; :meth:`Cluster.rows` reads (and decrypts) every
account's row from the database; :class:`Balancer` plays a round-robin load
balancer in front of the nodes that are up, retrying a refused or cut
connection on the next node as nginx does (``proxy_next_upstream error``).

Everything is synchronous (threads, ``requests``; ``asyncio.run`` for the few
database calls), like ``procs.py``: call it from plain ``def`` tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import asyncpg
import requests

from qbo_daemon.core.models import iso
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from tests import pg
from tests.faults.procs import (
    HTTP_TIMEOUT,
    START_TIMEOUT,
    DaemonProcess,
    SimulatorProcess,
    parse_time,
    wait_until,
)

Storage = Literal["postgresql", "sqlite"]
# Variables a node must not inherit from the test's environment: they would
# change its database or configuration behind the harness's back.
_OWN_VARIABLES = ("QBO_STORAGE_URL", "QBO_DAEMON_CONFIG", "CREDENTIALS_DIRECTORY")
_ROW_COLUMNS = (
    "account_id, status, realm_id, access_token, refresh_token, token_expires_at, "
    "reconnect_token_at, last_refreshed_at, version, last_error"
)
_SECRETS = ("realm_id", "access_token", "refresh_token")
MAX_GRANTS_PER_CALL = 10_000


def node_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _OWN_VARIABLES}


# -- the database -------------------------------------------------------------------


class PgDatabase:
    """A fresh PostgreSQL database for one cluster (``tests/pg.py``), dropped on close.

    Skips the test when no server answers (fails it when ``CI=true``).
    """

    def __init__(self) -> None:
        asyncio.run(pg.require_server())
        self.name = asyncio.run(pg.create_database())
        self.url = pg.database_url(self.name)

    def terminate_backends(self) -> int:
        """End every connection to this database (the nodes'); how many were ended.

        The server keeps running: only these backends die, as on a PostgreSQL
        restart seen from the nodes, without touching the machine's service.
        """

        async def run() -> int:
            conn = await asyncpg.connect(pg.ADMIN_URL, timeout=5)
            try:
                ended = await conn.fetchval(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS ended "
                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()) t "
                    "WHERE ended",
                    self.name,
                )
            finally:
                await conn.close()
            return int(ended)

        return asyncio.run(run())

    def backends(self) -> int:
        """Connections open to this database now."""

        async def run() -> int:
            conn = await asyncpg.connect(pg.ADMIN_URL, timeout=5)
            try:
                found = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", self.name
                )
            finally:
                await conn.close()
            return int(found)

        return asyncio.run(run())

    def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.url, timeout=5)
            try:
                return [dict(r) for r in await conn.fetch(query, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def close(self) -> None:
        asyncio.run(pg.drop_database(self.name))

    @staticmethod
    def exists(name: str) -> bool:
        async def run() -> bool:
            conn = await asyncpg.connect(pg.ADMIN_URL, timeout=5)
            try:
                found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            finally:
                await conn.close()
            return found is not None

        return asyncio.run(run())


# -- one node -----------------------------------------------------------------------


@dataclass
class Node(DaemonProcess):
    """One ``qbo-daemon run`` of the cluster; ``paused`` while it is SIGSTOPped."""

    node_id: str = ""
    paused: bool = False

    def ready(self) -> bool:
        """Whether ``GET /readyz`` answers 200 now (False while down or paused)."""
        if not self.alive or self.paused:
            return False
        try:
            return requests.get(f"{self.api_url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def answered() -> bool:
            if not self.alive:
                raise AssertionError(f"node {self.node_id} exited:\n" + "\n".join(self.lines[-30:]))
            return self.ready()

        wait_until(answered, timeout=timeout, interval=0.1, what=f"node {self.node_id} ready")

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
        self.paused = False

    def unread_answers(self, port: int) -> int:
        """This process's TCP connections to 127.0.0.1:``port`` holding bytes it has not read.

        Read while it is paused: each is a call it had in flight when it stopped,
        answered since (``/proc``: its socket inodes, and the kernel's receive queues).
        """
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        unread = 0
        for line in Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            receive_queue = int(fields[4].split(":")[1], 16)
            if remote_port == port and fields[9] in inodes and receive_queue > 0:
                unread += 1
        return unread

    def ask_to_stop(self) -> None:
        """SIGTERM without waiting (the drain runs meanwhile); :meth:`terminate` reaps."""
        if self.alive:
            self.resume()  # a stopped process would hold the SIGTERM pending
            self.signal(signal.SIGTERM)

    def events(self, name: str | None = None) -> Iterator[dict[str, Any]]:
        """The node's JSON log lines, only those of event ``name`` if given."""
        for event in super().events():
            if name is None or event.get("event") == name:
                yield event


# -- what the simulator saw ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seeded:
    """One account brought in by :meth:`Cluster.seed`."""

    account_id: str
    realm_id: str
    refresh_token: str
    access_token: str | None  # None: imported without one (due at once)
    due_at: float  # the next_refresh_at the importing node answered, epoch seconds


@dataclass
class Ledger:
    """Each seeded account's refresh-token chain, followed through the simulator's log.

    ``refreshes[account]``: the arrival times of its refresh calls answered 200;
    ``chains[account]``: every refresh token value it was given, the simulator's
    current one last;
    ``misuses``: the log entries flagged ``concurrent_use`` or ``stale_use``.
    """

    owner: dict[str, str] = field(default_factory=dict)  # refresh token -> account
    chains: dict[str, list[str]] = field(default_factory=dict)  # account -> its values, in order
    refreshes: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: Counter[str] = field(default_factory=Counter)
    misuses: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, seeded: dict[str, Seeded], log: list[dict[str, Any]]) -> Ledger:
        ledger = cls()
        for account in seeded.values():
            ledger.owner[account.refresh_token] = account.account_id
            ledger.chains[account.account_id] = [account.refresh_token]
        for entry in log:
            if entry["endpoint"] != "token" or entry["grant_type"] != "refresh_token":
                continue
            if entry.get("concurrent_use") or entry.get("stale_use"):
                ledger.misuses.append(entry)
            account_id = ledger.owner.get(entry["presented_refresh_token"])
            if account_id is None:
                continue
            if entry["status"] != 200:
                ledger.failures[entry["error"] or entry["fault"] or str(entry["status"])] += 1
                continue
            ledger.refreshes[account_id].append(parse_time(entry["at"]))
            issued = entry["issued_refresh_token"]
            if issued and issued != entry["presented_refresh_token"]:
                ledger.owner[issued] = account_id
                ledger.chains[account_id].append(issued)
        return ledger

    def first_refresh(self, account_id: str, after: float = 0.0) -> float | None:
        times = [t for t in self.refreshes.get(account_id, ()) if t >= after]
        return min(times) if times else None


# -- rows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One account as stored, secrets decrypted."""

    account_id: str
    status: str
    realm_id: str | None
    access_token: str | None
    refresh_token: str | None
    token_expires_at: float | None
    reconnect_token_at: float | None
    last_refreshed_at: float | None
    version: int
    last_error: str | None


def _epoch(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or UTC).timestamp()
    return parse_time(str(value))


def _row(record: dict[str, Any], cipher: Cipher) -> Row:
    plain = {
        column: None
        if record[column] is None
        else cipher.decrypt(
            record[column], table="accounts", column=column, row_key=record["account_id"]
        )
        for column in _SECRETS
    }
    return Row(
        account_id=record["account_id"],
        status=record["status"],
        realm_id=plain["realm_id"],
        access_token=plain["access_token"],
        refresh_token=plain["refresh_token"],
        token_expires_at=_epoch(record["token_expires_at"]),
        reconnect_token_at=_epoch(record["reconnect_token_at"]),
        last_refreshed_at=_epoch(record["last_refreshed_at"]),
        version=int(record["version"]),
        last_error=record["last_error"],
    )


# -- the cluster --------------------------------------------------------------------


class Cluster:
    """N daemons on one database against one simulator; see the module's docstring.

    ``lead`` (seconds) is every node's ``[refresh] lead``; ``concurrency`` its
    ``[refresh] concurrency``; ``intuit_timeout`` its ``[intuit] timeout``
    (the claim's lease follows it). ``refresh_extra`` and ``extra`` add raw
    TOML to ``[refresh]`` and to the end of each node's file.
    """

    def __init__(
        self,
        root: Path,
        *,
        nodes: int = 3,
        storage: Storage = "postgresql",
        expires_in: int = 3600,
        rotate_after: float = 0.0,
        latency: float = 0.0,
        lead: float = 600.0,
        concurrency: int = 8,
        intuit_timeout: str = "3s",
        backoff_initial: str = "0.5s",
        backoff_max: str = "2s",
        refresh_extra: str = "",
        extra: str = "",
    ) -> None:
        if storage == "sqlite" and nodes != 1:
            raise ValueError("one SQLite file serves one daemon: use PostgreSQL for several")
        self.root = root
        self.count = nodes
        self.storage = storage
        self.lead = lead
        self._node_settings = {
            "lead": f"{lead:g}s",
            "backoff_initial": backoff_initial,
            "backoff_max": backoff_max,
            "intuit_timeout": intuit_timeout,
            "refresh_extra": f"concurrency = {concurrency}\n{refresh_extra}",
            "extra": extra,
        }
        self.sim = SimulatorProcess(
            expires_in=expires_in, rotate_after=rotate_after, latency=latency
        )
        self.database: PgDatabase | None = None
        self.nodes: list[Node] = []
        self.api_key = "cluster-api-key-" + generate_key()[:20]
        self.encryption_key = generate_key()
        self.cipher = Cipher([EncryptionKey.from_text(self.encryption_key)])
        self.seeded: dict[str, Seeded] = {}
        self._serial = itertools.count()

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.sim.start()
            if self.storage == "postgresql":
                self.database = PgDatabase()
            self.nodes = [self._node(number) for number in range(self.count)]
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _node(self, number: int) -> Node:
        node_id = f"node-{number + 1}"
        storage_extra = ""
        if self.database is not None:
            storage_extra = f'url = "{self.database.url}"'
        return Node(
            data_dir=self.root / node_id,
            simulator=self.sim,
            api_key=self.api_key,
            encryption_key=self.encryption_key,
            storage_extra=storage_extra,
            extra=self._node_settings["extra"] + f'\n[cluster]\nnode_id = "{node_id}"\n',
            env=node_environ(),
            node_id=node_id,
            lead=self._node_settings["lead"],
            backoff_initial=self._node_settings["backoff_initial"],
            backoff_max=self._node_settings["backoff_max"],
            intuit_timeout=self._node_settings["intuit_timeout"],
            refresh_extra=self._node_settings["refresh_extra"],
        )

    def close(self) -> None:
        """Stop every node and the simulator, drop the database; safe to call twice."""
        errors: list[BaseException] = []
        for node in self.nodes:
            with _collect(errors):
                node.ask_to_stop()
        for node in self.nodes:
            with _collect(errors):
                node.close()
        with _collect(errors):
            self.sim.close()
        database, self.database = self.database, None
        if database is not None:
            with _collect(errors):
                database.close()
        if errors:
            raise errors[0]

    # -- one node ------------------------------------------------------------------

    def kill9(self, number: int) -> float:
        """SIGKILL node ``number``; the wall time it was sent."""
        node = self.nodes[number]
        node.resume()
        node.kill9()
        return node.kills[-1]

    def pause(self, number: int) -> float:
        """SIGSTOP node ``number``: its sockets stay open, nothing in it runs."""
        self.nodes[number].pause()
        return time.time()

    def pause_mid_call(self, number: int, *, keep_rotation: float) -> tuple[float, int]:
        """SIGSTOP node ``number`` while it has calls to Intuit in flight: (when, how many).

        Each call is seen as its answer waiting unread in the stopped node's
        sockets, once the simulator's ``latency`` has passed. Meanwhile the
        simulator's ``rotate_after`` is ``keep_rotation``, so that an answer the
        stopped node holds is not the only copy of a rotated chain; the caller
        sets it back. A stop that caught no call is undone (SIGCONT, well within a
        claim) and tried again, 8 times at most; (when, 0) if none caught one.
        """
        node = self.nodes[number]
        paused_at = 0.0
        rotate_after = self.sim.settings.rotate_after
        for _ in range(8):
            self.sim.update(rotate_after=keep_rotation)
            paused_at = self.pause(number)
            time.sleep(self.sim.settings.latency + 0.5)
            caught = node.unread_answers(self.sim.port)
            if caught:
                return paused_at, caught
            self.resume(number)
            self.sim.update(rotate_after=rotate_after)
            time.sleep(0.7)
        return paused_at, 0

    def resume(self, number: int) -> float:
        self.nodes[number].resume()
        return time.time()

    def stop(self, number: int) -> int:
        """SIGTERM node ``number`` and wait for its drain; its exit status."""
        node = self.nodes[number]
        node.resume()
        return node.terminate()

    def start(self, number: int) -> None:
        """Start node ``number`` again (same configuration) and wait until it is ready."""
        node = self.nodes[number]
        node.spawn()
        node.wait_ready()

    def restart(self, number: int) -> int:
        code = self.stop(number)
        self.start(number)
        return code

    def up(self) -> list[Node]:
        """The nodes whose process runs and is not paused."""
        return [n for n in self.nodes if n.alive and not n.paused]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        for node in self.up():
            node.wait_ready(timeout)

    # -- the database ---------------------------------------------------------------

    def cut_database(self) -> int:
        """Terminate every connection of the nodes to PostgreSQL; how many there were."""
        assert self.database is not None, "only a PostgreSQL cluster has connections to cut"
        return self.database.terminate_backends()

    def rows(self) -> dict[str, Row]:
        """Every account as stored, decrypted with the cluster's key.

        PostgreSQL: read live. SQLite: read live beside the running node (WAL),
        or from a copy once it is stopped (as ``DaemonProcess.snapshot``).
        """
        if self.database is not None:
            records = self.database.fetch(f"SELECT {_ROW_COLUMNS} FROM accounts")  # noqa: S608
        else:
            records = self._sqlite_records()
        return {r["account_id"]: _row(r, self.cipher) for r in records}

    def _sqlite_records(self) -> list[dict[str, Any]]:
        node = self.nodes[0]
        query = f"SELECT {_ROW_COLUMNS} FROM accounts"  # noqa: S608
        if node.alive:  # a WAL reader beside the running daemon
            source = f"file:{node.database}?mode=ro"
        else:  # a copy: never replay a stopped daemon's WAL for it
            scratch = self.root / "rows-copy"
            scratch.mkdir(parents=True, exist_ok=True)
            copy = scratch / "copy.sqlite3"
            for suffix in ("", "-wal"):
                target = Path(str(copy) + suffix)
                target.unlink(missing_ok=True)
                original = Path(str(node.database) + suffix)
                if original.exists():
                    shutil.copyfile(original, target)
            Path(str(copy) + "-shm").unlink(missing_ok=True)
            source = f"file:{copy}"
        with contextlib.closing(sqlite3.connect(source, uri=True)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(query).fetchall()]

    # -- accounts -------------------------------------------------------------------

    def seed(self, dues: Sequence[float | None], *, via: int = 0) -> dict[str, Seeded]:
        """Import one new connection per entry of ``dues``, through node ``via``.

        An entry is how many seconds from now the account falls due (its access
        token expires ``lead`` later), or None for an account with no access
        token: due at once, as after an outage. The simulator mints each
        connection first, so it knows every refresh token.
        """
        grants: list[dict[str, Any]] = []
        while len(grants) < len(dues):
            count = min(MAX_GRANTS_PER_CALL, len(dues) - len(grants))
            grants.extend(self.sim.control("POST", "grants", {"count": count})["grants"])
        now = time.time()
        rows = []
        for due, grant in zip(dues, grants, strict=True):
            account_id = f"acct-{next(self._serial):05d}"
            row = {
                "account_id": account_id,
                "realm_id": grant["realm_id"],
                "refresh_token": grant["refresh_token"],
            }
            if due is not None:
                row["access_token"] = grant["access_token"]
                row["token_expires_at"] = _iso(now + due + self.lead)
            rows.append(row)
        node = self.nodes[via]
        status, answer = node.api("POST", "/v1/import", body={"accounts": rows})
        assert status == 200, answer
        assert not answer["skipped"], answer["skipped"][:5]
        seeded = {}
        for row, imported in zip(rows, answer["imported"], strict=True):
            assert imported["account_id"] == row["account_id"]
            seeded[row["account_id"]] = Seeded(
                account_id=row["account_id"],
                realm_id=row["realm_id"],
                refresh_token=row["refresh_token"],
                access_token=row.get("access_token"),
                due_at=parse_time(imported["next_refresh_at"]),
            )
        self.seeded.update(seeded)
        return seeded

    def accounts(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/accounts`` through the balancer: every account as the API shows it."""
        balancer = Balancer(self)
        try:
            status, body = balancer.request("GET", "/v1/accounts")
        finally:
            balancer.close()
        assert status == 200, body
        return {a["account_id"]: a for a in body["accounts"]}

    def ledger(self) -> Ledger:
        return Ledger.of(self.seeded, self.sim.log())

    def wait_refreshed(self, account_ids: Sequence[str], *, after: float, timeout: float) -> Ledger:
        """Until each account has a refresh the simulator answered 200 and the cluster
        committed, both at or after ``after``.

        Committed: its row's ``last_refreshed_at`` is at or after ``after`` and its
        access token is no longer the one it was imported with (an answer that
        died with a killed node does not count).
        """
        found: list[Ledger] = []
        missing: list[str] = []

        def done() -> bool:
            ledger = self.ledger()
            rows = self.rows()
            found[:] = [ledger]
            missing[:] = [
                a
                for a in account_ids
                if ledger.first_refresh(a, after) is None or not self._committed(rows, a, after)
            ]
            return not missing

        try:
            wait_until(done, timeout=timeout, interval=0.5, what="every account refreshed")
        except AssertionError:
            raise AssertionError(
                f"{len(missing)} of {len(account_ids)} accounts not refreshed and committed "
                f"within {timeout}s, e.g. {missing[:5]}; failures at the simulator: "
                f"{found[0].failures}"
            ) from None
        return found[0]

    def _committed(self, rows: dict[str, Row], account_id: str, after: float) -> bool:
        row = rows.get(account_id)
        return (
            row is not None
            and row.last_refreshed_at is not None
            and row.last_refreshed_at >= after
            and row.access_token != self.seeded[account_id].access_token
        )

    def settle(self) -> dict[str, int]:
        """Stop every running node (SIGTERM to all, then each drain); their exit statuses.

        Afterwards nothing refreshes: the simulator's log and the rows are final.
        """
        running = [node for node in self.nodes if node.proc is not None]
        for node in running:
            node.ask_to_stop()
        return {node.node_id: node.terminate() for node in running}

    def settle_and_check(self) -> list[str]:
        """Stop the nodes, then say what the fault tests forbid; empty when all is well.

        Before the stop, through the API: an account missing or not ``active``
        (``needs_reconnect`` above all). Then :meth:`settle`, so that no refresh
        is in flight between reading the simulator's log and the rows: a node
        that does not exit 0; a refresh token used twice at once or after its
        rotation (the simulator's counts); an account whose row is missing or
        holds another refresh token than the one the simulator holds for it
        (its chain lost, forked, or an older token written over a newer one).
        """
        found = []
        shown = self.accounts()
        for account_id in self.seeded:
            api = shown.get(account_id)
            if api is None:
                found.append(f"{account_id}: missing from GET /v1/accounts")
            elif api["status"] != "active":
                found.append(f"{account_id}: {api['status']} ({api.get('last_error')})")
        for node_id, code in self.settle().items():
            if code != 0:
                found.append(f"{node_id} exited {code} on SIGTERM")
        uses = self.sim.double_uses()
        if any(uses.values()):
            found.append(f"refresh tokens misused at the simulator: {uses}")
        ledger = self.ledger()
        for entry in ledger.misuses[:5]:
            kinds = [k for k in ("concurrent_use", "stale_use") if entry.get(k)]
            account_id = ledger.owner.get(entry["presented_refresh_token"], "an unknown account")
            found.append(
                f"{'+'.join(kinds)} of {account_id}'s refresh token at {entry['at']}: "
                f"answered {entry['status']} {entry['error'] or ''} (tid {entry['intuit_tid']})"
            )
        rows = self.rows()
        for account_id in self.seeded:
            row = rows.get(account_id)
            if row is None:
                found.append(f"{account_id}: no row")
                continue
            chain = ledger.chains[account_id]
            if row.refresh_token != chain[-1]:
                where = (
                    f"value {chain.index(row.refresh_token) + 1}"
                    if row.refresh_token in chain
                    else "none"
                )
                found.append(
                    f"{account_id}: stores {where} of its {len(chain)} refresh token values, "
                    f"not the simulator's current (status {row.status}, version {row.version})"
                )
        return found


def _iso(epoch: float) -> str:
    return iso(datetime.fromtimestamp(epoch, UTC)) or ""


@contextlib.contextmanager
def _collect(errors: list[BaseException]) -> Iterator[None]:
    """Go on with the teardown after a failure, and raise the first one at the end."""
    try:
        yield
    except BaseException as exc:  # a teardown step: the caller raises the first at the end
        errors.append(exc)


# -- a load balancer ---------------------------------------------------------------------


class Balancer:
    """Round-robin over the nodes that are up, as nginx in front of them.

    A node known to be down or paused is skipped; a connection refused, reset
    or cut before an answer is retried on the next node (nginx's
    ``proxy_next_upstream error``), at most once per node. Whatever answer a
    node sends, 5xx included, is the client's answer.
    """

    def __init__(self, cluster: Cluster, *, timeout: float = HTTP_TIMEOUT) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._turn = itertools.count()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retries = 0

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self._cluster.api_key}"
            self._local.session = session
        return session

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, body, _ = self.routed(method, path, **kwargs)
        return status, body

    def routed(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, str]:
        """The answer and the node that gave it."""
        nodes = self._cluster.nodes
        start = next(self._turn)
        last: Exception | None = None
        for step in range(len(nodes)):
            node = nodes[(start + step) % len(nodes)]
            if not node.alive or node.paused:
                continue
            try:
                response = self._session().request(
                    method, node.api_url + path, timeout=self._timeout, **kwargs
                )
            except requests.ConnectionError as exc:
                with self._lock:
                    self.retries += 1
                last = exc
                continue
            if response.headers.get("Content-Type", "").startswith("application/json"):
                return response.status_code, response.json(), node.node_id
            return response.status_code, response.text, node.node_id
        raise AssertionError(f"no node answered {method} {path}: {last}")

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()


@dataclass
class LoadResult:
    calls: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_node: Counter[str] = field(default_factory=Counter)
    server_errors: list[tuple[int, Any]] = field(default_factory=list)
    wrong_tokens: int = 0
    unanswered: list[str] = field(default_factory=list)  # no node up, or every one refused
    transport_errors: list[str] = field(default_factory=list)  # e.g. a read timeout (nginx: 504)
    latencies: list[float] = field(default_factory=list)


class TokenLoad:
    """Threads calling ``GET /v1/accounts/{id}/token`` round-robin through a :class:`Balancer`.

    Runs from ``start`` until ``stop``; each answer is checked: a 200 must carry
    the account's own company (``realm_id``) and a token.
    """

    def __init__(self, cluster: Cluster, account_ids: Sequence[str], *, threads: int = 4) -> None:
        self._cluster = cluster
        self._ids = list(account_ids)
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.balancer = Balancer(cluster)
        self.result = LoadResult()

    def __enter__(self) -> TokenLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HTTP_TIMEOUT + 5)

    def _run(self, number: int) -> None:
        picks = itertools.cycle(self._ids[number:] + self._ids[:number])
        realms = {a: s.realm_id for a, s in self._cluster.seeded.items()}
        try:
            while not self._stop.is_set():
                account_id = next(picks)
                began = time.monotonic()
                try:
                    status, body, node = self.balancer.routed(
                        "GET", f"/v1/accounts/{account_id}/token"
                    )
                except AssertionError as exc:  # every node refused: the balancer had no one
                    with self._lock:
                        self.result.unanswered.append(str(exc))
                    time.sleep(0.05)
                    continue
                except requests.RequestException as exc:
                    with self._lock:
                        self.result.transport_errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    result = self.result
                    result.calls += 1
                    result.statuses[status] += 1
                    result.by_node[node] += 1
                    result.latencies.append(time.monotonic() - began)
                    if status >= 500:
                        result.server_errors.append((status, body))
                    elif status == 200 and (
                        body.get("realm_id") != realms[account_id] or not body.get("access_token")
                    ):
                        result.wrong_tokens += 1
        finally:
            self.balancer.close()
