"""Fuzzed input against the running daemon (a subprocess): never a 5xx, never a changed row.

Three properties, driven by hypothesis over real HTTP:

- the token API: any method on any route, ``account_id`` path segments with
  traversal tricks (``..``, ``%2F``, ``%00``, overlong UTF-8, invalid UTF-8,
  unicode look-alikes, 129+ characters), bodies that are random bytes, JSON
  of the wrong shape, deeply nested arrays, out-of-range times or oversized,
  and every kind of ``Authorization`` header;
- the callback: random query keys and values with forged, replayed and
  expired states, odd encodings, missing and doubled parameters;
- raw bytes in the request line and headers, past any client's escaping.

Every request is answered (no reset, no hang) with a status below 500. When the
answer is 4xx, no account row and no OAuth state changed, and no code was
exchanged at the simulator. Rows a valid (2xx) request touched are left out of
later comparisons, since the daemon goes on working on them in the background.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbo_daemon.store.schema import sha256_hex
from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, SimulatorProcess
from tests.figures import thousands, write_figures

EXAMPLES = 250
LONG_EXAMPLES = 3000

TRICKY_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "..%2F..%2Fetc%2Fpasswd",
    "acct-0%2F..%2Facct-1",
    "acct-0%2f",
    "%2F",
    "%252F",
    "%00",
    "acct-0%00",
    "%c0%ae%c0%ae",
    "%c0%af",
    "%e0%80%af",
    "%ff%fe",
    "%ed%a0%80",
    "%E2%80%AE0-tcca",
    "%EF%BD%81cct-0",
    "acct-0%20",
    "%20acct-0",
    "acct-0%0d%0aX-Injected:%201",
    "a" * 129,
    "a" * 5000,
    "-acct",
    "CON",
    "acct-0;x=1",
    "acct-0?x=1",
    "acct-0%3Fx=1",
    "acct-0%23frag",
    "%u002e%u002e",
    "acct-0",
    "acct-1",
    "new-account",
]
ROUTES = [
    "/v1/accounts/{}",
    "/v1/accounts/{}/token",
    "/v1/accounts/{}/refresh",
    "/v1/accounts/{}/tokens",
    "/v1/accounts/{}/authorize-url",
    "/v1/accounts/{}/{}",
    "/v1/accounts",
    "/v1/import",
    "/v1/keys/rotate",
    "/v1/{}",
    "/{}",
    "/healthz",
    "/readyz",
]
IMPORT_FIELDS = [
    "refresh_token",
    "realm_id",
    "access_token",
    "token_expires_at",
    "refresh_token_expires_at",
    "accounts",
    "batch",
]
ODD_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59",
    "2020-02-30T00:00:00Z",
    "2024-01-01T25:00:00Z",
    "2024-01-01",
    "now",
    "",
    "2024-01-01T00:00:00+99:00",
]


@dataclass
class FuzzEnv:
    sim: SimulatorProcess
    daemon: DaemonProcess
    used_state: str
    expired_state: str
    pending_state: str
    dirty: set[str] = field(default_factory=set)
    # Per run ("fuzz-api", "schemathesis-negative", ...): the statuses answered, and the
    # faults seen (a 5xx, a row changed by a refused request, an answer off the document).
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    faults: Counter[str] = field(default_factory=Counter)

    def answered(self, run: str, status: int) -> None:
        self.statuses[run][status] += 1
        if status >= 500:
            self.faults[run] += 1

    def unchanged(self, run: str, before: tuple[Any, ...], what: str) -> None:
        """Assert no row, state or code exchange changed since ``before``."""
        changed = fingerprint(self) != before
        self.faults[run] += changed
        assert not changed, what

    def summary(self, run: str) -> dict[str, Any]:
        statuses = self.statuses[run]
        return {
            "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "faults": self.faults[run],
        }

    def figures(self, run: str) -> dict[str, str]:
        """This run's figures for docs/reliability.md; written only after its assertions."""
        statuses = self.statuses[run]
        requests = thousands(sum(statuses.values()))
        answers = ", ".join(f"{k or 'closed'} ×{thousands(v)}" for k, v in sorted(statuses.items()))
        return {
            f"{run}-runs": requests,
            f"{run}-hits": str(self.faults[run]),
            run: f"{requests} requests, answered {answers}; faults: {self.faults[run]}",
        }

    def write(self, run: str, report: Report) -> None:
        report(run, self.summary(run))
        write_figures(self.figures(run))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    daemon = DaemonProcess(tmp_path_factory.mktemp("fuzz"), sim)
    try:
        daemon.start()
        for number in range(3):
            daemon.import_grant(f"acct-{number}", sim.grant(), overdue=False)
        used = connect(daemon, "web-0")
        status, body = daemon.api("POST", "/v1/accounts/pending/authorize-url")
        assert status == 200, body
        pending = parse_qs(urlsplit(body["url"]).query)["state"][0]
        expired = "expired-state-" + "x" * 30
        with contextlib.closing(sqlite3.connect(daemon.database, timeout=10)) as db, db:
            db.execute(
                "INSERT INTO oauth_states (state_hash, account_id, created_at, expires_at) "
                "VALUES (?, 'acct-2', ?, ?)",
                (sha256_hex(expired), "2020-01-01T00:00:00.000000Z", "2020-01-01T00:10:00.000000Z"),
            )
        yield FuzzEnv(sim, daemon, used, expired, pending)
        assert daemon.alive, "the daemon died during the fuzzing"
        assert daemon.terminate() == 0
        crashes = [
            e for e in daemon.events() if e.get("event") in ("api.request_failed", "connect.failed")
        ]
        assert not crashes, crashes
    finally:
        daemon.close()
        sim.close()


