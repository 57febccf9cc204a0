"""The callback's query, read as OAuth parameters (RFC 6749 §4.1.2).

A parameter must not appear twice (RFC 6749 §3.1). Repeated with one value,
it is read once; repeated with different values (``state``, ``code``,
``realmId``, ``error``), which one is meant cannot be known, so it reads as
absent and the flow refuses the callback with a clear page. ``realmId`` is
taken in any casing (Intuit's own pages write ``realmID``); two casings that
disagree are a conflict too. Other parameters (``scope``, ``iss``...) pass
through untouched and are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

log = structlog.get_logger("qbo_daemon.http.callback")

_OAUTH = frozenset({"state", "code", "error", "realmId"})


def oauth_query(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One value per parameter; an OAuth one given conflicting values is left out."""
    values: dict[str, list[str]] = {}
    for key, value in items:
        name = "realmId" if key.lower() == "realmid" else key
        values.setdefault(name, []).append(value)
    query: dict[str, str] = {}
    conflicting = []
    for name, given in values.items():
        if name in _OAUTH and len(set(given)) > 1:
            conflicting.append(name)
        else:
            query[name] = given[0]
    if conflicting:
        # Names only: the values are codes and states.
        log.warning("callback.parameters_rejected", parameters=sorted(conflicting))
    return query
