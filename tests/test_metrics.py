"""Tests of streamer.metrics: metric names, types and labels, the HTTP endpoints, and promtool's linter."""

from __future__ import annotations

import gzip
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import streamer.kafka.service
from streamer.errors import INVALID_EVENT_REASONS
from streamer.metrics import (BROKER_OPERATIONS, END_TO_END_LATENCY_BUCKETS, RESTORE_ANOMALY_KINDS, MetricsServer,
                              StreamerMetrics)

# Exposed family name (counters without "_total"), type, label names.
EXPECTED_METRICS = {
    "streamer_events_consumed": ("counter", {"topic"}),
    "streamer_events_produced": ("counter", {"topic"}),
    "streamer_events_dead_lettered": ("counter", {"reason"}),
    "streamer_events_duplicate": ("counter", set()),
    "streamer_batch_events": ("histogram", set()),
    "streamer_batch_duration_seconds": ("histogram", set()),
    "streamer_inference_duration_seconds": ("histogram", set()),
    "streamer_gc_pause_seconds": ("histogram", set()),
    "streamer_end_to_end_latency_seconds": ("histogram", set()),
    "streamer_state_entities": ("gauge", set()),
    "streamer_state_evictions": ("counter", set()),
    "streamer_state_expirations": ("counter", set()),
    "streamer_consumer_lag_records": ("gauge", {"topic", "partition"}),
    "streamer_assigned_partitions": ("gauge", set()),
    "streamer_rebalances": ("counter", set()),
    "streamer_commits": ("counter", set()),
    "streamer_commit_failures": ("counter", set()),
    "streamer_checkpoints": ("counter", set()),
    "streamer_checkpoint_failures": ("counter", set()),
    "streamer_checkpoint_duration_seconds": ("histogram", set()),
    "streamer_changelog_records": ("counter", set()),
    "streamer_restore_partitions_in_progress": ("gauge", set()),
    "streamer_restored_records": ("counter", set()),
    "streamer_restore_duration_seconds": ("histogram", set()),
    "streamer_restore_anomalies": ("counter", {"kind"}),
    "streamer_resets": ("counter", set()),
    "streamer_broker_retries": ("counter", {"operation"}),
    "streamer_last_poll_timestamp_seconds": ("gauge", set()),
    "streamer_build_info": ("gauge", {"version", "model_fingerprint", "semantics", "mode"}),
}

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exercise_all(metrics: StreamerMetrics) -> None:
    """Touch every metric once, so that labelled metrics have a series too."""
    metrics.events_consumed.labels(topic="events").inc(10)
    metrics.events_produced.labels(topic="outputs").inc(8)
    metrics.events_dead_lettered.labels(reason="invalid_json").inc()
    metrics.events_duplicate.inc()
    metrics.batch_events.observe(10)
    metrics.batch_duration_seconds.observe(0.004)
    metrics.inference_duration_seconds.observe(0.0008)
    metrics.gc_pause_seconds.observe(0.002)
    metrics.observe_latencies(np.array([0.003, 0.02, 0.4]))
    metrics.state_entities.set(1234)
    metrics.state_evictions.inc()
    metrics.state_expirations.inc(2)
    metrics.set_consumer_lag("events", 0, 17)
    metrics.set_consumer_lag("events", 1, 0)
    metrics.assigned_partitions.set(2)
    metrics.rebalances.inc()
    metrics.commits.inc()
    metrics.commit_failures.inc()
    metrics.checkpoints.inc()
    metrics.checkpoint_failures.inc()
    metrics.checkpoint_duration_seconds.observe(0.05)
    metrics.changelog_records.inc(5)
    metrics.restore_partitions_in_progress.set(1)
    metrics.restored_records.inc(100)
    metrics.restore_duration_seconds.observe(1.5)
    metrics.broker_retries.labels(operation="commit").inc()
    metrics.mark_poll()
    metrics.set_build_info("0.1.0", "sha256:0123abcd", "stateful", "service")


