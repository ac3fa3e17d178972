"""The end-to-end Kafka benchmark in quick mode, against the session broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SCRIPT = REPO_ROOT / "benchmarks" / "kafka_end_to_end.py"


def test_quick_benchmark_one_output_per_event(kafka_bootstrap, tmp_path):
    results = tmp_path / "kafka_end_to_end.json"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--loads", "1000,5000",
                                "--load-seconds", "3", "--bootstrap-servers", kafka_bootstrap,
                                "--output", str(results)],
                               capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)

    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    report = json.loads(results.read_text())
    throughput = report["throughput"]
    assert throughput["events"] == 50_000
    assert throughput["outputs"] == throughput["events"]
    assert throughput["distinct_sources"] == throughput["events"]
    assert throughput["dead_letters"] == 0
    assert throughput["events_per_s"] > 0
    assert report["problems"] == []
    # Outputs of the unmeasured pre-warming load stay out of every measured load's counts below.
    assert report["prewarm_seconds"] == 2.0
    loads = report["latency"][0]["loads"]
    assert [row["offered_events_per_s"] for row in loads] == [1000, 5000]
    for row in loads:
        assert row["kafka_timestamps"]["outputs"] == row["sent"]
        assert row["kafka_timestamps"]["distinct_sources"] == row["sent"]
        # The histogram window starts when the warm-up ends, within a few events of the measured ones.
        assert abs(row["service_histogram"]["observations"] - row["kafka_timestamps"]["measured"]) <= 0.05 * row["sent"]
        assert 0 < row["kafka_timestamps"]["measured"] < row["sent"]
        assert row["kafka_timestamps"]["p50_ms"] >= 0
        assert_cpu_shares(row["cpu"], "service")
    floor = report["client_floor"]
    assert [row["offered_events_per_s"] for row in floor] == [1000, 5000]
    for row in floor:
        assert row["kafka_timestamps"]["outputs"] == row["sent"]
        assert row["kafka_timestamps"]["distinct_sources"] == row["sent"]
        assert row["kafka_timestamps"]["p99_ms"] >= row["kafka_timestamps"]["p50_ms"] >= 0
        assert_cpu_shares(row["cpu"], "passthrough")


def assert_cpu_shares(cpu: dict, process: str) -> None:
    # The broker belongs to the test session, so the benchmark has no broker process id to measure.
    assert set(cpu) == {f"{process}_core_percent", "driver_core_percent", "machine_busy_percent"}
    # Both processes did work in the window: consuming and producing, or pacing the load.
    assert 0 < cpu[f"{process}_core_percent"] <= 100 * os.cpu_count() + 5
    assert 0 < cpu["driver_core_percent"] <= 100 * os.cpu_count() + 5
    assert 0 < cpu["machine_busy_percent"] <= 100
