"""schemathesis against the daemon's own OpenAPI document (``/v1/openapi.json``).

Every operation of the document, with data that fits the schema and data that
does not (schemathesis' positive and negative generation), against the daemon
as a subprocess: no 5xx, answers that match the document, and no row changed
by a request the daemon refused. Skipped when schemathesis is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, SimulatorProcess
from tests.faults.test_fuzz import FuzzEnv, connect, fingerprint

schemathesis = pytest.importorskip("schemathesis")
_checks = pytest.importorskip("schemathesis.specs.openapi.checks")
# Left out: where the document is laxer or stricter than the API's own checks (see
# docs/reliability.md), the API answers 400 to schema-valid data or 200 to a null it
# reads as absent. Both are safe; the document's precision is checked elsewhere.
LEFT_OUT = [_checks.positive_data_acceptance, _checks.negative_data_rejection]

EXAMPLES = 12


@pytest.fixture(scope="module")
def schema_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    daemon = DaemonProcess(tmp_path_factory.mktemp("schema"), sim)
    try:
        daemon.start()
        for number in range(3):
            daemon.import_grant(f"acct-{number}", sim.grant(), overdue=False)
        used = connect(daemon, "web-0")
        yield FuzzEnv(sim, daemon, used, used, used)
        assert daemon.alive, "the daemon died during the schema run"
        assert daemon.terminate() == 0
        crashes = [e for e in daemon.events() if e.get("event") == "api.request_failed"]
        assert not crashes, crashes
    finally:
        daemon.close()
        sim.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_operations(schema_env: FuzzEnv, mode: str, report: Report) -> None:
    """Each operation as a hypothesis strategy (schemathesis' pytest plugin is not used)."""
    daemon = schema_env.daemon
    loaded = schemathesis.openapi.from_url(f"{daemon.api_url}/v1/openapi.json")
    strategies = [
        result.ok().as_strategy(generation_mode=schemathesis.GenerationMode(mode))
        for result in loaded.get_all_operations()
    ]
    assert len(strategies) >= 10

    @settings(
        max_examples=EXAMPLES * len(strategies),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        check_case(schema_env, case, f"schemathesis-{mode}")

    run()
    schema_env.write(f"schemathesis-{mode}", report)


def check_case(schema_env: FuzzEnv, case: Any, run: str) -> None:
    daemon = schema_env.daemon
    before = fingerprint(schema_env)
    headers = {"Authorization": f"Bearer {daemon.api_key}"}
    response = case.call(base_url=daemon.api_url, headers=headers, timeout=30)
    schema_env.answered(run, response.status_code)
    assert response.status_code < 500, (response.status_code, response.text, case)
    try:
        case.validate_response(response, headers=headers, excluded_checks=LEFT_OUT)
    except Exception:  # counted as a fault of this run, then reported by hypothesis
        schema_env.faults[run] += 1
        raise
    account_id = (case.path_parameters or {}).get("account_id")
    if response.status_code < 300:
        if isinstance(account_id, str):
            schema_env.dirty.add(account_id)
        if case.path in ("/v1/import", "/v1/keys/rotate"):
            schema_env.dirty.update(("acct-0", "acct-1", "acct-2", "web-0"))
        return
    schema_env.unchanged(run, before, f"{response.status_code} but a row changed: {case}")
