"""The effective configuration as TOML, with every secret masked."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from qbo_daemon.config.load import _SCHEMA, Config
from qbo_daemon.config.values import MASK, _toml_string, format_duration
from qbo_daemon.core.dburl import redact_url
from qbo_daemon.core.models import Secret

_Renderable = (
    bool | str | int | timedelta | Path | Secret | tuple[str, ...] | tuple[Secret, ...] | None
)


def _toml_value(value: _Renderable) -> str:
    if isinstance(value, Secret):
        return _toml_string(MASK if value else "")
    if isinstance(value, bool):  # before int: a bool is one
        return "true" if value else "false"
    if isinstance(value, tuple):
        items = (_toml_value(item) for item in value)
        return "[" + ", ".join(items) + "]"
    if isinstance(value, timedelta):
        return _toml_string(format_duration(value))
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if value is None:
        return '""'
    return _toml_string(str(value))


def _masked_url(url: str | None) -> str | None:
    """A webhook URL's path and query often are its secret (Slack, Discord): hide them."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.path.strip("/") or parts.query:
        return f"{parts.scheme}://{parts.netloc}/{MASK}"
    return url


def render_config(config: Config) -> str:
    """The effective configuration as TOML, every secret shown as ``"********"``.

    ``client_id`` is masked too (it travels through the same channels as the
    secret), and so are a webhook URL's path and query, which often are its
    credential, and the password of ``[storage] url``. An unset value shows as ``""``.
    """
    i, c, a, s, r, n = (
        config.intuit,
        config.callback,
        config.api,
        config.storage,
        config.refresh,
        config.notify,
    )
    tables: dict[str, dict[str, _Renderable]] = {
        "intuit": {
            "environment": i.environment,
            "client_id": Secret(i.client_id),
            "client_secret": i.client_secret,
            "redirect_uri": i.redirect_uri,
            "scopes": i.scopes,
            "authorization_endpoint": i.authorization_endpoint,
            "token_endpoint": i.token_endpoint,
            "revocation_endpoint": i.revocation_endpoint,
            "api_base": i.api_base,
            "timeout": i.timeout,
            "pkce": i.pkce,
        },
        "callback": {
            "listen": _listen_text(c.host, c.port),
            "success_redirect": c.success_redirect,
            "allow_shared_realm": c.allow_shared_realm,
            "max_connections": c.max_connections,
            "read_timeout": c.read_timeout,
        },
        "api": {
            "listen": _listen_text(a.host, a.port),
            "keys": a.keys,
            "max_connections": a.max_connections,
            "read_timeout": a.read_timeout,
        },
        "storage": {
            "path": s.path,
            "url": redact_url(s.url.reveal()) if s.url else None,
            "encryption_keys": s.encryption_keys,
            "attempts_keep": s.attempts_keep,
        },
        "refresh": {name: getattr(r, name) for name in _SCHEMA["refresh"]},
        "log": {
            "format": config.log.format,
            "level": config.log.level,
            "access": config.log.access,
        },
        "notify": {
            "webhook_url": _masked_url(n.webhook_url),
            "secret": n.secret,
            "timeout": n.timeout,
        },
        "cluster": {"node_id": config.cluster.node_id},
    }
    source = config.source if config.source is not None else "built-in defaults"
    lines = [f"# effective qbo-daemon configuration from {source}; secrets masked"]
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
