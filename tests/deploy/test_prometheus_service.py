"""A real Prometheus scrapes the real service (`streamer run`) while it serves events from a real broker.

Every expression of the dashboard, the recording rules and the alerts (without their threshold
comparisons) must return a number. The service runs with its changelog, and a second member joins halfway,
so partitions are revoked and restored while Prometheus scrapes. The service's ``/metrics`` output must also
pass ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
import uuid

import numpy as np
import orjson
import pytest
import torch

from streamer.model import SeedNet
from tests.deploy.prometheus_fixtures import PrometheusServer, require_binary
from tests.deploy.promql_expressions import Expression, rule_and_dashboard_expressions
from tests.service.service_helpers import ServiceProcess, create_topics, produce

pytestmark = pytest.mark.kafka

PARTITIONS = 4
ENTITIES = 50
VALID_PER_ROUND = 300
ROUNDS = 8
ROUND_INTERVAL_S = 0.5
INVALID_RECORDS = [
    (b"bad-json", b"{not json"),
    (b"short", b'{"features": [1.0, 2.0]}'),
    (None, b'{"features": [1.0, 2.0, 3.0, 4.0]}'),
]
BROKER_START_TIMEOUT_S = 120.0



@pytest.fixture
def model_path(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "net.pt"
    torch.save(SeedNet(4, 16, 5, 1, 2).eval().state_dict(), path)
    return path


def wait_for_total(first, second, name: str, expected: float, timeout_s: float = 60.0) -> float:
    """Wait until the sum of ``name`` over both members reaches ``expected``; return the sum."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = first.metric(name) + _metric_or_zero(second, name)
        if total >= expected or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def _metric_or_zero(service, name: str) -> float:
    """``name`` of a member that may still be starting (its metrics port not open yet)."""
    if service is None:
        return 0.0
    try:
        return service.metric(name)
    except OSError:
        return 0.0


def make_round(round_index: int) -> list[tuple[bytes | None, bytes]]:
    """Return ``VALID_PER_ROUND`` valid keyed events followed by one record of each invalid kind."""
    rng = np.random.default_rng(round_index)
    features = rng.normal(size=(VALID_PER_ROUND, 4)).round(4).tolist()
    valid = [(f"e{index % ENTITIES}".encode(), orjson.dumps({"features": row})) for index, row in enumerate(features)]
    return valid + INVALID_RECORDS


def query_numbers(prometheus: PrometheusServer, expr: str) -> list[float]:
    """Return the values of an instant query, NaN values dropped."""
    values = [float(series["value"][1]) for series in prometheus.query(expr)]
    return [value for value in values if not math.isnan(value)]


def assert_expressions_return_numbers(prometheus: PrometheusServer, expressions: list[Expression],
                                      timeout: float = 90.0) -> None:
    """Query every expression until each returns a series whose value is not NaN, or fail listing the rest."""
    pending = {expression.expr: expression.source for expression in expressions}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            if query_numbers(prometheus, expr):
                del pending[expr]
        time.sleep(1.0)
    missing = [f"- {source}: {expr}" for expr, source in pending.items()]
    assert not missing, f"{len(missing)} expressions returned no number within {timeout:.0f} s:\n" + "\n".join(missing)


def wait_for_metric(service: ServiceProcess, name: str, minimum: float, timeout_s: float = 60.0) -> float:
    """Poll the service's /metrics until the sum of ``name`` reaches ``minimum`` and return that sum."""
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(f"service exited with {service.process.returncode}:\n{service.log()}")
        try:
            value = service.metric(name)
        except OSError:
            value = 0.0  # the metrics server is not listening yet
        if value >= minimum:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name} is {value} after {timeout_s:.0f} s, expected >= {minimum}:\n{service.log()}")


def test_dashboard_and_rules_on_real_service(kafka_broker, kafka_bootstrap, prometheus_factory, model_path,
                                             tmp_path):
    suffix = uuid.uuid4().hex[:8]
    topics = {"input_topics": f"prom-in-{suffix}", "output_topic": f"prom-out-{suffix}",
              "dead_letter_topic": f"prom-dlq-{suffix}", "group_id": f"prom-group-{suffix}"}
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: PARTITIONS}))

    # The service starts while the broker is stopped, so its topic creation is retried and
    # streamer_broker_retries_total counts. Prometheus scrapes it before the broker is back, so the
    # restores of the first assignment happen inside the scraped range and the restore panels have data.
    # A broker left stopped by a failure here is started again by the next test's kafka_bootstrap fixture.
    kafka_broker.stop()
    settings = dict(model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS,
                    request_timeout_ms=3000, changelog="true", **topics)
    service = ServiceProcess(tmp_path, **settings)
    joiner = None
    try:
        try:
            wait_for_metric(service, "streamer_broker_retries_total", 1)
            prometheus = prometheus_factory([f"127.0.0.1:{service.metrics_port}"])
            prometheus.wait_for_targets_up()
        finally:
            kafka_broker.start(timeout_s=BROKER_START_TIMEOUT_S)
        service.wait_ready()

        for round_index in range(ROUNDS):
            if round_index == ROUNDS // 2:
                joiner = ServiceProcess(tmp_path, **settings)  # a rebalance: moved partitions are restored
            asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_round(round_index)))
            time.sleep(ROUND_INTERVAL_S)
        produced = wait_for_total(service, joiner, "streamer_events_produced_total", ROUNDS * VALID_PER_ROUND)
        dead_lettered = wait_for_total(service, joiner, "streamer_events_dead_lettered_total",
                                       ROUNDS * len(INVALID_RECORDS))
        joiner.wait_ready()
        restores = (service.metric("streamer_restore_duration_seconds_count")
                    + joiner.metric("streamer_restore_duration_seconds_count"))

        expressions = rule_and_dashboard_expressions()
        assert_expressions_return_numbers(prometheus, expressions)

        status, metrics_text = service.get("/metrics")
    finally:
        exit_code = service.stop()
        joiner_exit_code = joiner.stop() if joiner is not None else None

    assert exit_code == 0, service.log()
    assert joiner_exit_code == 0, joiner.log()
    assert restores >= PARTITIONS + 1  # the first assignment, then the joiner's partitions
    assert produced == ROUNDS * VALID_PER_ROUND
    assert dead_lettered == ROUNDS * len(INVALID_RECORDS)
    assert status == 200
    promtool = subprocess.run([require_binary("promtool"), "check", "metrics"], input=metrics_text,
                              capture_output=True, text=True, timeout=60)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
