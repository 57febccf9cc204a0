from __future__ import annotations

import base64
import dataclasses
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qbo_daemon.config.load import (
    MASK,
    ApiConfig,
    Config,
    default_config,
    format_duration,
    load_config,
    parse_duration,
    require_credentials,
)
from qbo_daemon.config.render import render_config
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.core.models import Secret

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
KEY_A = base64.urlsafe_b64encode(bytes(range(32))).decode()
KEY_B = base64.urlsafe_b64encode(bytes(range(100, 132))).decode()
BAD_KEY = "c2VjcmV0LWJ1dC10b28tc2hvcnQ="  # valid base64, 22 bytes


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ or {})


def error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return str(caught.value)


# --- defaults and the example file ---------------------------------------------------------


def test_defaults() -> None:
    config = default_config()
    assert config.source is None
    assert config.intuit.environment == "production"
    assert config.intuit.client_id == ""
    assert not config.intuit.client_secret
    assert config.intuit.redirect_uri == "http://localhost:8766/accounts/oauth2_callback"
    assert config.intuit.scopes == ("com.intuit.quickbooks.accounting",)
    assert config.intuit.authorization_endpoint == "https://appcenter.intuit.com/connect/oauth2"
    assert (
        config.intuit.token_endpoint == "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
    )
    assert (
        config.intuit.revocation_endpoint
        == "https://developer.api.intuit.com/v2/oauth2/tokens/revoke"
    )
    assert config.intuit.timeout == timedelta(seconds=30)
    assert (config.callback.host, config.callback.port) == ("127.0.0.1", 8766)
    assert config.callback.path == "/accounts/oauth2_callback"
    assert config.callback.success_redirect is None
    assert (config.api.host, config.api.port, config.api.keys) == ("127.0.0.1", 8765, ())
    assert config.api.url == "http://127.0.0.1:8765"
    assert config.storage.path == Path("qbo-daemon.sqlite3")
    assert config.storage.encryption_keys == ()
    assert config.storage.attempts_keep == 100_000
    r = config.refresh
    assert (r.lead, r.concurrency) == (timedelta(minutes=10), 8)
    assert (r.backoff_initial, r.backoff_max) == (timedelta(seconds=5), timedelta(minutes=5))
    assert r.backoff_max_expired == timedelta(seconds=30)
    assert (r.token_wait, r.shutdown_grace) == (timedelta(seconds=30), timedelta(seconds=35))
    assert r.hard_expiry_warning == timedelta(days=30)
    assert r.invalid_client_retry == timedelta(minutes=5)
    assert (config.log.format, config.log.level) == ("auto", "info")
    assert config.notify.webhook_url is None
    assert config.notify.secret is None
    assert config.notify.timeout == timedelta(seconds=10)
    assert load_config(None, {}) == config


def test_config_is_immutable() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.refresh.lead = timedelta(0)  # type: ignore[misc]


def test_example_file_loads_to_the_defaults() -> None:
    config = load_config(EXAMPLE, {})
    assert config.source == EXAMPLE
    assert dataclasses.replace(config, source=None) == default_config()


def test_example_file_documents_every_key() -> None:
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    rendered = tomllib.loads(render_config(default_config()))
    for section, table in rendered.items():
        assert set(table) <= set(example[section]), section
    file_keys = {"client_id_file", "client_secret_file", "key_file", "secret_file"}
    documented = {key for table in example.values() for key in table}
    assert file_keys <= documented


