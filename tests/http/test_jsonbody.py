"""The step-by-step JSON reader and writer agree with ``json`` on every input."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbo_daemon.http.jsonbody import CollectorPause, dumps_object, loads_object

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
OBJECTS = st.dictionaries(st.text(max_size=8), VALUES, max_size=5)


def outcome(load: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", load(raw)
    except ValueError:
        return "error", None


@settings(max_examples=400)
@given(data=OBJECTS, indent=st.sampled_from([None, 0, 2, "\t"]))
def test_an_object_reads_as_json_loads_reads_it(data: dict[str, Any], indent: Any) -> None:
    raw = json.dumps(data, indent=indent).encode()
    assert loads_object(raw) == json.loads(raw)
    assert dumps_object(data) == json.dumps(data)


@settings(max_examples=400)
@given(
    raw=st.binary(max_size=40)
    | st.text(alphabet='{}[]",: \n\t0a"\\e-', max_size=40).map(str.encode)
)
def test_anything_else_fails_or_reads_as_json_loads_does(raw: bytes) -> None:
    assert outcome(loads_object, raw) == outcome(json.loads, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "a": [1, 2]}',  # the last of repeated keys wins
        b' \r\n{ "accounts" : [ {"x": 1} , [2] ] , "dry_run" : true } \n',
        b'{"accounts": []}',
        b"{}",
        b"\xef\xbb\xbf" + b'{"bom": 1}',
        '{"utf16": [1]}'.encode("utf-16"),
        b'{"accounts": [1,]}',
        b'{"accounts": [1] "x": 2}',
        b'{"a": 1,}',
        b'{"a" 1}',
        b"{1: 2}",
        b'{"a": 1} x',
        b'{"a": [1, 2}',
        b"[" * 100 + b"]" * 100,
    ],
)
def test_edge_cases_match_json_loads(raw: bytes) -> None:
    assert outcome(loads_object, raw) == outcome(json.loads, raw)


def test_the_collector_pause_nests_and_restores_what_it_found() -> None:
    pause = CollectorPause()
    assert gc.isenabled()
    with pause():
        assert not gc.isenabled()
        with pause():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer bulk request still runs
    assert gc.isenabled()
    gc.disable()
    try:
        with pause():
            pass
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()
