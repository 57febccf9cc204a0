"""Real processes for the fault tests: the daemon and the simulator, each its own process.

Everything here is synchronous (``subprocess``, ``requests``, threads that read
the pipes), so a test can start, kill and restart processes between
assertions without an event loop. A child's stdout and stderr go to a pipe,
never to a file: a file-size limit set on the daemon (the full-disk test)
must not stop its logging. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key

PYTHON = sys.executable
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 30.0
SECRET_COLUMNS = ("realm_id", "access_token", "refresh_token")


class Output:
    """Collects a child's output lines (stdout and stderr merged) from a reader thread."""

    def __init__(self, pipe: Any, sink: list[str]) -> None:
        self._pipe = pipe
        self.lines = sink
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._pipe:
            for raw in self._pipe:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def join(self) -> None:
        self._thread.join(timeout=STOP_TIMEOUT)


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class _Child:
    """One child process whose merged output is kept in ``lines`` across restarts."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._output: Output | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._output = Output(self.proc.stdout, self.lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            self._terminated = self.proc

    def _reap(self, sig: int) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        # A second SIGTERM would cut the daemon's shutdown short: send one at most.
        if proc.poll() is None and not (sig == signal.SIGTERM and self._terminated is proc):
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=STOP_TIMEOUT)
        if self._output is not None:
            self._output.join()
            self._output = None
        return code

    def kill9(self) -> None:
        self._reap(signal.SIGKILL)

    def terminate(self) -> int:
        return self._reap(signal.SIGTERM)


class SimulatorProcess(_Child):
    """``qbo-daemon simulator`` in its own process, driven through its ``/_sim/`` API."""

    def __init__(
        self,
        *,
        expires_in: int,
        rotate_after: float,
        latency: float = 0.0,
        client_secret: str = "sim-client-secret",  # noqa: S107 - the simulator's own
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = SimulatorSettings(
            expires_in=expires_in,
            rotate_after=rotate_after,
            latency=latency,
            client_secret=client_secret,
        )
        self.http = requests.Session()

    def start(self) -> SimulatorProcess:
        s = self.settings
        self._spawn(
            [
                PYTHON,
                "-m",
                "qbo_daemon",
                "simulator",
                "--port",
                str(self.port),
                "--expires-in",
                str(s.expires_in),
                "--rotate-after",
                str(s.rotate_after),
                "--latency",
                str(s.latency),
                "--client-id",
                s.client_id,
                "--client-secret",
                s.client_secret,
            ]
        )
        wait_until(self._listening, timeout=START_TIMEOUT, what="simulator up")
        return self

    def _listening(self) -> bool:
        if not self.alive:
            raise AssertionError("the simulator exited:\n" + "\n".join(self.lines[-30:]))
        return _port_open(self.port)

    def close(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)  # a paused simulator cannot handle SIGTERM
            self.terminate()
        self.http.close()

    def model(self, base_url: str | None = None) -> IntuitSimulator:
        """An unstarted simulator object describing this one, for ``simulator_config_text``."""
        model = IntuitSimulator(self.settings)
        model.base_url = base_url or self.url
        return model

    def control(self, method: str, path: str, body: Any = None) -> Any:
        response = self.http.request(
            method, f"{self.url}/_sim/{path}", json=body, timeout=HTTP_TIMEOUT
        )
        assert response.status_code == 200, response.text
        return response.json()

    def grant(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("POST", "grants", {})
        return result

    def fault(
        self, kind: str, count: int, *, endpoint: str = "token", retry_after: float | None = None
    ) -> None:
        body: dict[str, Any] = {"kind": kind, "count": count, "endpoint": endpoint}
        if retry_after is not None:
            body["retry_after"] = retry_after
        self.control("POST", "faults", body)

    def clear_faults(self) -> list[dict[str, Any]]:
        """Drop pending faults; the request log is cleared too, so it is returned first."""
        log = self.log()
        self.control("POST", "reset")
        return log

    def log(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.control("GET", "log")["entries"]
        return entries

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def double_uses(self) -> dict[str, int]:
        """How often a refresh token was presented while another call presenting it was
        being answered, and after it was rotated out (both 0 for a correct daemon)."""
        counts = self.stats()["token"]
        return {kind: counts.get(kind, 0) for kind in ("concurrent_use", "stale_use")}

    def update(self, **settings: Any) -> None:
        """Change how the running simulator answers (``rotate_after``, ``latency``, ...)."""
        self.settings.update(**settings)
        self.control("POST", "settings", settings)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections; nothing answers."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)


@dataclass
class DaemonProcess(_Child):
    """``qbo-daemon run --config F`` in its own process, against ``simulator``."""

    data_dir: Path
    simulator: SimulatorProcess
    intuit_url: str | None = None  # where the daemon reaches "Intuit" (a Gate), if not direct
    lead: str = "10m"
    backoff_initial: str = "1s"
    backoff_max: str = "5s"
    log_level: str = "info"
    extra: str = ""
    refresh_extra: str = ""  # more [refresh] keys, e.g. 'token_wait = "1s"'
    callback_extra: str = ""  # more [callback] keys, e.g. "max_connections = 20"
    api_extra: str = ""  # more [api] keys
    storage_extra: str = ""  # more [storage] keys, e.g. 'url = "postgresql://..."'
    env: dict[str, str] | None = None  # the daemon's environment (None: this one)
    module: str = "qbo_daemon"  # run as `python -m MODULE run --config FILE`
    intuit_timeout: str = "10s"
    api_key: str = field(default_factory=lambda: "fault-api-key-" + generate_key()[:20])
    encryption_key: str = field(default_factory=generate_key)
    starts: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)  # when each SIGKILL was sent

    def __post_init__(self) -> None:
        _Child.__init__(self)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.callback_port = free_port()
        self.config_path = self.data_dir / "config.toml"
        text = simulator_config_text(
            self.simulator.model(self.intuit_url),
            data_dir=self.data_dir,
            api_port=self.api_port,
            callback_port=self.callback_port,
            api_key=self.api_key,
            encryption_key=self.encryption_key,
            lead=self.lead,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            log_level=self.log_level,
            extra=self.extra,
        )
        text = text.replace('timeout = "10s"', f'timeout = "{self.intuit_timeout}"', 1)
        # A 5 s drain keeps the shutdown scenarios short; refresh_extra goes beside it.
        text, found = re.subn(
            r'(?m)^shutdown_grace = ".*"\n', f'shutdown_grace = "5s"\n{self.refresh_extra}\n', text
        )
        assert found == 1, "simulator_config_text no longer writes shutdown_grace"
        for section, keys in (
            ("callback", self.callback_extra),
            ("api", self.api_extra),
            ("storage", self.storage_extra),
        ):
            text, found = re.subn(rf"(?m)^\[{section}\]\n", f"[{section}]\n{keys}\n", text)
            assert found == 1, f"simulator_config_text no longer writes [{section}]"
        self.config_path.write_text(text, encoding="utf-8")
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.callback_url = f"http://127.0.0.1:{self.callback_port}/accounts/oauth2_callback"
        self.database = self.data_dir / "qbo-daemon.sqlite3"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.api_key}"

    def start(self) -> DaemonProcess:
        self.spawn()
        wait_until(self._healthy, timeout=START_TIMEOUT, what="daemon /healthz")
        return self

    def spawn(self) -> None:
        """Start the process without waiting for it to answer."""
        self.starts.append(time.time())
        self._spawn(
            [PYTHON, "-m", self.module, "run", "--config", str(self.config_path)], env=self.env
        )

    def wait(self, timeout: float) -> int:
        """The exit status, once it exits on its own within ``timeout`` seconds."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._reap(signal.SIGKILL)
        return code

    def _healthy(self) -> bool:
        if not self.alive:
            raise AssertionError("the daemon exited:\n" + "\n".join(self.lines[-30:]))
        try:
            return requests.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill9(self) -> None:
        self.kills.append(time.time())
        super().kill9()
        self.stops.append(time.time())

    def terminate(self) -> int:
        code = super().terminate()
        self.stops.append(time.time())
        return code

    def close(self) -> None:
        if self.proc is not None:
            self.terminate()
        self.http.close()

    def limit_file_size(self, limit: int) -> None:
        """RLIMIT_FSIZE on the running daemon: a write at or past ``limit`` fails (EFBIG).

        Python ignores SIGXFSZ, so the write returns an error instead of killing it.
        """
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, hard))

    def api(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> tuple[int, Any]:
        response = self.http.request(
            method,
            self.api_url + path,
            json=body,
            data=data,
            headers=headers,
            timeout=timeout,
        )
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.status_code, response.json()
        return response.status_code, response.text

    def import_grant(self, account_id: str, grant: dict[str, Any], *, overdue: bool) -> None:
        """Bring a simulator grant in through ``PUT .../tokens``; ``overdue``: no access token."""
        body: dict[str, Any] = {
            "refresh_token": grant["refresh_token"],
            "realm_id": grant["realm_id"],
        }
        if not overdue:
            body["access_token"] = grant["access_token"]
            body["token_expires_at"] = _iso(time.time() + grant["expires_in"])
        status, answer = self.api("PUT", f"/v1/accounts/{account_id}/tokens", body=body)
        assert status in (200, 201), answer

    def events(self) -> Iterator[dict[str, Any]]:
        """The daemon's JSON log lines (other lines skipped)."""
        for line in list(self.lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    yield json.loads(line)

    def cipher(self) -> Cipher:
        return Cipher([EncryptionKey.from_text(self.encryption_key)])

    def snapshot(self, scratch: Path) -> dict[str, DbRow]:
        """Every account, decrypted, from a copy of the database files (daemon stopped).

        The copy keeps the daemon's own crash recovery for its next start: opening
        the original here would replay and checkpoint the WAL for it.
        """
        assert not self.alive, "snapshot only a stopped daemon's database"
        scratch.mkdir(parents=True, exist_ok=True)
        copy = scratch / "copy.sqlite3"
        for suffix in ("", "-wal"):
            target = Path(str(copy) + suffix)
            target.unlink(missing_ok=True)
            source = Path(str(self.database) + suffix)
            if source.exists():
                shutil.copyfile(source, target)
        Path(str(copy) + "-shm").unlink(missing_ok=True)
        return read_accounts(copy, self.cipher())


@dataclass(frozen=True, slots=True)
class DbRow:
    account_id: str
    status: str
    access_token: str | None
    refresh_token: str | None
    token_expires_at: str | None
    version: int
    last_error: str | None


def read_accounts(database: Path, cipher: Cipher) -> dict[str, DbRow]:
    """Decrypt every account of ``database``; a row that does not decrypt raises."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT account_id, status, realm_id, access_token, refresh_token, "
            "token_expires_at, version, last_error FROM accounts"
        ).fetchall()
    found = {}
    for row in rows:
        plain = {
            column: None
            if row[column] is None
            else cipher.decrypt(
                row[column], table="accounts", column=column, row_key=row["account_id"]
            )
            for column in SECRET_COLUMNS
        }
        found[row["account_id"]] = DbRow(
            account_id=row["account_id"],
            status=row["status"],
            access_token=plain["access_token"],
            refresh_token=plain["refresh_token"],
            token_expires_at=row["token_expires_at"],
            version=row["version"],
            last_error=row["last_error"],
        )
    return found


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def parse_time(text: str) -> float:
    """An ISO 8601 UTC time from the simulator or the daemon, as epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Gate:
    """A TCP forwarder between the daemon and the simulator that can be shut.

    Shut, nothing listens on its port (connection refused) and open
    connections are cut: "Intuit" is gone, while the simulator process keeps
    every grant it made. Runs its own thread; every socket is closed on exit.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.captured = bytearray()  # every byte that passed, both ways

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def shut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=STOP_TIMEOUT)
        self._threads = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    self.captured += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            # HTTP never half-closes here: the first side to end ends the pair.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (src, dst):
                    if sock in self._conns:
                        self._conns.discard(sock)
                        sock.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def sqlite_commit_baseline(directory: Path, commits: int = 50) -> list[float]:
    """Seconds per one-row WAL commit with synchronous=FULL on ``directory``'s disk."""
    path = directory / "baseline.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
        times = []
        for _ in range(commits):
            began = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (os.urandom(200).hex(),))
            db.execute("COMMIT")
            times.append(time.perf_counter() - began)
    return times
