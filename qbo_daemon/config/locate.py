"""Which configuration file a command reads when ``--config`` is not given.

The order: ``--config PATH``; else ``$QBO_DAEMON_CONFIG``; else
``/etc/qbo-daemon/config.toml`` when it exists. With none of them there is no
configuration to read, and the command says so instead of quietly running on
built-in defaults (which hold no API key and no database path of the operator's).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qbo_daemon.core.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/qbo-daemon/config.toml")
ENV_CONFIG = "QBO_DAEMON_CONFIG"


def locate_config(
    given: Path | None,
    environ: Mapping[str, str],
    *,
    default: Path = DEFAULT_CONFIG_PATH,
) -> Path:
    """The configuration file to read; :class:`ConfigError` when none is named or found."""
    if given is not None:
        return given
    named = environ.get(ENV_CONFIG, "").strip()
    if named:
        return Path(named)
    if default.exists():
        return default
    raise ConfigError(
        f"no configuration file: pass --config PATH, set {ENV_CONFIG}=PATH, or create {default}"
    )