def test_the_design_snippet_loads_as_written(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[intuit]
environment = "production"      # or "sandbox"
client_id = ""                  # or QBO_API_CLIENT_ID
client_secret = ""              # or QBO_API_CLIENT_SECRET
redirect_uri = "http://localhost:3000/accounts/oauth2_callback"
scopes = ["com.intuit.quickbooks.accounting"]
timeout = "30s"                 # per call to Intuit

[callback]
listen = "127.0.0.1:3000"
success_redirect = ""           # optional: send the browser back to the app

[api]
listen = "127.0.0.1:8765"
keys = []                       # or key_file = "/path"

[storage]
path = "qbo-daemon.sqlite3"
encryption_keys = []            # or key_file = "/path"; first encrypts

[refresh]
lead = "10m"
concurrency = 8
backoff_initial = "5s"
backoff_max = "5m"

[log]
format = "auto"                 # auto | console | json
level = "info"
""",
    )
    # design.md still shows the callback on 3000; our default moved off `rails s`'s port.
    assert (config.callback.port, config.intuit.redirect_uri) == (
        3000,
        "http://localhost:3000/accounts/oauth2_callback",
    )
    defaults = default_config()
    assert (
        dataclasses.replace(
            config,
            source=None,
            callback=defaults.callback,
            intuit=dataclasses.replace(config.intuit, redirect_uri=defaults.intuit.redirect_uri),
        )
        == defaults
    )


def test_a_full_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
[intuit]
environment = "sandbox"
client_id = "ABC"
client_secret = "s3cr3t"
redirect_uri = "https://app.example.com/qbo/callback"
scopes = ["com.intuit.quickbooks.accounting", "openid"]
token_endpoint = "http://127.0.0.1:9000/token"
timeout = 5

[callback]
listen = "[::1]:3001"
success_redirect = "https://app.example.com/connected"
max_connections = 32
read_timeout = "5s"

[api]
listen = "0.0.0.0:9999"
keys = ["api-key-1", "api-key-2"]

[storage]
path = "/var/lib/qbo/db.sqlite3"
encryption_keys = ["{KEY_A}", "{KEY_B}"]
attempts_keep = 500

[refresh]
lead = "1h30m"
concurrency = 64
backoff_initial = 0.5
backoff_max = "2m"
backoff_max_expired = "45s"

[log]
format = "json"
level = "debug"

[notify]
webhook_url = "https://hooks.example.com/T000/B000/XXXX"
secret = "hook-secret"
""",
    )
    assert config.intuit.environment == "sandbox"
    assert config.intuit.client_id == "ABC"
    assert config.intuit.client_secret == Secret("s3cr3t")
    assert config.intuit.token_endpoint == "http://127.0.0.1:9000/token"
    assert config.intuit.authorization_endpoint == "https://appcenter.intuit.com/connect/oauth2"
    assert config.intuit.timeout == timedelta(seconds=5)
    assert config.intuit.scopes == ("com.intuit.quickbooks.accounting", "openid")
    assert (config.callback.host, config.callback.port) == ("::1", 3001)
    assert config.callback.path == "/qbo/callback"
    assert config.callback.success_redirect == "https://app.example.com/connected"
    assert config.callback.max_connections == 32
    assert config.callback.read_timeout == timedelta(seconds=5)
    assert (config.api.max_connections, config.api.read_timeout) == (1024, timedelta(seconds=30))
    assert config.api.keys == (Secret("api-key-1"), Secret("api-key-2"))
    assert config.api.url == "http://127.0.0.1:9999"
    assert config.storage.encryption_keys == (Secret(KEY_A), Secret(KEY_B))
    assert config.storage.path == Path("/var/lib/qbo/db.sqlite3")
    assert config.refresh.lead == timedelta(hours=1, minutes=30)
    assert config.refresh.backoff_initial == timedelta(milliseconds=500)
    assert config.refresh.backoff_max_expired == timedelta(seconds=45)
    assert (config.log.format, config.log.level) == ("json", "debug")
    assert config.notify.secret == Secret("hook-secret")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8765"),
        ("0.0.0.0", "http://127.0.0.1:8765"),  # noqa: S104
        ("::", "http://[::1]:8765"),
        ("::1", "http://[::1]:8765"),
        ("localhost", "http://localhost:8765"),
    ],
)
def test_api_url(host: str, url: str) -> None:
    assert ApiConfig(host=host, port=8765, keys=()).url == url


def test_unpadded_encryption_key_is_stored_padded(tmp_path: Path) -> None:
    config = load(tmp_path, f'[storage]\nencryption_keys = ["{KEY_A.rstrip("=")}"]\n')
    assert config.storage.encryption_keys == (Secret(KEY_A),)


