"""``qbo-daemon demo``: the whole loop against an embedded Intuit simulator.

No credentials, no config file: an in-process simulator hands out short-lived
tokens (a minute by default), a few demo accounts connect through the real
connect flow (API -> simulator consent -> callback), the real daemon refreshes
them on time, and a few injected Intuit faults show retries with backoff.
Ctrl-C stops it cleanly. The configuration it used is written beside the
database, so ``qbo-daemon run --config`` can be pointed at it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import tempfile
from pathlib import Path

import aiohttp
import structlog

from qbo_daemon.config.load import load_config
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.crypto import generate_key

log = structlog.get_logger("qbo_daemon.cli.demo")
# Shown to the reader as a way to look at the rows; the demo never runs it.
_PEEK_QUERY = "SELECT account_id, status, reconnect_token_at FROM accounts"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def simulator_config_text(
    simulator: IntuitSimulator,
    *,
    data_dir: Path,
    api_port: int,
    callback_port: int,
    api_key: str,
    encryption_key: str,
    lead: str = "10m",
    backoff_initial: str = "1s",
    backoff_max: str = "20s",
    log_level: str = "info",
    success_redirect: str = "",
    extra: str = "",
    pkce: str = "true",
) -> str:
    """A complete configuration pointing the daemon at ``simulator``.

    ``pkce`` (TOML, "true" or "false") is on by default: the simulator honours
    it, while Intuit's own support is undocumented.
    """
    settings = simulator.settings
    redirect = f'success_redirect = "{success_redirect}"\n' if success_redirect else ""
    return f"""\
# Written by qbo-daemon for a run against its Intuit simulator.
[intuit]
client_id = "{settings.client_id}"
client_secret = "{settings.client_secret}"
redirect_uri = "http://127.0.0.1:{callback_port}/accounts/oauth2_callback"
authorization_endpoint = "{simulator.authorization_endpoint}"
token_endpoint = "{simulator.token_endpoint}"
revocation_endpoint = "{simulator.revocation_endpoint}"
api_base = "{simulator.api_base}"
timeout = "10s"
pkce = {pkce}

[callback]
listen = "127.0.0.1:{callback_port}"
{redirect}
[api]
listen = "127.0.0.1:{api_port}"
keys = ["{api_key}"]

[storage]
path = "{data_dir / "qbo-daemon.sqlite3"}"
encryption_keys = ["{encryption_key}"]

[refresh]
lead = "{lead}"
backoff_initial = "{backoff_initial}"
backoff_max = "{backoff_max}"
shutdown_grace = "12s"

[log]
level = "{log_level}"
{extra}"""


async def run_demo(
    *, accounts: int, expires_in: int, duration: float | None, data_dir: Path | None
) -> int:
    simulator = IntuitSimulator(
        SimulatorSettings(expires_in=expires_in, rotate_after=expires_in * 2.5)
    )
    await simulator.start()
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="qbo-daemon-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    api_port, callback_port = free_port(), free_port()
    api_key = secrets.token_urlsafe(24)
    config_path = data_dir / "demo.toml"
    # The demo's own throw-away key, kept in its own config: a rerun on the same
    # --data-dir must read the database the previous run wrote.
    keys = load_config(config_path, {}).storage.encryption_keys if config_path.exists() else ()
    encryption_key = keys[0].reveal() if keys else generate_key()
    config_path.write_text(
        simulator_config_text(
            simulator,
            data_dir=data_dir,
            api_port=api_port,
            callback_port=callback_port,
            api_key=api_key,
            encryption_key=encryption_key,
            lead=f"{max(expires_in // 4, 5)}s",
            backoff_initial="2s",
            backoff_max="15s",
        ),
        encoding="utf-8",
    )
    os.chmod(config_path, 0o600)
    config = load_config(config_path, {})
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(daemon.run(stop), name="daemon")
    story: asyncio.Task[None] | None = None
    try:
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({ready, running}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            ready.cancel()
            await running
            return 1
        print(_banner(config.api.url, api_key, data_dir, config_path, simulator), flush=True)
        story = asyncio.create_task(
            _story(simulator, config.api.url, api_key, accounts, expires_in)
        )
        if duration is not None:
            loop.call_later(duration, stop.set)
        await running
    finally:
        stop.set()
        if story is not None:
            story.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await story
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await simulator.close()
    print(f"\nDemo stopped. The database is still at {data_dir / 'qbo-daemon.sqlite3'}.")
    return 0


async def _story(
    simulator: IntuitSimulator, api_url: str, api_key: str, accounts: int, expires_in: int
) -> None:
    """Connect the demo accounts, then stage an Intuit outage and ask for tokens."""
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(headers=headers) as client:
        for number in range(1, accounts + 1):
            account_id = f"demo-{number}"
            async with client.post(f"{api_url}/v1/accounts/{account_id}/authorize-url") as answer:
                url = (await answer.json())["url"]
            # The browser's part: consent at "Intuit", which redirects to our callback.
            async with aiohttp.ClientSession() as browser, browser.get(url) as page:
                log.info("demo.connected", account_id=account_id, callback_status=page.status)
        # After the first round of refreshes, Intuit has a bad minute.
        await asyncio.sleep(expires_in * 0.8)
        simulator.inject("503", 2, retry_after=3)
        simulator.inject("502_html", 1)
        log.warning("demo.outage_injected", faults="two 503s with Retry-After, one HTML 502")
        # The host app asks for a refresh now, so the retries show at once rather
        # than at the next timer.
        async with client.post(f"{api_url}/v1/accounts/demo-1/refresh") as answer:
            log.info("demo.refresh_requested", account_id="demo-1", http_status=answer.status)
        while True:
            async with client.get(f"{api_url}/v1/accounts/demo-1/token") as answer:
                body = await answer.json()
                log.info(
                    "demo.token_served",
                    account_id="demo-1",
                    http_status=answer.status,
                    expires_at=body.get("expires_at"),
                )
            await asyncio.sleep(max(expires_in / 2, 5))


def _banner(
    api_url: str, api_key: str, data_dir: Path, config_path: Path, simulator: IntuitSimulator
) -> str:
    return f"""
qbo-daemon demo: the daemon runs against an embedded Intuit simulator.
  status page {api_url}/ui/   (open it in a browser; sign in with the key below)
  sign-in key {api_key}   (also the token API's key)
  token API   {api_url}
  simulator   {simulator.base_url}
  database    {data_dir / "qbo-daemon.sqlite3"}
  config      {config_path}
Try, in another terminal:
  curl -s -H "Authorization: Bearer {api_key}" {api_url}/v1/accounts
  curl -s -H "Authorization: Bearer {api_key}" {api_url}/v1/accounts/demo-1/token
  sqlite3 {data_dir / "qbo-daemon.sqlite3"} \
    '{_PEEK_QUERY}'
Press Ctrl-C to stop.
"""
