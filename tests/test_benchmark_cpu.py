"""The CPU figures of benchmarks/kafka_end_to_end.py, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kafka_end_to_end import CpuMeter, format_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def test_busy_and_idle_process_shares() -> None:
    meter = CpuMeter({"driver": os.getpid()})

    before = meter.sample()
    spin(0.5)
    busy = meter.shares(before, meter.sample())
    before = meter.sample()
    time.sleep(0.5)
    idle = meter.shares(before, meter.sample())

    # A spinning process uses most of one core, less only when other busy processes share that core.
    assert busy["driver_core_percent"] > 40
    assert idle["driver_core_percent"] < 20
    assert 0 <= idle["machine_busy_percent"] <= 100
    assert 0 < busy["machine_busy_percent"] <= 100


def test_exited_processes_left_out() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    meter = CpuMeter({"service": child.pid, "broker": None, "driver": os.getpid()})

    before = meter.sample()
    spin(0.05)
    shares = meter.shares(before, meter.sample())

    assert "service_core_percent" not in shares
    assert "broker_core_percent" not in shares
    assert "driver_core_percent" in shares


def test_format_marks_missing_figures() -> None:
    cpu = {"service_core_percent": 61.4, "driver_core_percent": 28.0, "machine_busy_percent": 87.2}

    assert format_cpu(cpu, "service") == "61/-/28 (87)"
    assert format_cpu(None, "passthrough") == "-/-/- (-)"