# --- errors name the file and the key ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[refresh]\nleed = "10m"', '[refresh] leed: unknown key; did you mean "lead"?'),
        ('[intuit]\nlead = "10m"', "[intuit] lead: unknown key; it belongs in [refresh]"),
        ("[refesh]\nconcurrency = 2", "unknown section [refesh]; did you mean [refresh]?"),
        ("[metrics]\nport = 1", "unknown section [metrics]"),
        ('lead = "10m"', 'unknown top-level key "lead"; it belongs in [refresh]'),
        ("intuit = 3", "[intuit] expected a table, got an integer"),
        (
            '[refresh]\nconcurrency = "8"',
            '[refresh] concurrency: expected an integer, got "8"',
        ),
        ("[refresh]\nconcurrency = true", "[refresh] concurrency: expected an integer, got true"),
        ("[refresh]\nconcurrency = 0", "[refresh] concurrency: must be between 1 and 1024, got 0"),
        ("[refresh]\nconcurrency = 1025", "[refresh] concurrency: must be between 1 and 1024"),
        (
            '[refresh]\nlead = "ten"',
            '[refresh] lead: expected a duration like "90s", "10m", "1h" or a number of seconds, '
            'got "ten"',
        ),
        ("[refresh]\nlead = -5", "[refresh] lead: must not be negative, got -5"),
        ("[refresh]\nlead = [1]", "[refresh] lead: expected a duration"),
        (
            '[refresh]\nbackoff_initial = "0s"',
            "[refresh] backoff_initial: must be greater than zero",
        ),
        (
            '[refresh]\nbackoff_initial = "10m"',
            "[refresh] backoff_max: must be at least backoff_initial (10m)",
        ),
        (
            '[refresh]\nbackoff_max_expired = "0s"',
            "[refresh] backoff_max_expired: must be greater than zero",
        ),
        ('[intuit]\ntimeout = "0"', "[intuit] timeout: must be greater than zero"),
        ("[storage]\nattempts_keep = 99", "[storage] attempts_keep: must be between 100"),
        ('[storage]\npath = ""', "[storage] path: must not be empty"),
        ('[api]\nlisten = "127.0.0.1:70000"', "[api] listen: the port must be a number from 1"),
        ('[api]\nlisten = "127.0.0.1:0"', "[api] listen: the port must be a number from 1"),
        ('[api]\nlisten = "127.0.0.1:http"', "[api] listen: the port must be a number from 1"),
        ('[api]\nlisten = ":8765"', '[api] listen: expected "HOST:PORT"'),
        ('[api]\nlisten = "8765"', '[api] listen: expected "HOST:PORT"'),
        ('[callback]\nlisten = "::1:3000"', '[callback] listen: expected "HOST:PORT" such as'),
        ('[callback]\nlisten = "[nope]:3000"', '[callback] listen: expected "HOST:PORT"'),
        ('[callback]\nlisten = "bad host:3000"', '[callback] listen: expected "HOST:PORT"'),
        (
            '[api]\nlisten = "0.0.0.0:8766"',
            "[api] listen: overlaps [callback] listen; give them different ports",
        ),
        (
            '[intuit]\ntoken_endpoint = "ftp://example.com/token"',
            '[intuit] token_endpoint: expected an http(s) URL with a host, got "ftp://example.com',
        ),
        (
            '[intuit]\nauthorization_endpoint = "appcenter.intuit.com/connect"',
            "[intuit] authorization_endpoint: expected an http(s) URL with a host",
        ),
        (
            '[intuit]\nrevocation_endpoint = "https://example.com:99999/x"',
            "[intuit] revocation_endpoint: expected an http(s) URL with a host",
        ),
        (
            '[intuit]\ntoken_endpoint = "https://user:pw@example.com/x"',
            "[intuit] token_endpoint: must not carry a user name or password",
        ),
        (
            '[intuit]\nredirect_uri = "http://localhost:3000/cb?x=1"',
            "[intuit] redirect_uri: must not have a ?query",
        ),
        ('[callback]\nsuccess_redirect = "/done"', "[callback] success_redirect: expected an"),
        ("[intuit]\nscopes = []", "[intuit] scopes: expected a non-empty array of scopes"),
        ('[intuit]\nscopes = "openid"', "[intuit] scopes: expected an array of strings"),
        ("[intuit]\nscopes = [1]", "[intuit] scopes: item 1: expected a string, got an integer"),
        ('[intuit]\nscopes = ["a b"]', "[intuit] scopes: expected a non-empty array"),
        (
            '[intuit]\nenvironment = "prod"',
            '[intuit] environment: expected one of "production", "sandbox", got "prod"',
        ),
        ('[log]\nlevel = "verbose"', '[log] level: expected one of "debug", "info"'),
        ('[log]\nformat = "xml"', '[log] format: expected one of "auto", "console", "json"'),
        (
            '[notify]\nwebhook_url = "https://hooks.example.com/x"',
            "[notify] secret: required when webhook_url is set",
        ),
        (
            "[callback]\nmax_connections = 0",
            "[callback] max_connections: must be between 1 and 100000, got 0",
        ),
        ('[api]\nmax_connections = "many"', "[api] max_connections: expected an integer"),
        ('[callback]\nread_timeout = "0s"', "[callback] read_timeout: must be greater than zero"),
        ('[api]\nread_timeout = "soon"', "[api] read_timeout: expected a duration"),
        ('[api]\nkeys = ["has space"]', "[api] keys: key 1 must be a non-empty string"),
        ('[intuit]\nclient_secret = "a"\nclient_secret_file = "/x"', "[intuit] client_secret_file"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.toml'}: ")
    assert expected in message
    assert "Traceback" not in message


def test_error_shape_and_key_attribute(tmp_path: Path) -> None:
    path = write(tmp_path, '[refresh]\nlead = "ten"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(caught.value) == (
        f'{path}: [refresh] lead: expected a duration like "90s", "10m", "1h" or a number of '
        'seconds, got "ten"'
    )
    assert caught.value.key == "refresh.lead"
    assert caught.value.path == str(path)


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    message = error(tmp_path, '[refresh]\nlead = "10m"\nconcurrency = = 3\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: TOML syntax error: ")
    assert "line 3" in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path, {})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[intuit]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary, {})


