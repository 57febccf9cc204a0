"""The status page's pages: overview, the accounts table, one account, confirmations.

Reads go through the engine's status service (:class:`qbo_daemon.engine.status_page.StatusPage`):
the store's status queries, which never select a token column, and the running
scheduler (next due times).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import timedelta
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from qbo_daemon.core.models import ACCOUNT_ID_RULE, AccountStatus, valid_account_id
from qbo_daemon.engine.status_page import Cursor, PageRequest, Sort
from qbo_daemon.http.ui.charts import due_chart, durations_chart, outcomes_chart
from qbo_daemon.http.ui.guard import Refused
from qbo_daemon.http.ui.html import render
from qbo_daemon.http.ui.keys import SERVICES
from qbo_daemon.http.ui.views import STATUS_HINTS, explain

E = TypeVar("E", bound=StrEnum)

PAGE_SIZE = 50
DUE_WINDOW = timedelta(hours=1)
HISTORY_WINDOWS = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "3h": timedelta(hours=3),
    "12h": timedelta(hours=12),
}
ATTEMPTS_SHOWN = 40
MAX_SEARCH = 128
SORT_LABELS = {
    Sort.NEXT_REFRESH: "Next refresh",
    Sort.LAST_FAILURE: "Last failure",
    Sort.FAILURES: "Failures",
}
NOTICES = {
    "refreshed": ("ok", "Refreshed: a new access token is stored."),
    "refresh_failed": ("warn", "The refresh failed; the daemon keeps retrying with backoff."),
    "refresh_refused": ("bad", "Intuit refused the refresh: the user must connect again."),
    "refresh_paused": (
        "bad",
        "Refreshes are paused: Intuit refuses the daemon's client credentials.",
    ),
    "not_refreshed": ("warn", "Nothing to refresh: the account has no live connection."),
    "disconnected": ("ok", "Disconnected: the tokens were revoked at Intuit and forgotten."),
    "disconnected_unrevoked": (
        "warn",
        "Disconnected: the tokens are forgotten here, but Intuit did not confirm the revocation.",
    ),
    "already_disconnected": ("ok", "The account was already disconnected."),
}


async def overview(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    queries = services.status
    now = services.clock.now()
    window_name = request.query.get("history", "3h")
    window = HISTORY_WINDOWS.get(window_name)
    if window is None:
        raise Refused(400, "Bad link", f"history must be one of {', '.join(HISTORY_WINDOWS)}")
    ready, checks = await services.readiness()
    counts = await queries.status_counts(now)
    attempts = await queries.attempts_per_minute(now - window, now)
    due = await queries.due_per_minute(now, DUE_WINDOW)
    near_count, near = await queries.near_hard_expiry(
        now, services.config.refresh.hard_expiry_warning, 8
    )
    scheduler = services.status
    return render(
        request,
        "overview.html",
        counts=counts,
        total=sum(counts.values()),
        hints=STATUS_HINTS,
        ready=ready,
        checks=checks,
        scheduled=scheduler.scheduled,
        in_flight=scheduler.in_flight,
        overdue=await queries.overdue(now),
        history=outcomes_chart(attempts, end=now, window=window),
        history_name=window_name,
        history_windows=list(HISTORY_WINDOWS),
        due=due_chart(due, now=now, within=DUE_WINDOW),
        next_due=await queries.next_due(now, 6),
        near_count=near_count,
        near=near,
        warning_days=round(services.config.refresh.hard_expiry_warning.total_seconds() / 86400),
    )


async def accounts(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    now = services.clock.now()
    query = request.query
    status = _choice(query.get("status", ""), AccountStatus, "status")
    sort = _choice(query.get("sort", ""), Sort, "sort") or Sort.NEXT_REFRESH
    search = query.get("q", "").strip()[:MAX_SEARCH]
    after, before = _cursor(query.get("after")), _cursor(query.get("before"))
    queries = services.status
    page = await queries.page(PageRequest(status, search, sort, after, before, PAGE_SIZE), now)
    base = {"status": status.value if status else "", "q": search, "sort": sort.value}
    return render(
        request,
        "accounts.html",
        page=page,
        due={row.account_id: queries.due_at(row.account_id) for row in page.rows},
        counts=await queries.status_counts(now),
        filter_status=status,
        statuses=list(AccountStatus),
        search=search,
        sort=sort,
        sort_labels=SORT_LABELS,
        link=lambda **changes: _link(base, changes),
        next_link=_link(base, {"after": encode_cursor(page.next)}) if page.next else None,
        previous_link=(
            _link(base, {"before": encode_cursor(page.previous)}) if page.previous else None
        ),
        notice=NOTICES.get(query.get("notice", "")),
        here=_link(base, {"after": query.get("after"), "before": query.get("before")}),
    )


async def account(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = account_id_of(request)
    now = services.clock.now()
    row = await services.status.account(account_id, now)
    attempts = await services.status.attempts(account_id, limit=ATTEMPTS_SHOWN)
    notice = NOTICES.get(request.query.get("notice", ""))
    return render(
        request,
        "account.html",
        row=row,
        due=services.status.due_at(account_id),
        explanation=explain(row.status, row.last_error, row.failure_count),
        attempts=attempts,
        durations=durations_chart(attempts),
        notice=notice,
        hint=STATUS_HINTS[row.status],
        warn_hard=services.config.refresh.hard_expiry_warning,
    )


async def confirm_disconnect(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = account_id_of(request)
    row = await services.status.account(account_id, services.clock.now())
    return render(request, "disconnect.html", row=row)


def account_id_of(request: web.Request) -> str:
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise Refused(400, "Bad account id", f"An account id is {ACCOUNT_ID_RULE}.")
    return account_id


def encode_cursor(cursor: Cursor) -> str:
    data = json.dumps([cursor.key, cursor.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _bad_cursor() -> Refused:
    return Refused(400, "Bad link", "This page link is damaged; start from the first page.")


def _cursor(text: str | None) -> Cursor | None:
    if not text:
        return None
    try:
        key, row_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, binascii.Error):
        raise _bad_cursor() from None
    if not isinstance(key, str | int) or isinstance(key, bool) or not isinstance(row_id, int):
        raise _bad_cursor()
    return Cursor(key, row_id)


def _choice(text: str, kind: type[E], name: str) -> E | None:
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise Refused(400, "Bad link", f"{name} must be one of {allowed}") from None


def _link(base: dict[str, str], changes: dict[str, Any]) -> str:
    params = {**base, **{k: v for k, v in changes.items() if v is not None}}
    return "/ui/accounts?" + urlencode({k: v for k, v in params.items() if v != ""})
