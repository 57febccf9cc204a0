"""How the Intuit simulator answers: its settings, validated on every change."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = ["SimulatorSettings"]

# Field name -> accepted types, for run-time updates (``bool`` is never an int here).
_SETTING_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "client_id": (str,),
    "client_secret": (str,),
    "expires_in": (int,),
    "refresh_expires_in": (int,),
    "hard_expires_in": (int, type(None)),
    "rotate_after": (int, float),
    "latency": (int, float),
    "code_lifetime": (int, float),
    "kill_on_code_reuse": (bool,),
}


@dataclass
class SimulatorSettings:
    """How the simulator answers. Mutable at run time (prefer :meth:`update`)."""

    client_id: str = "sim-client-id"
    client_secret: str = "sim-client-secret"  # noqa: S105 - a test stand-in's own secret
    expires_in: int = 3600
    """Access token lifetime sent in answers."""
    refresh_expires_in: int = 8_726_400
    """Life of a fresh refresh token value; ``x_refresh_token_expires_in`` counts it down."""
    hard_expires_in: int | None = 5 * 365 * 86400
    """Counted from the first authorization; sent only when the client asks by header."""
    rotate_after: float = 86_400.0
    """Age at which a refresh returns a new refresh token value; 0 rotates every time."""
    latency: float = 0.0
    """Seconds each token or revoke call waits before answering."""
    code_lifetime: float = 600.0
    kill_on_code_reuse: bool = True
    """A replayed code also kills the connection it made (RFC 6749 4.1.2; the worse case)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            _check_setting(item.name, getattr(self, item.name))

    def update(self, **changes: Any) -> None:
        """Validate every change first, then apply all of them (or none)."""
        for name, value in changes.items():
            _check_setting(name, value)
        for name, value in changes.items():
            setattr(self, name, value)


def _check_setting(name: str, value: Any) -> None:
    kinds = _SETTING_TYPES.get(name)
    if kinds is None:
        raise ValueError(f"unknown setting {name!r}")
    # bool is an int subclass: accept it only where a bool is wanted.
    if isinstance(value, bool) is not (bool in kinds) or not isinstance(value, kinds):
        raise ValueError(f"setting {name!r} must be {_type_names(kinds)}, not {value!r}")
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (not math.isfinite(value) or value < 0)
    ):
        raise ValueError(f"setting {name!r} must be a finite number >= 0, not {value!r}")
    if name == "client_id" and not value:
        raise ValueError("setting 'client_id' must not be empty")


def _type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