@pytest.mark.parametrize(
    "text",
    [
        "[intuit]\nclient_secret = 123456789\n",
        '[intuit]\nclient_secret = ["123456789"]\n',
        '[notify]\nwebhook_url = "ftp://hooks/123456789"\nsecret = "x"\n',
        '[api]\nkeys = "123456789"\n',
    ],
)
def test_secret_values_are_never_echoed(tmp_path: Path, text: str) -> None:
    assert "123456789" not in error(tmp_path, text)


# --- encryption keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [BAD_KEY, "not base64 at all!", KEY_A.replace("A", "+"), KEY_A[:-2] + "B=", KEY_A + "AAAA"],
)
def test_bad_encryption_key_names_its_position_not_its_value(tmp_path: Path, bad: str) -> None:
    message = error(tmp_path, f'[storage]\nencryption_keys = ["{KEY_A}", "{bad}"]\n')
    assert "[storage] encryption_keys: key 2 is not url-safe base64 of exactly 32 bytes" in message
    assert bad not in message
    assert KEY_A not in message


def test_bad_encryption_key_in_key_file_names_the_line(tmp_path: Path) -> None:
    keys = write(tmp_path, f"# current\n{KEY_A}\n\n{BAD_KEY}\n", "keys.txt")
    message = error(tmp_path, f'[storage]\nkey_file = "{keys}"\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: [storage] key_file: {keys} line 4: ")
    assert BAD_KEY not in message


def test_bad_encryption_key_in_credentials_directory(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "encryption_key").write_text(BAD_KEY)
    with pytest.raises(ConfigError) as caught:
        default_config({"CREDENTIALS_DIRECTORY": str(credentials)})
    message = str(caught.value)
    assert message.startswith(f"{credentials / 'encryption_key'}: [storage] encryption_keys: ")
    assert "line 1" in message
    assert BAD_KEY not in message


def test_key_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    keys = write(tmp_path, f"# newest first\n\n  {KEY_B}  \n# old\n{KEY_A}\n", "keys.txt")
    config = load(tmp_path, f'[storage]\nkey_file = "{keys}"\n')
    assert config.storage.encryption_keys == (Secret(KEY_B), Secret(KEY_A))


def test_keys_and_key_file_together_is_an_error(tmp_path: Path) -> None:
    keys = write(tmp_path, "k1\n", "keys.txt")
    message = error(tmp_path, f'[api]\nkeys = ["k0"]\nkey_file = "{keys}"\n')
    assert "[api] key_file: set either keys or key_file, not both" in message


@pytest.mark.parametrize(
    ("content", "problem"), [(None, "cannot read"), ("# only a comment\n\n", "holds no key")]
)
def test_unusable_key_file(tmp_path: Path, content: str | None, problem: str) -> None:
    keys = tmp_path / "keys.txt"
    if content is not None:
        keys.write_text(content)
    message = error(tmp_path, f'[api]\nkey_file = "{keys}"\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: [api] key_file: ")
    assert problem in message
    assert str(keys) in message


# --- secrets from files, the environment and systemd credentials ---------------------------


def test_secret_files(tmp_path: Path) -> None:
    write(tmp_path, "the-id\n", "id")
    write(tmp_path, "  the-secret \n", "secret")
    write(tmp_path, "hook\n", "hook")
    config = load(
        tmp_path,
        f"""
[intuit]
client_id_file = "{tmp_path / "id"}"
client_secret_file = "{tmp_path / "secret"}"
[notify]
webhook_url = "https://hooks.example.com/x"
secret_file = "{tmp_path / "hook"}"
""",
    )
    assert config.intuit.client_id == "the-id"
    assert config.intuit.client_secret == Secret("the-secret")
    assert config.notify.secret == Secret("hook")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("\n", "is empty"),
        ("first-xyz\nsecond-xyz\n", "must hold the value on one line"),
    ],
)
def test_unusable_secret_file(tmp_path: Path, content: str | None, problem: str) -> None:
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_text(content)
    message = error(tmp_path, f'[intuit]\nclient_secret_file = "{secret}"\n')
    assert message.startswith(f"{tmp_path / 'config.toml'}: [intuit] client_secret_file: ")
    assert problem in message
    assert "xyz" not in message


