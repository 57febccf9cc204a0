"""No secret leaks: every token, code, client secret and key that passed through is searched for.

A full run at debug log level against the simulator (another process) behind a
:class:`Gate` that records every byte between them: connects through the
callback (one declined, one replayed), imports, refreshes with rotation on
every refresh, Intuit faults of every kind (5xx, HTML, garbled bodies, a body
without tokens, dropped connections, ``invalid_grant``, ``invalid_client``),
API errors, listings, a key rotation call and a disconnect (revocation).

The secrets are taken from what really passed: every ``sim-at-``/``sim-rt-``/
``sim-ac-`` value in the recorded traffic, the simulator's request log, the
browser's redirects and the import bodies; plus the client secret (and its
Basic header), the API key and the encryption key. Searched: the daemon's
stdout and stderr, every API and callback answer (a ``GET .../token`` answer
may carry its access token and nothing else), and the database bytes
(main file, ``-wal`` and ``-shm``, copied while running and after the stop).
OAuth states (kept as hashes) and PKCE verifiers (kept encrypted) are searched
there too; a state may show only in the URL ``authorize-url`` returns.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, Gate, SimulatorProcess, wait_until
from tests.figures import write_figures

TOKEN = re.compile(rb"sim-(?:at|rt|ac)-[A-Za-z0-9_-]{16,}")
VERIFIER = re.compile(rb"(?<=code_verifier=)[A-Za-z0-9_-]{43,128}")


def test_no_secret_anywhere(tmp_path: Path, report: Report) -> None:
    client_secret = "client-secret-" + secrets.token_urlsafe(24)
    sim = SimulatorProcess(expires_in=3, rotate_after=0.0, client_secret=client_secret).start()
    gate = Gate(sim.port)
    gate.open()
    daemon = DaemonProcess(
        tmp_path / "daemon",
        sim,
        intuit_url=gate.url,
        log_level="debug",
        backoff_initial="0.2s",
        backoff_max="1s",
        intuit_timeout="1s",
        refresh_extra='token_wait = "2s"\ninvalid_client_retry = "1s"',
    )
    answers: list[bytes] = []  # every answer body that must hold no secret
    token_answers: list[dict[str, Any]] = []  # GET .../token 200 bodies
    url_answers: list[bytes] = []  # POST .../authorize-url bodies
    seen: set[str] = set()  # secrets the test saw outside the recorded traffic
    states: set[str] = set()
    browser = requests.Session()

    def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = daemon.http.request(method, daemon.api_url + path, timeout=30, **kwargs)
        if method == "GET" and path.endswith("/token") and response.status_code == 200:
            token_answers.append(response.json())
        elif path.endswith("/authorize-url"):
            url_answers.append(response.content)  # carries its state, by design
        else:
            answers.append(response.content)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text

    def connect(account_id: str) -> int:
        status, body = call("POST", f"/v1/accounts/{account_id}/authorize-url")
        assert status == 200, body
        states.update(parse_qs(urlsplit(body["url"]).query)["state"])
        page = browser.get(body["url"], timeout=30)
        for hop in page.history:
            seen.update(parse_qs(urlsplit(hop.headers["Location"]).query).get("code", []))
        answers.append(page.content)
        if page.history:  # the browser fires the callback twice
            again = browser.get(page.history[-1].headers["Location"], timeout=30)
            answers.append(again.content)
        return page.status_code

    try:
        daemon.start()
        for number in range(3):
            assert connect(f"web-{number}") == 200
        sim.control("POST", "deny")
        assert connect("declined") == 400
        for number in range(2):
            grant = sim.grant()
            seen.update((grant["access_token"], grant["refresh_token"]))
            daemon.import_grant(f"imported-{number}", grant, overdue=number == 0)
        wait_until(lambda: refreshed(sim) >= 6, timeout=20, what="refreshes")

        for kind in ("503", "502_html", "500", "429", "malformed", "no_token", "reset", "hang"):
            sim.fault(kind, 1, retry_after=0.2 if kind in ("503", "429") else None)
        sim.fault("invalid_client", 1)
        wait_until(lambda: faults_left(sim) == 0, timeout=30, what="faults consumed")
        sim.fault("invalid_grant", 1)
        wait_until(lambda: needs_reconnect(call) >= 1, timeout=20, what="an invalid_grant")
        sim.fault("500", 2, endpoint="revoke")

        for account in call("GET", "/v1/accounts")[1]["accounts"]:
            account_id = account["account_id"]
            call("GET", f"/v1/accounts/{account_id}")
            call("GET", f"/v1/accounts/{account_id}/token")
            call("POST", f"/v1/accounts/{account_id}/refresh")
        call("GET", "/v1/accounts/nobody/token")
        call("PUT", "/v1/accounts/bad/tokens", json={"refresh_token": 5, "realm_id": "1"})
        call("PUT", "/v1/accounts/bad/tokens", data=b"{not json")
        call("POST", "/v1/keys/rotate", json={})
        call("GET", "/metrics")
        call("GET", "/readyz")
        bad_key = requests.get(
            daemon.api_url + "/v1/accounts",
            headers={"Authorization": "Bearer wrong-" + daemon.api_key},
            timeout=30,
        )
        answers.append(bad_key.content)
        call("DELETE", "/v1/accounts/web-0")  # the revoke fails: forgotten anyway
        call("DELETE", "/v1/accounts/web-1")
        time.sleep(1.0)
        running_files = database_bytes(daemon)
        assert daemon.terminate() == 0
        stopped_files = database_bytes(daemon)

        log = sim.log()
        for entry in log:
            for key in ("presented_refresh_token", "issued_refresh_token"):
                if entry.get(key):
                    seen.add(entry[key])
        traffic = bytes(gate.captured)
        tokens = {match.decode() for match in TOKEN.findall(traffic)} | seen
        basic = base64.b64encode(f"{sim.settings.client_id}:{client_secret}".encode()).decode()
        keys = {client_secret, basic, daemon.api_key, daemon.encryption_key}
        assert client_secret.encode() not in traffic  # it travels only inside the Basic header
        assert basic.encode() in traffic
        for answer in token_answers:
            assert set(answer) == {"access_token", "realm_id", "expires_at"}
            assert answer["access_token"] not in {e.get("issued_refresh_token") for e in log}

        output = "\n".join(daemon.lines).encode()
        places = {
            "daemon output": [output],
            "API and callback answers": answers,
            "database while running": running_files,
            "database after stop": stopped_files,
        }
        needles = {s: s.encode() for s in tokens | keys}
        # The search itself works: it finds every token in the traffic they came from.
        assert len(find({"traffic": [traffic]}, _enc(tokens - seen))) == len(tokens - seen)
        hits = find(places, needles)
        hits += find({"authorize-url answers": url_answers}, needles)
        # OAuth states are kept only as hashes, and PKCE verifiers encrypted: neither
        # may show anywhere but where they must travel (the URL, the token call).
        verifiers = {m.decode() for m in VERIFIER.findall(traffic)}
        assert len(verifiers) == 3, verifiers  # one per code exchanged
        state_hits = find(places, _enc(states) | _enc(verifiers))
        state_hits += find({"authorize-url answers": url_answers}, _enc(verifiers))
        assert not hits, hits
        assert not state_hits, state_hits
        kinds = {"at": 0, "rt": 0, "ac": 0}
        for token in tokens:
            kinds[token[4:6]] = kinds.get(token[4:6], 0) + 1
        assert kinds["at"] >= 10, kinds
        assert kinds["rt"] >= 10, kinds
        assert kinds["ac"] >= 3, kinds
        searched_bytes = sum(len(b) for b in running_files + stopped_files)
        figures: dict[str, Any] = {
            "access_tokens": kinds["at"],
            "refresh_tokens": kinds["rt"],
            "codes": kinds["ac"],
            "keys_and_client_secret": len(keys),
            "states": len(states),
            "pkce_verifiers": len(verifiers),
            "log_lines": len(daemon.lines),
            "answers": len(answers),
            "database_bytes": searched_bytes,
            "hits": len(hits) + len(state_hits),
        }
        report("secrets", figures)
        write_figures(
            {
                "secrets-searched": f"{kinds['at']} access tokens, {kinds['rt']} refresh "
                f"tokens, {kinds['ac']} codes, client secret, Basic header, API key, "
                f"encryption key, {len(states)} states, {len(verifiers)} PKCE verifiers",
                "secrets-hits": str(figures["hits"]),
                "secrets-places": f"the daemon's stdout and stderr ({len(daemon.lines)} "
                f"lines), {len(answers)} API and callback answers (a `GET …/token` answer "
                "may carry its own access token and must carry nothing else), and the "
                "database, `-wal` and `-shm` bytes, copied while running and after the stop "
                f"({searched_bytes / 1000:,.0f} KB). Hits: {figures['hits']}",
            }
        )
    finally:
        browser.close()
        daemon.close()
        gate.shut()
        sim.close()


def _enc(values: set[str]) -> dict[str, bytes]:
    return {v: v.encode() for v in values}


def find(places: dict[str, list[bytes]], needles: dict[str, bytes]) -> list[tuple[str, str]]:
    """(place, secret prefix) for every secret found, whole or by a 16-character piece."""
    hits = []
    for place, blobs in places.items():
        for name, needle in needles.items():
            pieces = {needle}
            core = needle.split(b"-")[-1]
            if len(core) >= 24:
                pieces.add(core[:16])  # a truncated copy is a leak too
            if any(piece in blob for blob in blobs for piece in pieces):
                hits.append((place, name[:12] + "..."))
    return hits


def database_bytes(daemon: DaemonProcess) -> list[bytes]:
    blobs = []
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(daemon.database) + suffix)
        if path.exists():
            blobs.append(path.read_bytes())
    return blobs


def refreshed(sim: SimulatorProcess) -> int:
    return sum(1 for e in sim.log() if e["grant_type"] == "refresh_token" and e["status"] == 200)


def faults_left(sim: SimulatorProcess) -> int:
    stats = sim.control("GET", "stats")
    return sum(f["count"] for f in stats["pending_faults"]["token"])


def needs_reconnect(call: Any) -> int:
    _, body = call("GET", "/v1/accounts")
    return sum(1 for a in body["accounts"] if a["status"] == "needs_reconnect")
