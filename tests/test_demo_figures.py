"""The Kafka part of the demo's printed summary."""

from __future__ import annotations

import pytest

from streamer.demo import _print_service_figures

METRICS = """\
# TYPE streamer_end_to_end_latency_seconds histogram
streamer_end_to_end_latency_seconds_bucket{le="0.01"} 50.0
streamer_end_to_end_latency_seconds_bucket{le="0.1"} 90.0
streamer_end_to_end_latency_seconds_bucket{le="0.2"} 100.0
streamer_end_to_end_latency_seconds_bucket{le="+Inf"} 100.0
streamer_end_to_end_latency_seconds_count 100.0
streamer_end_to_end_latency_seconds_sum 3.0
"""


def test_summary_names_burst_and_percentiles(capsys: pytest.CaptureFixture[str]) -> None:
    _print_service_figures([{}] * 100, 100, 0.5, METRICS)

    printed = capsys.readouterr().out
    assert "outputs 100/100 in 0.50 s (200 events/s" in printed
    assert "p50 10.0 ms" in printed
    assert "p99 190.0 ms" in printed
    assert "all 100 events are sent at once" in printed

