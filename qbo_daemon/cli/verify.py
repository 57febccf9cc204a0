"""``import --verify``: refresh every imported account once and say how each went.

Each account is asked for through the running daemon's own refresh path,
``POST /v1/accounts/{id}/refresh?unless_attempted_since=<when the import
began>``: single flight, so a refresh the import already started (an account
whose access token was not known valid is due at once) is joined or read back
rather than repeated (:mod:`qbo_daemon.engine.verify`), and at most ``[refresh]
concurrency`` requests are open at once, as many as the daemon calls Intuit with.

Each account reads ``ok``, ``needs_reconnect`` (Intuit refused the refresh
token: its error is given) or ``transient`` (Intuit could not be reached or
failed; the daemon keeps retrying on its own).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from qbo_daemon.cli.apiclient import ApiAnswerError, ApiClient
from qbo_daemon.core.errors import QboDaemonError
from qbo_daemon.core.models import iso

Result = Literal["ok", "needs_reconnect", "transient"]
RESULTS: tuple[Result, ...] = ("ok", "needs_reconnect", "transient")


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"result": self.result, "error": self.error}


def verify_accounts(
    client: ApiClient, account_ids: Sequence[str], *, since: datetime, parallel: int
) -> dict[str, Verdict]:
    """Refresh each account once through the daemon, ``parallel`` requests at a time."""
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="verify") as pool:
        verdicts = pool.map(lambda account_id: _verify(client, account_id, since), account_ids)
        return dict(zip(account_ids, verdicts, strict=True))


def _verify(client: ApiClient, account_id: str, since: datetime) -> Verdict:
    when = quote(iso(since) or "", safe="")
    try:
        client.call("POST", f"/v1/accounts/{account_id}/refresh?unless_attempted_since={when}")
    except ApiAnswerError as exc:
        if exc.code == "needs_reconnect":
            return Verdict("needs_reconnect", _last_error(client, account_id) or exc.detail)
        if exc.code == "disconnected":
            return Verdict("needs_reconnect", "disconnected since the import")
        return Verdict("transient", f"{exc.detail} ({exc.status} {exc.code})")
    except QboDaemonError as exc:  # no answer in time, or the connection broke
        return Verdict("transient", str(exc))
    return Verdict("ok")


def _last_error(client: ApiClient, account_id: str) -> str | None:
    """Intuit's answer, as the daemon noted it on the account."""
    try:
        account = client.call("GET", f"/v1/accounts/{account_id}")
    except QboDaemonError:
        return None
    error = account.get("last_error") if isinstance(account, dict) else None
    return error if isinstance(error, str) else None


def verdict_text(account_id: str, verify: Mapping[str, Any]) -> str:
    """How one verdict reads in the import report."""
    result = verify["result"]
    if result == "ok":
        return "verified: ok"
    error = f" ({verify['error']})" if verify.get("error") else ""
    if result == "needs_reconnect":
        return (
            f"verified: needs_reconnect{error}: "
            f"the user must reconnect (qbo-daemon connect {account_id})"
        )
    return f"verified: transient{error}: the daemon keeps retrying it"


def verify_summary(verdicts: Sequence[Mapping[str, Any]]) -> str:
    counts = Counter(str(v["result"]) for v in verdicts)
    parts = ", ".join(f"{counts.get(result, 0)} {result}" for result in RESULTS)
    return f"verified {len(verdicts)}: {parts}"
