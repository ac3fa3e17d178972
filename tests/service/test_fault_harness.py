"""The fault harness in its short form (kill -9s, restarts, a join and a leave), against the session broker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SCRIPT = REPO_ROOT / "benchmarks" / "fault_harness.py"
# The short form took 134 s on 2 cores. An exactly-once run can wait up to 90 s more, because the broker aborts
# the open transaction of a member that never came back only after the transaction timeout.
TIMEOUT_S = 480


@pytest.fixture(scope="module")
def report(kafka_broker, tmp_path_factory):
    bootstrap = kafka_broker.start(timeout_s=120)
    work_dir = tmp_path_factory.mktemp("fault-harness")
    results = work_dir / "fault_harness.json"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--short", "--guarantee", "both", "--seed", "1",
                                "--bootstrap-servers", bootstrap, "--output", str(results),
                                "--work-dir", str(work_dir / "logs")],
                               capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO_ROOT)
    output = completed.stdout[-6000:] + completed.stderr[-6000:]
    assert results.exists(), output
    return {"runs": {run["guarantee"]: run for run in json.loads(results.read_text())["runs"]},
            "returncode": completed.returncode, "output": output}


def test_harness_exit_code(report):
    assert report["returncode"] == 0, report["output"]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_harness_chaos_ran(report, guarantee):
    run = report["runs"][guarantee]
    assert run["kills"] >= 10
    assert run["restarts"] == run["kills"]
    assert run["joins"] >= 1
    assert run["leaves"] >= 1
    assert run["entities"] >= 1000
    assert run["partitions"] >= 4
    assert run["drained"]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_harness_no_lost_events(report, guarantee):
    run = report["runs"][guarantee]
    assert run["lost"] == 0
    assert run["unknown_sources"] == 0
    assert run["dead_letters"] == 0


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_harness_outputs_equal_replay(report, guarantee):
    run = report["runs"][guarantee]
    assert run["step_mismatches"] == 0
    assert run["max_prediction_difference"] <= 1e-6


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_harness_state_equals_replay(report, guarantee):
    run = report["runs"][guarantee]
    assert run["state_mismatches"] == 0, run["first_mismatches"]
    assert run["missing_entities"] == 0
    assert run["max_state_difference"] <= 1e-6


def test_harness_exactly_once_no_duplicates(report):
    run = report["runs"]["exactly-once"]
    assert run["duplicates"] == 0
    assert run["open_transaction_wait_s"] is not None


def test_harness_at_least_once_duplicates_identical(report):
    run = report["runs"]["at-least-once"]
    assert run["nonidentical_duplicates"] == 0


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_harness_no_unexpected_exits(report, guarantee):
    run = report["runs"][guarantee]
    assert run["unexpected_exits"] == []
    assert all(item["met"] for item in run["requirements"].values()), run["requirements"]
