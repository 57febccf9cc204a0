"""The keys of a bound connect flow: ``[intuit] api_base`` and ``pkce``,
``[callback] allow_shared_realm``."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qbo_daemon.config.load import DEFAULT_API_BASES, default_config
from qbo_daemon.config.render import render_config
from tests.config.test_load import EXAMPLE, error, load


def test_defaults_confirm_realms_in_production_without_pkce_or_sharing() -> None:
    config = default_config()
    assert config.intuit.api_base == "https://quickbooks.api.intuit.com"
    assert config.intuit.pkce is False
    assert config.callback.allow_shared_realm is False


def test_sandbox_has_its_own_api_base(tmp_path: Path) -> None:
    config = load(tmp_path, '[intuit]\nenvironment = "sandbox"\n')
    assert config.intuit.api_base == "https://sandbox-quickbooks.api.intuit.com"
    assert DEFAULT_API_BASES["sandbox"] == config.intuit.api_base


def test_api_base_can_be_overridden_and_loses_a_trailing_slash(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[intuit]\napi_base = "http://127.0.0.1:8700/"\npkce = true\n'
        "[callback]\nallow_shared_realm = true\n",
    )
    assert config.intuit.api_base == "http://127.0.0.1:8700"
    assert config.intuit.pkce is True
    assert config.callback.allow_shared_realm is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[intuit]\napi_base = "ftp://x"\n', "[intuit] api_base: expected an http(s) URL"),
        ('[intuit]\napi_base = "https://x/?a=1"\n', "[intuit] api_base: must not have a ?query"),
        ('[intuit]\npkce = "yes"\n', '[intuit] pkce: expected true or false, got "yes"'),
        ("[intuit]\npkce = 1\n", "[intuit] pkce: expected true or false, got 1"),
        (
            '[callback]\nallow_shared_realm = "false"\n',
            "[callback] allow_shared_realm: expected true or false",
        ),
        ("[intuit]\nallow_shared_realm = true\n", "it belongs in [callback]"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    shown = error(tmp_path, text)
    assert str(tmp_path / "config.toml") in shown
    assert message in shown


def test_the_example_documents_the_new_keys_with_their_defaults() -> None:
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert example["intuit"]["api_base"] == ""  # "" = the environment's default
    assert example["intuit"]["pkce"] is False
    assert example["callback"]["allow_shared_realm"] is False
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "https://sandbox-quickbooks.api.intuit.com" in text
    assert "does not document" in text  # why PKCE is off by default


def test_render_shows_the_new_keys_and_reads_back(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[intuit]\nenvironment = "sandbox"\npkce = true\n[callback]\nallow_shared_realm = true\n',
    )
    text = render_config(config)
    assert 'api_base = "https://sandbox-quickbooks.api.intuit.com"' in text
    assert "pkce = true" in text
    assert "allow_shared_realm = true" in text
    again = load(tmp_path, text)
    assert again.intuit == config.intuit
    assert again.callback == config.callback
