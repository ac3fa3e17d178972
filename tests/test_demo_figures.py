"""The demo's printed figures: accuracy by semantics and the Kafka service summary."""

from __future__ import annotations

import pytest

from streamer.demo import _print_service_figures, format_accuracy_by_step

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


def _output(step: int, prediction: float, target: float | None) -> dict:
    return {"entity": "a", "step": step, "prediction": [prediction], "target": target}


def test_accuracy_split_at_window_length() -> None:
    window = [_output(1, 1.0, 2.0), _output(2, 1.0, 1.5), _output(3, 1.0, 1.1), _output(4, 1.0, None)]
    stateful = [_output(1, 1.0, 2.0), _output(2, 1.0, 1.5), _output(3, 1.0, 1.3), _output(4, 1.0, None)]

    text = format_accuracy_by_step({"window": window, "stateful": stateful}, seq_len=3)

    assert "windows of 3 events" in text
    assert "window   all 0.5333 (3), steps 1-2 0.7500 (2), steps 3+ 0.1000 (1)" in text
    assert "stateful all 0.6000 (3), steps 1-2 0.7500 (2), steps 3+ 0.3000 (1)" in text
    assert "same outputs up to step 3. From step 4 on" in text


def test_accuracy_without_targets_is_not_available() -> None:
    text = format_accuracy_by_step({"window": [_output(1, 1.0, None)]}, seq_len=2)

    assert "all n/a (0)" in text