def connect(daemon: DaemonProcess, account_id: str) -> str:
    """The connect flow as a browser does it; returns the state it used."""
    status, body = daemon.api("POST", f"/v1/accounts/{account_id}/authorize-url")
    assert status == 200, body
    state: str = parse_qs(urlsplit(body["url"]).query)["state"][0]
    assert requests.get(body["url"], timeout=30).status_code == 200
    return state


def fingerprint(env: FuzzEnv) -> tuple[Any, ...]:
    with contextlib.closing(sqlite3.connect(f"file:{env.daemon.database}?mode=ro", uri=True)) as db:
        accounts = [
            row
            for row in db.execute(
                "SELECT account_id, status, realm_id, access_token, refresh_token, key_id, "
                "token_expires_at, reconnect_token_at, refresh_token_expires_at, version, "
                "failure_count, last_error FROM accounts ORDER BY account_id"
            )
            if row[0] not in env.dirty
        ]
        states = db.execute(
            "SELECT state_hash, account_id, expires_at, used_at, outcome, answer_hash "
            "FROM oauth_states ORDER BY state_hash"
        ).fetchall()
    exchanges = env.sim.control("GET", "stats")["token"].get("ok", 0)
    return tuple(accounts), tuple(states), exchanges


def send(port: int, method: str, target: str, headers: dict[str, str], body: bytes | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def segment() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(TRICKY_SEGMENTS),
        st.text(max_size=40).map(lambda t: quote(t, safe="")),
        st.binary(max_size=40).map(lambda b: quote(b, safe="")),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True),
    )


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=30)
        | st.sampled_from(ODD_TIMES),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=10,
    )


def bodies() -> st.SearchStrategy[bytes | None]:
    import json

    objects = st.dictionaries(
        st.sampled_from(IMPORT_FIELDS) | st.text(max_size=12), json_values(), max_size=6
    )
    return st.one_of(
        st.none(),
        st.binary(max_size=300),
        objects.map(lambda o: json.dumps(o).encode()),
        json_values().map(lambda v: json.dumps(v).encode()),
        st.integers(1, 200_000).map(lambda n: b"[" * n),
        st.integers(60_000, 200_000).map(lambda n: b'{"refresh_token": "' + b"x" * n + b'"}'),
        st.sampled_from(ODD_TIMES).map(
            lambda t: json.dumps(
                {"refresh_token": "r", "realm_id": "1", "access_token": "a", "token_expires_at": t}
            ).encode()
        ),
    )