def test_environment_supplies_client_credentials() -> None:
    environ = {"QBO_API_CLIENT_ID": "env-id", "QBO_API_CLIENT_SECRET": "env-secret\n"}
    config = default_config(environ)
    assert config.intuit.client_id == "env-id"
    assert config.intuit.client_secret == Secret("env-secret")


def test_the_example_file_and_the_environment(tmp_path: Path) -> None:
    """The example's ``client_id = ""`` is unset, so the environment still applies."""
    config = load_config(EXAMPLE, {"QBO_API_CLIENT_ID": "env-id"})
    assert config.intuit.client_id == "env-id"


def test_empty_environment_variables_are_unset() -> None:
    config = default_config({"QBO_API_CLIENT_ID": "", "QBO_API_CLIENT_SECRET": "  "})
    assert config.intuit.client_id == ""
    assert not config.intuit.client_secret


def credentials_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "client_id").write_text("cred-id\n")
    (directory / "client_secret").write_text("cred-secret\n")
    (directory / "api_key").write_text("api-1\napi-2\n")
    (directory / "encryption_key").write_text(f"{KEY_A}\n")
    (directory / "webhook_secret").write_text("cred-hook\n")
    return directory


def test_credentials_directory(tmp_path: Path) -> None:
    directory = credentials_directory(tmp_path)
    config = load(
        tmp_path,
        '[notify]\nwebhook_url = "https://hooks.example.com/x"\n',
        {"CREDENTIALS_DIRECTORY": str(directory)},
    )
    assert config.intuit.client_id == "cred-id"
    assert config.intuit.client_secret == Secret("cred-secret")
    assert config.api.keys == (Secret("api-1"), Secret("api-2"))
    assert config.storage.encryption_keys == (Secret(KEY_A),)
    assert config.notify.secret == Secret("cred-hook")
    require_credentials(config)


def test_precedence_file_then_environment_then_credentials(tmp_path: Path) -> None:
    directory = credentials_directory(tmp_path)
    environ = {
        "CREDENTIALS_DIRECTORY": str(directory),
        "QBO_API_CLIENT_ID": "env-id",
        "QBO_API_CLIENT_SECRET": "env-secret",
    }
    write(tmp_path, "file-secret\n", "secret")
    config = load(
        tmp_path,
        f"""
[intuit]
client_secret_file = "{tmp_path / "secret"}"
[api]
keys = ["toml-key"]
""",
        environ,
    )
    assert config.intuit.client_secret == Secret("file-secret")  # TOML *_file beats env
    assert config.intuit.client_id == "env-id"  # env beats credentials
    assert config.api.keys == (Secret("toml-key"),)  # TOML beats credentials
    assert config.storage.encryption_keys == (Secret(KEY_A),)  # credentials as a last resort
    without_env = default_config({"CREDENTIALS_DIRECTORY": str(directory)})
    assert without_env.intuit.client_id == "cred-id"


