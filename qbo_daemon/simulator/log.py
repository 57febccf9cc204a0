"""The Intuit simulator's request log: one entry per call, bounded, with counts per outcome."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Final

from qbo_daemon.core.models import iso

__all__ = ["DEFAULT_LOG_LIMIT", "RequestLog", "RequestLogEntry"]

DEFAULT_LOG_LIMIT: Final = 1_000_000


@dataclass(slots=True)
class RequestLogEntry:
    """One call the simulator received. ``status`` 0 means no answer was sent.

    ``concurrent_use``: a refresh presenting a refresh token that another call
    still being answered presented too. ``stale_use``: a refresh presenting a
    value the simulator issued once and has since rotated out.
    """

    at: datetime
    endpoint: str
    grant_type: str | None
    presented_refresh_token: str | None
    issued_refresh_token: str | None
    status: int
    error: str | None
    fault: str | None
    intuit_tid: str
    realm_id: str | None = None
    concurrent_use: bool = False
    stale_use: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = iso(self.at)
        return data


class RequestLog:
    """The last ``limit`` calls, and how many calls per endpoint ended in each outcome.

    An outcome is ``ok``, an error code, ``fault:<kind>``, one counted apart
    with :meth:`count` (``rotated``), or a misuse of a refresh token flagged on
    the entry (``concurrent_use``, ``stale_use``), counted beside the call's
    own outcome. An outcome never seen is absent, not 0. The counts outlive
    trimming.
    """

    def __init__(self, endpoints: Iterable[str], limit: int) -> None:
        self.entries: list[RequestLogEntry] = []
        self.limit = limit
        self.counts: dict[str, Counter[str]] = {e: Counter() for e in endpoints}

    def record(
        self,
        endpoint: str,
        at: datetime,
        tid: str,
        status: int,
        *,
        grant_type: str | None = None,
        presented: str | None = None,
        issued: str | None = None,
        error: str | None = None,
        fault: str | None = None,
        realm_id: str | None = None,
        concurrent_use: bool = False,
        stale_use: bool = False,
    ) -> None:
        log = self.entries
        log.append(
            RequestLogEntry(
                at,
                endpoint,
                grant_type,
                presented,
                issued,
                status,
                error,
                fault,
                tid,
                realm_id,
                concurrent_use,
                stale_use,
            )
        )
        if len(log) > self.limit:
            # Drop a tenth at once so that trimming costs O(1) per call on average.
            del log[: max(len(log) - self.limit, self.limit // 10)]
        counts = self.counts[endpoint]
        counts[f"fault:{fault}" if fault else error or "ok"] += 1
        if concurrent_use:
            counts["concurrent_use"] += 1
        if stale_use:
            counts["stale_use"] += 1

    def count(self, endpoint: str, outcome: str) -> None:
        self.counts[endpoint][outcome] += 1

    def clear(self) -> None:
        """Forget the entries and the counts."""
        self.entries.clear()
        for counts in self.counts.values():
            counts.clear()