def auth_headers(api_key: str) -> st.SearchStrategy[dict[str, str]]:
    latin = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
    return st.one_of(
        st.just({"Authorization": f"Bearer {api_key}"}),
        st.just({}),
        latin.map(lambda t: {"Authorization": t}),
        latin.map(lambda t: {"Authorization": f"Bearer {t}"}),
        st.just({"Authorization": f"Basic {api_key}"}),
        st.just({"Authorization": f"Bearer {api_key[:-1]}"}),
        st.just({"Authorization": f"bearer   {api_key}  "}),
    )


@dataclass(frozen=True)
class ApiCall:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None
    account_id: str | None


@st.composite
def api_calls(draw: st.DrawFn, api_key: str) -> ApiCall:
    route = draw(st.sampled_from(ROUTES))
    first = draw(segment())
    target = route.format(first, draw(segment()))
    headers = dict(draw(auth_headers(api_key)))
    body = draw(bodies())
    if body is not None:
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1"])
        )
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    return ApiCall(method, target, headers, body, first if "{}" in route else None)


def check_api(env: FuzzEnv, call: ApiCall, run: str) -> None:
    before = fingerprint(env)
    status = send(env.daemon.api_port, call.method, call.target, call.headers, call.body)
    env.answered(run, status)
    assert status < 500, (status, call)
    if status < 300:
        if call.account_id is not None:
            env.dirty.add(call.account_id)
        return
    env.unchanged(run, before, f"{status} but a row changed: {call}")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def test_api_fuzz(env: FuzzEnv, report: Report) -> None:
    @fuzz_settings(EXAMPLES)
    @given(call=api_calls(env.daemon.api_key))
    def run(call: ApiCall) -> None:
        check_api(env, call, "fuzz-api")

    run()
    env.write("fuzz-api", report)


@st.composite
def callback_queries(draw: st.DrawFn, env: FuzzEnv) -> str:
    states = st.one_of(
        st.sampled_from([env.used_state, env.expired_state]),
        st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True),  # forged
        st.text(max_size=40).map(lambda t: quote(t, safe="")),
        st.binary(max_size=40).map(lambda b: quote(b, safe="")),
        st.sampled_from(TRICKY_SEGMENTS),
    )
    values = st.one_of(
        st.text(max_size=30).map(lambda t: quote(t, safe="")),
        st.binary(max_size=30).map(lambda b: quote(b, safe="")),
        st.sampled_from(["access_denied", "sim-ac-forged", "123145", "%00", "%c0%af", "a" * 5000]),
    )
    keys = st.sampled_from(["state", "code", "realmId", "error", "error_description", "x", "%ff"])
    pairs = draw(st.lists(st.tuples(keys, values), max_size=6))
    if draw(st.booleans()):
        pairs.append(("state", draw(states)))
    return "&".join(f"{k}={v}" for k, v in pairs)


def test_callback_fuzz(env: FuzzEnv, report: Report) -> None:
    path = urlsplit(env.daemon.callback_url).path

    @fuzz_settings(EXAMPLES)
    @given(query=callback_queries(env), suffix=st.sampled_from(["", "/", "/..", "%2F"]))
    def run(query: str, suffix: str) -> None:
        before = fingerprint(env)
        status = send(env.daemon.callback_port, "GET", f"{path}{suffix}?{query}", {}, None)
        env.answered("fuzz-callback", status)
        assert status < 500, (status, query)
        env.unchanged("fuzz-callback", before, f"{status} but something changed: {query}")

    run()
    env.write("fuzz-callback", report)