def test_credentials_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY.*not a directory"):
        default_config({"CREDENTIALS_DIRECTORY": str(tmp_path / "nope")})


def test_require_credentials_names_what_is_missing(tmp_path: Path) -> None:
    path = write(tmp_path, f'[storage]\nencryption_keys = ["{KEY_A}"]\n')
    with pytest.raises(ConfigError) as caught:
        require_credentials(load_config(path, {"QBO_API_CLIENT_ID": "id"}))
    message = str(caught.value)
    assert message.startswith(f"{path}: missing [intuit] client_secret (")
    assert "QBO_API_CLIENT_SECRET" in message
    assert "[api] keys" in message
    assert "client_id" not in message.replace("client_secret", "")
    assert "encryption_keys" not in message
    assert caught.value.key == "intuit.client_secret"


def test_require_credentials_passes_when_all_are_set() -> None:
    config = default_config({"QBO_API_CLIENT_ID": "id", "QBO_API_CLIENT_SECRET": "s"})
    config = dataclasses.replace(
        config,
        api=dataclasses.replace(config.api, keys=(Secret("k"),)),
        storage=dataclasses.replace(config.storage, encryption_keys=(Secret(KEY_A),)),
    )
    require_credentials(config)


# --- render_config -------------------------------------------------------------------------


def test_render_config_masks_every_secret(tmp_path: Path) -> None:
    secrets = ["client-id-xyz", "client-secret-xyz", "api-key-xyz", KEY_A, "hook-secret-xyz"]
    config = load(
        tmp_path,
        f"""
[intuit]
client_id = "client-id-xyz"
client_secret = "client-secret-xyz"
[api]
keys = ["api-key-xyz"]
[storage]
encryption_keys = ["{KEY_A}"]
[notify]
webhook_url = "https://hooks.example.com/services/T0/B0/path-token-xyz"
secret = "hook-secret-xyz"
""",
    )
    text = render_config(config)
    for secret in [*secrets, "path-token-xyz"]:
        assert secret not in text
    rendered = tomllib.loads(text)
    assert rendered["intuit"]["client_secret"] == MASK
    assert rendered["api"]["keys"] == [MASK]
    assert rendered["storage"]["encryption_keys"] == [MASK]
    assert rendered["notify"]["secret"] == MASK
    assert rendered["notify"]["webhook_url"] == f"https://hooks.example.com/{MASK}"
    assert str(tmp_path / "config.toml") in text
    assert repr(config).count(MASK) >= 4
    for secret in secrets[1:]:
        assert secret not in repr(config)


def test_render_config_reads_back_as_the_same_configuration(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[refresh]\nlead = "1h30m"\nbackoff_initial = 0.25\n[callback]\nlisten = "[::]:3000"\n'
        '[intuit]\nscopes = ["a", "b\\"c"]\n',
    )
    again = load(tmp_path, render_config(config))
    assert again.refresh == config.refresh
    assert again.callback == config.callback
    assert again.intuit == config.intuit


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("0.25s", timedelta(milliseconds=250)),
        ("0s", timedelta(0)),
        ("90", timedelta(seconds=90)),
        (" 10m ", timedelta(minutes=10)),
        (90, timedelta(seconds=90)),
        (0, timedelta(0)),
        (1.5, timedelta(seconds=1.5)),
    ],
)
def test_parse_duration(value: object, expected: timedelta) -> None:
    assert parse_duration(value, "refresh.lead") == expected


@pytest.mark.parametrize(
    "value",
    [
        "ten",
        "",
        "-5s",
        -1,
        -0.5,
        "10 minutes",
        "1m1h",
        "1h1h",
        "5ms",
        "10M",
        "h",
        ".5s",
        True,
        None,
        [10],
        float("nan"),
        float("inf"),
        "99999999d",
        10**12,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(value, "refresh.lead")
    assert str(caught.value).startswith("[refresh.lead] ")
    assert caught.value.key == "refresh.lead"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(minutes=10), "10m"),
        (timedelta(days=30), "30d"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(milliseconds=250), "0.25s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=36500)))
def test_format_duration_reads_back(value: timedelta) -> None:
    assert parse_duration(format_duration(value), "k") == value
