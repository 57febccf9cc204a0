"""The README's operator steps, run as written on a fresh "server".

The server's directories (/opt, /etc, /var/lib, /usr/local/bin) are empty
temporary ones; the one editing step is done by an $EDITOR that fills in the
settings the README names (pointing the daemon at the Intuit simulator). The
default test stands in for the two install lines (a virtualenv and pip take
half a minute); ``-m slow`` runs them too.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbo_daemon.cli.demo import free_port
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings

ROOT = Path(__file__).resolve().parents[1]
SERVER_PATHS = ("/opt/qbo-daemon", "/etc/qbo-daemon", "/var/lib/qbo-daemon", "/usr/local/bin")
INSTALL_LINES = ("python3 -m venv /opt/qbo-daemon/venv", "/opt/qbo-daemon/venv/bin/pip install .")


def operator_steps() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from your app", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


EDITOR = """\
import re, sys
path = sys.argv[1]
settings = {settings!r}
section, out = None, []
for line in open(path, encoding="utf-8").read().splitlines():
    head = re.match(r"\\[(\\w+)\\]", line)
    if head:
        section = head.group(1)
    key = re.match(r"(\\w+) = ", line)
    if key and (section, key.group(1)) in settings:
        line = f"{{key.group(1)}} = {{settings[(section, key.group(1))]}}"
    out.append(line)
open(path, "w", encoding="utf-8").write("\\n".join(out) + "\\n")
"""


@pytest.fixture
def simulator_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qbo_daemon", "simulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/_sim/stats")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_the_steps(tmp_path: Path, simulator_url: str, *, install: bool) -> None:
    server = tmp_path / "server"
    moved = {path: f"{server}{path}" for path in SERVER_PATHS}
    Path(moved["/usr/local/bin"]).mkdir(parents=True)  # a fresh server has it, empty
    api_port, callback_port = free_port(), free_port()
    sim = SimulatorSettings()
    endpoints = IntuitSimulator(sim)
    endpoints.base_url = simulator_url
    settings = {
        ("intuit", "client_id"): f'"{sim.client_id}"',
        ("intuit", "client_secret"): f'"{sim.client_secret}"',
        ("intuit", "redirect_uri"): f'"http://127.0.0.1:{callback_port}/accounts/oauth2_callback"',
        ("intuit", "authorization_endpoint"): f'"{endpoints.authorization_endpoint}"',
        ("intuit", "token_endpoint"): f'"{endpoints.token_endpoint}"',
        ("intuit", "revocation_endpoint"): f'"{endpoints.revocation_endpoint}"',
        ("callback", "listen"): f'"127.0.0.1:{callback_port}"',
        ("api", "listen"): f'"127.0.0.1:{api_port}"',
        ("api", "keys"): '["readme-test-api-key-0123456789"]',
        ("storage", "path"): '"/var/lib/qbo-daemon/qbo-daemon.sqlite3"',
        ("storage", "key_file"): '"/etc/qbo-daemon/encryption_key"',
    }
    for path, target in moved.items():
        settings = {k: v.replace(path, target) for k, v in settings.items()}
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR.format(settings=settings), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}
    env.update(
        PATH=f"{moved['/usr/local/bin']}:/usr/bin:/bin",
        EDITOR=f"{sys.executable} {editor}",
        # Stands in for /etc/qbo-daemon/config.toml, the default every command reads.
        QBO_DAEMON_CONFIG=f"{moved['/etc/qbo-daemon']}/config.toml",
    )

    steps = operator_steps()
    *setup, run = steps
    assert run.split("#")[0].strip() == "qbo-daemon run"
    script = []
    for line in setup:
        if not install and line.split("#")[0].strip() in INSTALL_LINES:
            if line.startswith("python3 -m venv"):  # a stand-in for the venv with our code
                venv_bin = Path(moved["/opt/qbo-daemon"]) / "venv" / "bin"
                venv_bin.mkdir(parents=True)
                wrapper = venv_bin / "qbo-daemon"
                wrapper.write_text(
                    f'#!/bin/sh\nexec {sys.executable} -m qbo_daemon "$@"\n', encoding="utf-8"
                )
                wrapper.chmod(0o755)
            continue
        for path, target in moved.items():
            line = line.replace(path, target)
        script.append(line)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = Path(moved["/etc/qbo-daemon"]) / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    key = Path(moved["/etc/qbo-daemon"]) / "encryption_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "# configuration OK" in result.stderr  # check-config

    daemon = subprocess.Popen(
        ["bash", "-c", f"exec {run}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        wait_for(f"http://127.0.0.1:{api_port}/healthz")
        listing = subprocess.run(
            ["bash", "-c", "qbo-daemon accounts list"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.startswith("no accounts yet")
        assert (Path(moved["/var/lib/qbo-daemon"]) / "qbo-daemon.sqlite3").exists()
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, errors = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, errors


def test_the_readme_operator_steps_work_on_a_fresh_server(
    tmp_path: Path, simulator_url: str
) -> None:
    run_the_steps(tmp_path, simulator_url, install=False)


@pytest.mark.slow
def test_the_readme_operator_steps_work_with_a_real_install(
    tmp_path: Path, simulator_url: str
) -> None:
    run_the_steps(tmp_path, simulator_url, install=True)