def raw_request(port: int, data: bytes) -> int | None:
    """Send raw bytes; the status of the answer, or None if the server closed silently."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)  # "Connection: close": the server closes after its answer
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer:
        return None
    first = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(first[1])


def test_raw_bytes_fuzz(env: FuzzEnv, report: Report) -> None:
    unsafe = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))

    @fuzz_settings(EXAMPLES // 2)
    @given(
        port=st.sampled_from(["api", "callback"]),
        method=st.sampled_from([b"GET", b"POST", b"PUT", b"G\xffT", b""]),
        path=unsafe,
        header=unsafe,
        with_key=st.booleans(),
    )
    def run(port: str, method: bytes, path: bytes, header: bytes, with_key: bool) -> None:
        before = fingerprint(env)
        number = env.daemon.api_port if port == "api" else env.daemon.callback_port
        key = f"Authorization: Bearer {env.daemon.api_key}\r\n".encode() if with_key else b""
        data = (
            method + b" /v1/accounts/" + path + b"/token HTTP/1.1\r\nHost: x\r\n" + key
            + b"X-Fuzz: " + header + b"\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        status = raw_request(number, data)
        env.answered("fuzz-raw", status or 0)  # 0: closed without an answer
        assert status is None or status < 500, (status, data)
        if status is None or status >= 400:
            env.unchanged("fuzz-raw", before, repr(data))

    run()
    env.write("fuzz-raw", report)


@pytest.mark.slow
def test_api_fuzz_long(env: FuzzEnv, report: Report) -> None:
    @fuzz_settings(LONG_EXAMPLES)
    @given(call=api_calls(env.daemon.api_key))
    def run(call: ApiCall) -> None:
        check_api(env, call, "fuzz-api-long")

    run()
    env.write("fuzz-api-long", report)


KNOWN_BAD = [
    # Each once answered 500 (see docs/reliability.md): a regression test for each.
    ("GET", "/v1/accounts/acct-0/token", {"Authorization": "Bearer \x80"}, None),
    ("PUT", "/v1/accounts/acct-0/tokens", None, b"[" * 50_000),
    ("POST", "/v1/keys/rotate", None, b"[" * 50_000),
    (
        "PUT",
        "/v1/accounts/acct-0/tokens",
        None,
        b'{"refresh_token": "r", "realm_id": "1", '
        b'"refresh_token_expires_at": "0001-01-01T00:00:00+14:00"}',
    ),
    (
        "PUT",
        "/v1/accounts/acct-0/tokens",
        None,
        b'{"refresh_token": "r", "realm_id": "1", "access_token": "a", '
        b'"token_expires_at": "9999-12-31T23:59:59-14:00"}',
    ),
    (
        "PUT",
        "/v1/accounts/acct-0/tokens",
        None,
        b'{"refresh_token": "r", "realm_id": "1", "access_token": "a", '
        b'"token_expires_at": "9999-12-31T23:59:59Z"}',
    ),
    ("PUT", "/v1/accounts/acct-0/tokens", None, b'{"refresh_token": "' + b"x" * 70_000 + b'"}'),
    ("PUT", "/v1/accounts/acct-0/tokens", None, b"\xff\xfe\x00"),
    ("GET", "/v1/accounts/%2e%2e%2Facct-0/token", None, None),
    ("GET", "/v1/accounts/acct-0%00/token", None, None),
    ("GET", "/v1/accounts/%c0%ae%c0%ae/token", None, None),
]


@pytest.mark.parametrize(("method", "target", "headers", "body"), KNOWN_BAD)
def test_known_bad_inputs(
    env: FuzzEnv,
    method: str,
    target: str,
    headers: dict[str, str] | None,
    body: bytes | None,
) -> None:
    call = ApiCall(
        method,
        target,
        headers if headers is not None else {"Authorization": f"Bearer {env.daemon.api_key}"},
        body,
        None,
    )
    before = fingerprint(env)
    status = send(env.daemon.api_port, call.method, call.target, call.headers, call.body)
    assert 400 <= status < 500, (status, call)
    assert fingerprint(env) == before
