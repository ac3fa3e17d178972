"""A real Prometheus scrapes a MetricsServer fed with synthetic activity.

Every expression of the dashboard, the recording rules and the alerts (without
their threshold comparisons) must return data from that Prometheus.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from streamer.metrics import MetricsServer, StreamerMetrics
from tests.deploy.prometheus_fixtures import assert_expressions_return_data
from tests.deploy.promql_expressions import rule_and_dashboard_expressions

TOPIC = "events"
PARTITIONS = 4
ACTIVITY_INTERVAL_S = 0.1


class SyntheticActivity:
    """Touch every metric of a StreamerMetrics from a background thread, as a busy service would."""

    def __init__(self, metrics: StreamerMetrics, seed: int = 7) -> None:
        self.metrics = metrics
        self.random = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="synthetic-activity", daemon=True)

    def start(self) -> None:
        self.metrics.set_build_info("0.1.0", "sha256:synthetic", "stateful", "service")
        self.metrics.assigned_partitions.set(PARTITIONS)
        self.metrics.rebalances.inc()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self.stopped.wait(ACTIVITY_INTERVAL_S):
            self.step()

    def step(self) -> None:
        metrics = self.metrics
        events = self.random.randint(50, 500)
        metrics.mark_poll()
        metrics.events_consumed.labels(topic=TOPIC).inc(events)
        metrics.events_produced.labels(topic="predictions").inc(events - 2)
        metrics.events_dead_lettered.labels(reason=self.random.choice(["invalid_json", "missing_entity"])).inc()
        metrics.events_duplicate.inc()
        metrics.batch_events.observe(events)
        metrics.batch_duration_seconds.observe(self.random.uniform(0.001, 0.05))
        metrics.inference_duration_seconds.observe(self.random.uniform(0.0001, 0.02))
        metrics.observe_latencies(self.rng.lognormal(-4.0, 1.0, events - 2))
        metrics.state_entities.set(self.random.randint(10_000, 20_000))
        metrics.state_evictions.inc(self.random.randint(0, 3))
        metrics.state_expirations.inc(self.random.randint(0, 3))
        for partition in range(PARTITIONS):
            metrics.set_consumer_lag(TOPIC, partition, self.random.randint(0, 1000))
        metrics.commits.inc()
        metrics.commit_failures.inc(self.random.random() < 0.1)
        metrics.checkpoints.inc()
        metrics.checkpoint_failures.inc(self.random.random() < 0.1)
        metrics.checkpoint_duration_seconds.observe(self.random.uniform(0.005, 0.2))
        metrics.changelog_records.inc(events)
        metrics.restore_partitions_in_progress.set(self.random.randint(0, 1))
        metrics.restored_records.inc(self.random.randint(0, 100))
        metrics.restore_duration_seconds.observe(self.random.uniform(0.05, 5.0))
        metrics.broker_retries.labels(operation=self.random.choice(["fetch", "commit", "produce"])).inc()


@pytest.fixture
def busy_metrics_server():
    metrics = StreamerMetrics()
    activity = SyntheticActivity(metrics)
    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    server.start()
    activity.start()
    yield server
    activity.stop()
    server.stop()


def test_expressions_return_data(prometheus_factory, busy_metrics_server):
    prometheus = prometheus_factory([f"127.0.0.1:{busy_metrics_server.port}"])
    prometheus.wait_for_targets_up()

    assert_expressions_return_data(prometheus, rule_and_dashboard_expressions())


def test_partitions_and_missing_series(prometheus_factory, busy_metrics_server):
    prometheus = prometheus_factory([f"127.0.0.1:{busy_metrics_server.port}"])
    prometheus.wait_for_targets_up()
    assert_expressions_return_data(prometheus, ["job_topic_partition:streamer_consumer_lag_records:max"])

    series = prometheus.query("job_topic_partition:streamer_consumer_lag_records:max")
    partitions = sorted(s["metric"]["partition"] for s in series)

    assert partitions == [str(p) for p in range(PARTITIONS)]
    assert {s["metric"]["mode"] for s in series} == {"service"}
    assert {s["metric"]["job"] for s in series} == {"streamer"}

    # A series that no scrape returns is reported by name, and only that one.
    with pytest.raises(AssertionError, match="streamer_not_a_metric_total") as failure:
        assert_expressions_return_data(
            prometheus, ["streamer_state_entities", "rate(streamer_not_a_metric_total[1m])"], timeout=2
        )
    assert "1 expressions returned no data" in str(failure.value)
    assert "streamer_state_entities" not in str(failure.value)