def families_by_name(registry: CollectorRegistry) -> dict:
    text = generate_latest(registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


@pytest.fixture
def metrics() -> StreamerMetrics:
    return StreamerMetrics()


@pytest.fixture
def server_factory():
    servers: list[MetricsServer] = []

    def start(*args, **kwargs) -> MetricsServer:
        kwargs.setdefault("port", 0)
        server = MetricsServer(*args, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_every_metric_exposed_with_type(metrics):
    exercise_all(metrics)
    families = families_by_name(metrics.registry)

    for name, (expected_type, _) in EXPECTED_METRICS.items():
        assert name in families, f"{name} missing from the exposition"
        assert families[name].type == expected_type, f"{name} has type {families[name].type}"


def test_metric_labels(metrics):
    exercise_all(metrics)
    families = families_by_name(metrics.registry)

    for name, (_, expected_labels) in EXPECTED_METRICS.items():
        for sample in families[name].samples:
            labels = set(sample.labels) - {"le"}
            assert labels == expected_labels, f"{sample.name} has labels {sorted(labels)}"


def test_unexercised_metrics_described(metrics):
    # Metrics labelled by topic or partition have no series before their first use, but every name is registered.
    families = {family.name: family.type for family in metrics.registry.collect()}

    for name, (metric_type, _) in EXPECTED_METRICS.items():
        assert families.get(name) == metric_type, f"{name} is not registered as a {metric_type}"


@pytest.mark.parametrize("family, label, values", [
    ("streamer_events_dead_lettered", "reason", INVALID_EVENT_REASONS),
    ("streamer_broker_retries", "operation", BROKER_OPERATIONS),
    ("streamer_restore_anomalies", "kind", RESTORE_ANOMALY_KINDS),
])
def test_known_label_values_start_at_zero(metrics, family, label, values):
    samples = families_by_name(metrics.registry)[family].samples
    totals = {sample.labels[label]: sample.value for sample in samples if sample.name.endswith("_total")}

    assert totals == {value: 0.0 for value in values}


def test_retried_operations_are_known():
    # Every operation name the service passes to retry() has a series from the start.
    source = (Path(streamer.kafka.service.__file__)).read_text()
    operations = set(re.findall(r'retry\("([^"]+)"', source))

    assert operations
    assert operations <= set(BROKER_OPERATIONS)


def test_counter_names_end_in_total(metrics):
    text = generate_latest(metrics.registry).decode("utf-8")
    for line in text.splitlines():
        if line.startswith("# TYPE streamer_") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line


def test_default_registry_has_process_collector():
    families = families_by_name(StreamerMetrics().registry)

    assert "process_cpu_seconds" in families
    assert "python_info" in families


def test_given_registry_gets_only_streamer_metrics():
    registry = CollectorRegistry()
    StreamerMetrics(registry)
    families = families_by_name(registry)

    assert "process_cpu_seconds" not in families
    assert "streamer_state_entities" in families


def test_second_instance_on_registry_raises():
    registry = CollectorRegistry()
    StreamerMetrics(registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        StreamerMetrics(registry)


def test_bucket_boundaries(metrics):
    families = families_by_name(metrics.registry)

    def bounds(name: str) -> list[str]:
        return [s.labels["le"] for s in families[name].samples if s.name == name + "_bucket"]

    assert bounds("streamer_batch_events")[0] == "1.0"
    assert bounds("streamer_batch_events")[-2] == "65536.0"
    assert bounds("streamer_inference_duration_seconds")[0] == "5e-05"
    assert bounds("streamer_inference_duration_seconds")[-2] == "5.0"
    assert bounds("streamer_restore_duration_seconds")[0] == "0.01"
    assert bounds("streamer_restore_duration_seconds")[-2] == "300.0"
    latency = [float(b) for b in bounds("streamer_end_to_end_latency_seconds")]
    assert latency == [*END_TO_END_LATENCY_BUCKETS, float("inf")]


def test_observe_latencies_matches_histogram(metrics):
    values = np.array([0.0005, 0.0006, 0.001, 0.0011, 0.5, 29.0, 31.0, 0.0])
    metrics.observe_latencies(values)
    metrics.end_to_end_latency_seconds.observe(0.002)
    get = metrics.registry.get_sample_value
    name = "streamer_end_to_end_latency_seconds"

    # A value equal to a bound belongs to that bound's bucket ("le").
    assert get(name + "_bucket", {"le": "0.0005"}) == 2
    assert get(name + "_bucket", {"le": "0.001"}) == 4
    assert get(name + "_bucket", {"le": "0.002"}) == 6
    assert get(name + "_bucket", {"le": "30.0"}) == 8
    assert get(name + "_bucket", {"le": "+Inf"}) == 9
    assert get(name + "_count") == 9
    assert get(name + "_sum") == pytest.approx(values.sum() + 0.002)


def test_observe_latencies_negative_and_nan(metrics):
    metrics.observe_latencies([-0.25, float("nan"), 0.1])
    get = metrics.registry.get_sample_value
    name = "streamer_end_to_end_latency_seconds"

    assert get(name + "_count") == 2
    assert get(name + "_bucket", {"le": "0.0005"}) == 1
    assert get(name + "_sum") == pytest.approx(0.1)


def test_observe_latencies_empty(metrics):
    metrics.observe_latencies(np.array([], dtype=np.float64))

    assert metrics.registry.get_sample_value("streamer_end_to_end_latency_seconds_count") == 0


def test_observe_latencies_concurrent(metrics):
    def record() -> None:
        for _ in range(200):
            metrics.observe_latencies(np.full(50, 0.01))

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert metrics.registry.get_sample_value("streamer_end_to_end_latency_seconds_count") == 4 * 200 * 50


def test_set_build_info_replaces_series(metrics):
    metrics.set_build_info("0.1.0", "fp-a", "stateful", "service")
    metrics.set_build_info("0.1.1", "fp-b", "window", "replay")
    samples = families_by_name(metrics.registry)["streamer_build_info"].samples

    assert len(samples) == 1
    assert samples[0].labels == {
        "version": "0.1.1",
        "model_fingerprint": "fp-b",
        "semantics": "window",
        "mode": "replay",
    }
    assert samples[0].value == 1


@pytest.mark.parametrize(
    ("semantics", "mode", "message"),
    [("stateless", "service", "invalid semantics"), ("stateful", "batch", "invalid mode")],
)
def test_set_build_info_rejects_invalid(metrics, semantics, mode, message):
    with pytest.raises(ValueError, match=message):
        metrics.set_build_info("0.1.0", "fp", semantics, mode)


def test_remove_partition_drops_lag_series(metrics):
    metrics.set_consumer_lag("events", 0, 5)
    metrics.set_consumer_lag("events", 1, 7)
    metrics.remove_partition("events", 0)
    metrics.remove_partition("events", 9)  # never assigned: no error
    get = metrics.registry.get_sample_value

    assert get("streamer_consumer_lag_records", {"topic": "events", "partition": "0"}) is None
    assert get("streamer_consumer_lag_records", {"topic": "events", "partition": "1"}) == 7


def test_mark_poll_sets_timestamp(metrics):
    metrics.mark_poll(1_700_000_000.5)

    assert metrics.registry.get_sample_value("streamer_last_poll_timestamp_seconds") == 1_700_000_000.5


def test_server_metrics_endpoint(metrics, server_factory):
    exercise_all(metrics)
    server = server_factory(metrics)
    status, body, headers = http_get(server.url + "/metrics")

    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"streamer_events_consumed_total{topic=\"events\"} 10.0" in body


def test_server_accepts_registry(server_factory):
    registry = CollectorRegistry()
    StreamerMetrics(registry)
    server = server_factory(registry)
    status, body, _ = http_get(server.url + "/metrics")

    assert status == 200
    assert b"streamer_state_entities 0.0" in body


def test_server_rejects_other_argument():
    with pytest.raises(TypeError, match="StreamerMetrics or a CollectorRegistry"):
        MetricsServer(object(), port=0)


def test_server_gzip(metrics, server_factory):
    server = server_factory(metrics)
    status, body, headers = http_get(server.url + "/metrics", {"Accept-Encoding": "gzip"})

    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert b"streamer_state_entities" in gzip.decompress(body)


def test_server_openmetrics(metrics, server_factory):
    server = server_factory(metrics)
    status, body, headers = http_get(server.url + "/metrics", {"Accept": "application/openmetrics-text"})

    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_server_port_zero_picks_port(metrics, server_factory):
    server = server_factory(metrics, port=0)

    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_server_fixed_port(metrics, server_factory):
    port = free_port()
    server = server_factory(metrics, port=port)
    status, _, _ = http_get(f"http://127.0.0.1:{port}/healthz")

    assert server.port == port
    assert status == 200


def test_server_port_in_use_raises(metrics, server_factory):
    server = server_factory(metrics)
    second = MetricsServer(metrics, port=server.port)

    with pytest.raises(OSError, match="cannot bind the metrics server"):
        second.start()


def test_server_start_twice_raises(metrics, server_factory):
    server = server_factory(metrics)

    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_health_without_checks(metrics, server_factory):
    server = server_factory(metrics)

    assert http_get(server.url + "/healthz")[:2] == (200, b"ok\n")
    assert http_get(server.url + "/readyz")[:2] == (200, b"ok\n")


def test_health_switches_with_checks(metrics, server_factory):
    live = {"value": (True, "")}
    ready = {"value": (False, "restoring 2 partitions")}
    server = server_factory(metrics, liveness=lambda: live["value"], readiness=lambda: ready["value"])

    assert http_get(server.url + "/healthz")[:2] == (200, b"ok\n")
    assert http_get(server.url + "/readyz")[:2] == (503, b"restoring 2 partitions\n")

    ready["value"] = (True, "")
    live["value"] = (False, "event loop blocked for 42.0 s")

    assert http_get(server.url + "/readyz")[:2] == (200, b"ok\n")
    assert http_get(server.url + "/healthz")[:2] == (503, b"event loop blocked for 42.0 s\n")


def test_health_check_raising_returns_503(metrics, server_factory):
    def broken() -> tuple[bool, str]:
        raise RuntimeError("consumer closed")

    server = server_factory(metrics, liveness=broken)
    status, body, _ = http_get(server.url + "/healthz")

    assert status == 503
    assert body == b"liveness check raised RuntimeError: consumer closed\n"


def test_unknown_path_returns_404(metrics, server_factory):
    server = server_factory(metrics)

    assert http_get(server.url + "/")[0] == 404
    assert http_get(server.url + "/metrics/extra")[0] == 404
    assert http_get(server.url + "/healthz?verbose=1")[0] == 200


def test_stop_closes_port(metrics):
    server = MetricsServer(metrics, port=0)
    server.start()
    url = server.url
    server.stop()
    server.stop()  # second stop does nothing

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)


def test_server_context_manager(metrics):
    with MetricsServer(metrics, port=0) as server:
        assert http_get(server.url + "/healthz")[0] == 200


def test_promtool_check_metrics(metrics, server_factory):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `bash scripts/install-prometheus.sh` first")
    exercise_all(metrics)
    server = server_factory(metrics)
    status, body, _ = http_get(server.url + "/metrics")

    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)

    assert status == 200
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_ready_body_gives_the_detail(metrics, server_factory):
    server = server_factory(metrics, readiness=lambda: (True, "ready: no partitions assigned, standing by"))

    assert http_get(server.url + "/readyz")[:2] == (200, b"ready: no partitions assigned, standing by\n")
