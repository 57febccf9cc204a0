"""``[storage] url`` (PostgreSQL, a secret) and ``[cluster] node_id``."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from qbo_daemon.cli.main import main
from qbo_daemon.config.load import MASK, ClusterConfig, Config, default_config, load_config
from qbo_daemon.config.render import render_config
from qbo_daemon.core.dburl import (
    is_postgres_url,
    postgres_url_problem,
    redact_url,
    scrub_url_secrets,
)
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.core.models import Secret
from qbo_daemon.store.crypto import generate_key

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
PASSWORD = "hunter2-Zq9"  # must never show in an error or a rendering
URL = f"postgresql://qbo:{PASSWORD}@db.internal:5432/qbo"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ or {})


def error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    message = str(caught.value)
    assert PASSWORD not in message
    return message


def test_defaults_are_sqlite_and_no_node_id() -> None:
    config = default_config()
    assert config.storage.url is None
    assert config.storage.path == Path("qbo-daemon.sqlite3")
    assert config.cluster == ClusterConfig(node_id="")


def test_example_file_documents_the_new_keys() -> None:
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert example["storage"]["url"] == ""
    assert example["storage"]["url_file"] == ""
    assert example["cluster"] == {"node_id": ""}


@pytest.mark.parametrize(
    "url",
    [
        URL,
        "postgres://qbo@db.internal/qbo",
        "postgresql://localhost",
        "postgresql:///qbo?host=/var/run/postgresql",
        "postgresql://qbo@h1:5432,h2:5433/qbo?target_session_attrs=read-write",
        "postgresql://qbo@[::1]:5432/qbo",
        "POSTGRESQL://qbo@db/qbo",
    ],
)
def test_a_postgres_url_is_taken_as_a_secret(tmp_path: Path, url: str) -> None:
    config = load(tmp_path, f'[storage]\nurl = "{url}"\n')
    assert config.storage.url == Secret(url)
    assert PASSWORD not in repr(config)


def test_empty_url_keeps_sqlite(tmp_path: Path) -> None:
    assert load(tmp_path, '[storage]\nurl = ""\n').storage.url is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"mysql://qbo:{PASSWORD}@db/qbo",
            "[storage] url: the scheme must be postgresql:// or postgres://, got mysql://",
        ),
        ("/var/lib/qbo/db.sqlite3", '[storage] url: expected a URL like "postgresql://'),
        (f"{PASSWORD}", '("" keeps the SQLite file at path)'),
        (f"postgresql://qbo:{PASSWORD}@db:99999/qbo", "the port must be a number from 1 to 65535"),
        (f"postgresql://qbo:{PASSWORD}@db:port/qbo", "the port must be a number"),
        (f"postgresql://qbo:{PASSWORD}@db/q bo", "without spaces or control characters"),
        (f"postgresql://qbo:{PASSWORD}@[::1/qbo", "closing bracket"),
    ],
)
def test_a_bad_url_names_file_and_key_never_the_url(
    tmp_path: Path, url: str, expected: str
) -> None:
    message = error(tmp_path, f'[storage]\nurl = "{url}"\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: [storage] url: ")
    assert expected in message


def test_a_url_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    message = error(tmp_path, f'[storage]\nurl = ["{URL}"]\n')
    assert "[storage] url: expected a string, got an array" in message


def test_url_file_environment_and_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "storage_url").write_text("postgresql://cred@db/qbo\n")
    write(tmp_path, "postgresql://file@db/qbo\n", "url")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "QBO_STORAGE_URL": "postgres://env@db/q"}

    from_file = load(tmp_path, f'[storage]\nurl_file = "{tmp_path / "url"}"\n', environ)
    assert from_file.storage.url == Secret("postgresql://file@db/qbo")
    in_toml = load(tmp_path, '[storage]\nurl = "postgresql://toml@db/qbo"\n', environ)
    assert in_toml.storage.url == Secret("postgresql://toml@db/qbo")
    assert load(tmp_path, "", environ).storage.url == Secret("postgres://env@db/q")
    from_credential = load(tmp_path, "", {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert from_credential.storage.url == Secret("postgresql://cred@db/qbo")

    both = error(tmp_path, f'[storage]\nurl = "{URL}"\nurl_file = "{tmp_path / "url"}"\n')
    assert "[storage] url_file: set either url or url_file, not both" in both


def test_a_bad_url_from_elsewhere_says_where_it_came_from(tmp_path: Path) -> None:
    bad = f"mysql://qbo:{PASSWORD}@db/qbo"
    message = error(tmp_path, "", {"QBO_STORAGE_URL": bad})
    assert "[storage] url: $QBO_STORAGE_URL: the scheme must be" in message

    write(tmp_path, bad + "\n", "url")
    message = error(tmp_path, f'[storage]\nurl_file = "{tmp_path / "url"}"\n')
    assert f"[storage] url_file: {tmp_path / 'url'}: the scheme must be" in message

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "storage_url").write_text(bad + "\n")
    message = error(tmp_path, "", {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert message.startswith(f"{credentials / 'storage_url'}: [storage] url: the scheme must")


def test_check_config_masks_the_password(tmp_path: Path) -> None:
    config = load(tmp_path, f'[storage]\nurl = "{URL}?password={PASSWORD}"\n')
    text = render_config(config)
    assert PASSWORD not in text
    rendered = tomllib.loads(text)
    assert rendered["storage"]["url"] == (
        f"postgresql://qbo:{MASK}@db.internal:5432/qbo?password={MASK}"
    )
    assert rendered["cluster"] == {"node_id": ""}


def test_check_config_command_masks_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QBO_STORAGE_URL", URL)
    # No credentials and no key: run would refuse (exit 2), and the rendering still shows.
    assert main(["check-config", "--config", str(write(tmp_path, ""))]) == 2
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert f'url = "postgresql://qbo:{MASK}@db.internal:5432/qbo"' in out


def test_run_on_a_postgres_it_cannot_reach_exits_1_naming_it_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1, not 2: the settings are right and the database may come back, so systemd
    restarts the daemon; nothing is served from a SQLite file instead."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nothing listens on
    port = closed.getsockname()[1]
    closed.close()
    url = f"postgresql://qbo:{PASSWORD}@127.0.0.1:{port}/qbo"
    path = write(
        tmp_path,
        '[intuit]\nclient_id = "id"\nclient_secret = "secret"\n'
        f'[api]\nkeys = ["{"k" * 40}"]\n'
        f'[storage]\nurl = "{url}"\npath = "{tmp_path / "db.sqlite3"}"\n'
        f'encryption_keys = ["{generate_key()}"]\n',
    )
    path.chmod(0o600)
    assert main(["run", "--config", str(path)]) == 1
    _, err = capsys.readouterr()
    assert f"cannot connect to PostgreSQL at postgresql://qbo:{MASK}@127.0.0.1:{port}/qbo" in err
    assert PASSWORD not in err
    assert not (tmp_path / "db.sqlite3").exists()


# -- [cluster] node_id ----------------------------------------------------------------------


def test_node_id(tmp_path: Path) -> None:
    config = load(tmp_path, '[cluster]\nnode_id = "web-1.eu:a"\n')
    assert config.cluster.node_id == "web-1.eu:a"
    assert config.cluster.resolved_node_id(host="h", pid=1) == "web-1.eu:a"
    # Unset: resolved per process at start-up, never by the loader.
    assert default_config().cluster.resolved_node_id(host="web-2", pid=4242) == "web-2:4242"


@pytest.mark.parametrize("bad", ["has space", "-leading", "x" * 129, "ünï"])
def test_a_bad_node_id_names_file_and_key(tmp_path: Path, bad: str) -> None:
    message = error(tmp_path, f'[cluster]\nnode_id = "{bad}"\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: [cluster] node_id: expected 1 to 128")


# -- the URL helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, f"postgresql://qbo:{MASK}@db.internal:5432/qbo"),
        ("postgresql://qbo@db/qbo", "postgresql://qbo@db/qbo"),
        ("postgresql://db", "postgresql://db"),
        (f"postgresql://a:{PASSWORD}@h1,h2:5433/q", f"postgresql://a:{MASK}@h1,h2:5433/q"),
        ("postgresql://a:p@ss@h/q", f"postgresql://a:{MASK}@h/q"),  # an unescaped @ too
        (
            f"postgresql://h/q?sslmode=require&password={PASSWORD}&sslpassword=x",
            f"postgresql://h/q?sslmode=require&password={MASK}&sslpassword={MASK}",
        ),
        (f"postgresql://h/q#{PASSWORD}", "postgresql://h/q"),
        (PASSWORD, MASK),
        ("", MASK),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_which_urls_select_postgres() -> None:
    assert is_postgres_url("postgresql://h/q")
    assert is_postgres_url("Postgres://h/q")
    assert not is_postgres_url("/var/lib/qbo.sqlite3")
    assert not is_postgres_url("sqlite:///x")
    assert postgres_url_problem("postgresql://h/q") is None


def test_scrub_url_secrets_masks_a_password_a_driver_repeats() -> None:
    url = "postgresql://qbo:p%40ss-Zq9@db/qbo?sslpassword=key-pass-7"
    message = f"could not connect to {url}: password p@ss-Zq9 rejected; key-pass-7"
    scrubbed = scrub_url_secrets(message, url)
    for secret in ("p%40ss-Zq9", "p@ss-Zq9", "key-pass-7"):
        assert secret not in scrubbed
    assert f"could not connect to postgresql://qbo:{MASK}@db/qbo" in scrubbed
