"""The Kafka service against a real broker: equality with the file backtest, dead letters, shutdown, restarts."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid

import numpy as np
import orjson
import pytest
import torch
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from streamer.backtest.file_replay import run_file_backtest
from streamer.config import Settings
from streamer.io.files import read_outputs
from streamer.io.outputs import HEADER_REASON, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC
from streamer.kafka.console_tools import console_consume, console_produce, tool_command
from streamer.kafka.jars import DEFAULT_KAFKA_VERSION
from streamer.kafka.service import StreamerService
from streamer.model import SeedNet, load_model
from tests.conftest import CASES_DIR
from tests.service.service_helpers import ServiceProcess, committed_offsets, create_topics, produce, read_topic

pytestmark = pytest.mark.kafka


@pytest.fixture
def bad_input_case(tmp_path):
    """The mixed valid/invalid stream with the outcome each line must get."""
    out = tmp_path / "case"
    subprocess.run([sys.executable, str(CASES_DIR / "make_bad_input_case.py"), str(out)], check=True)
    lines = (out / "events.jsonl").read_bytes().split(b"\n")
    expected = json.loads((out / "expected.json").read_text())
    return out, lines, expected


def names(prefix: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"input_topics": f"{prefix}-in-{suffix}", "output_topic": f"{prefix}-out-{suffix}",
            "dead_letter_topic": f"{prefix}-dlq-{suffix}", "group_id": f"{prefix}-group-{suffix}"}


def test_service_equals_file_backtest_and_dead_letters(kafka_bootstrap, bad_input_case, tmp_path):
    case_dir, lines, expected = bad_input_case
    topics = names("case")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    records = [(index, line) for index, line in enumerate(lines) if line]
    asyncio.run(produce(kafka_bootstrap, topics["input_topics"], [(None, line) for _, line in records]))
    offset_of_line = {index: offset for offset, (index, _) in enumerate(records)}

    service = ServiceProcess(tmp_path, model=case_dir / "net.pt", bootstrap_servers=kafka_bootstrap,
                             topic_partitions=1, **topics)
    try:
        service.wait_ready()
        n_outputs = sum(entry["outcome"] == "output" for entry in expected)
        n_dead = sum(entry["outcome"] == "dead-letter" for entry in expected)
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], n_outputs))
        dead = asyncio.run(read_topic(kafka_bootstrap, topics["dead_letter_topic"], n_dead))
    finally:
        assert service.stop() == 0, service.log()
    # The log names each reason's first dead letter and where it came from, and counts the others.
    log = service.log_path.read_text(errors="replace")
    assert f"Dead letter (invalid_json) {topics['input_topics']}[0]@" in log
    logged = log.count("Dead letter (") + sum(int(count) for count in re.findall(r"(\d+) dead letters? \(", log))
    assert logged == n_dead
    assert "lstm with 4 inputs, hidden size 16, 2 layers, 1 output" in service.log()

    file_result = run_file_backtest(load_model(case_dir / "net.pt"), case_dir / "events.jsonl", tmp_path / "file.jsonl")
    file_outputs = read_outputs(tmp_path / "file.jsonl")
    assert file_result.outputs == n_outputs
    assert len(outputs) == n_outputs
    by_offset = {orjson.loads(record.value)["source"]["offset"]: orjson.loads(record.value) for record in outputs}
    for file_output in file_outputs:
        service_output = by_offset[offset_of_line[file_output["source"]["record"]]]
        assert service_output["entity"] == file_output["entity"]
        assert service_output["step"] == file_output["step"]
        assert np.abs(np.subtract(service_output["prediction"], file_output["prediction"])).max() < 1e-6
    for entry in expected:
        if entry["outcome"] == "output":
            got = by_offset[offset_of_line[entry["line"]]]
            assert np.abs(np.subtract(got["prediction"], entry["prediction"])).max() < 1e-5
            assert got["entity"] == entry["entity"]

    assert len(dead) == n_dead
    dead_lines = {entry["line"] for entry in expected if entry["outcome"] == "dead-letter"}
    for record in dead:
        headers = dict(record.headers)
        offset = int(headers[HEADER_SOURCE_OFFSET])
        line = next(index for index, candidate in offset_of_line.items() if candidate == offset)
        assert line in dead_lines
        assert record.value == lines[line]
        assert headers[HEADER_REASON]
        assert headers[HEADER_SOURCE_TOPIC].decode() == topics["input_topics"]
        assert headers[HEADER_SOURCE_PARTITION] == b"0"
    reasons = {dict(record.headers)[HEADER_REASON].decode() for record in dead}
    assert {"invalid_json", "record_too_large", "invalid_utf8", "non_finite_feature"} <= reasons


@pytest.fixture
def model_path(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "net.pt"
    torch.save(SeedNet(4, 16, 5, 1, 2).eval().state_dict(), path)
    return path


def make_events(n_events: int, n_entities: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(start)
    features = rng.normal(size=(n_events, 4)).round(4).tolist()
    return [(f"e{(start + i) % n_entities}".encode(), orjson.dumps({"features": features[i]}))
            for i in range(n_events)]


def test_console_tools_interoperate(kafka_bootstrap, model_path, tmp_path):
    topics = names("interop")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 2}))
    events = [(key.decode(), value.decode()) for key, value in make_events(40, 5)]
    console_produce(kafka_bootstrap, topics["input_topics"], [(k.encode(), v.encode()) for k, v in events])
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=2,
                             **topics)
    try:
        service.wait_ready()
        records = console_consume(kafka_bootstrap, topics["output_topic"], max_messages=40, timeout_s=60)
    finally:
        assert service.stop() == 0, service.log()
    assert len(records) == 40
    steps_by_entity: dict[str, list[int]] = {}
    for key, value in records:
        output = orjson.loads(value)
        assert key.decode() == output["entity"]
        steps_by_entity.setdefault(output["entity"], []).append(output["step"])
    assert {entity: sorted(steps) for entity, steps in steps_by_entity.items()} == {f"e{i}": list(range(1, 9))
                                                                                   for i in range(5)}


def test_entity_events_from_two_topics(kafka_bootstrap, model_path, tmp_path):
    topics = names("two-topics")
    second = topics["input_topics"] + "-b"
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1, second: 1}))
    events = make_events(40, 4)
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                             **{**topics, "input_topics": f"{topics['input_topics']},{second}"})
    try:
        service.wait_ready()
        # The first topic's offsets reach 29; then the second topic's start at 0 for the same entities.
        asyncio.run(produce(kafka_bootstrap, topics["input_topics"], events[:30]))
        assert len(asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 30))) == 30
        asyncio.run(produce(kafka_bootstrap, second, events[30:]))
        outputs = [orjson.loads(record.value)
                   for record in asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 40))]
    finally:
        assert service.stop() == 0, service.log()
    assert len(outputs) == 40
    steps_by_entity: dict[str, list[int]] = {}
    for output in outputs:
        steps_by_entity.setdefault(output["entity"], []).append(output["step"])
    assert {entity: sorted(steps) for entity, steps in steps_by_entity.items()} == {f"e{i}": list(range(1, 11))
                                                                                   for i in range(4)}


def test_member_without_partitions_is_ready(kafka_bootstrap, model_path, tmp_path):
    topics = names("standby")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    first = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                           **topics)
    second = None
    try:
        first.wait_ready()
        second = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                                **topics)
        second.wait_ready()
        deadline = time.monotonic() + 60
        assigned: list[float] = []
        while time.monotonic() < deadline:
            assigned = sorted(member.metric("streamer_assigned_partitions") for member in (first, second))
            if assigned == [0, 1]:
                break
            time.sleep(0.2)
        assert assigned == [0, 1]
        assert [member.get("/readyz")[0] for member in (first, second)] == [200, 200]
    finally:
        assert first.stop() == 0, first.log()
        if second is not None:
            assert second.stop() == 0, second.log()


def test_sigterm_commits_at_last_acknowledged_output_and_restart_resumes(kafka_bootstrap, model_path, tmp_path):
    topics = names("sigterm")
    total = 60_000
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 2}))
    asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(total, 500)))
    settings = dict(model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=2, max_batch_events=500,
                    **topics)
    first = ServiceProcess(tmp_path, **settings)
    first.wait_ready()
    deadline = time.monotonic() + 60
    while first.metric("streamer_events_produced_total") < 5000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.stop() == 0, first.log()
    outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], total, timeout_s=10))
    committed = asyncio.run(committed_offsets(kafka_bootstrap, topics["group_id"], topics["input_topics"], 2))
    assert 0 < len(outputs) < total, "the stop came after all events; raise the event count"
    for partition in range(2):
        offsets = sorted(orjson.loads(r.value)["source"]["offset"] for r in outputs
                         if orjson.loads(r.value)["source"]["partition"] == partition)
        assert offsets == list(range(len(offsets)))  # every event once, none skipped, none twice
        assert (committed[partition] or 0) == len(offsets)  # None: nothing committed yet
    log = first.log()
    assert "SIGTERM received; finishing the in-flight batch" in log
    committed_line = re.search(r"Final checkpoint done; committed offsets (.*)", log)
    assert committed_line is not None, log
    assert all(f"[{p}]@{committed[p]}" in committed_line.group(1) for p in range(2) if committed[p])
    assert f"Left consumer group {topics['group_id']}" in log

    second = ServiceProcess(tmp_path, **settings)
    try:
        second.wait_ready()
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], total, timeout_s=120))
    finally:
        assert second.stop() == 0, second.log()
    sources = [(orjson.loads(r.value)["source"]["partition"], orjson.loads(r.value)["source"]["offset"])
               for r in outputs]
    assert len(sources) == total
    assert len(set(sources)) == total  # the restart resumed exactly at the committed offsets


def test_broker_restart_while_running(kafka_broker, kafka_bootstrap, model_path, tmp_path):
    topics = names("restart")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 2}))
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=2,
                             request_timeout_ms=3000, **topics)
    try:
        service.wait_ready()
        asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(200, 20)))
        assert len(asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 200))) == 200
        reachable_before = service.metric("streamer_broker_reachable")
        kafka_broker.stop()
        deadline = time.monotonic() + 30
        while service.metric("streamer_broker_reachable") != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert service.metric("streamer_broker_reachable") == 0, service.log()
        assert service.process.poll() is None, service.log()
        assert service.get("/healthz")[0] == 200
        kafka_broker.start(timeout_s=120)
        asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(200, 20, start=200)))
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 400, timeout_s=120))
        deadline = time.monotonic() + 30
        while service.metric("streamer_broker_reachable") != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        reachable_again = service.metric("streamer_broker_reachable")
        log = service.log()
    finally:
        code = service.stop()
    assert code == 0, service.log()
    assert reachable_before == 1
    assert reachable_again == 1
    assert "did not respond to a metadata request" in log
    assert "responds again" in log
    sources = {(orjson.loads(r.value)["source"]["partition"], orjson.loads(r.value)["source"]["offset"])
               for r in outputs}
    assert len(sources) == 400


def test_session_timeout_reaches_consumer(kafka_bootstrap, tmp_path):
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    settings = Settings(model=tmp_path / "net.pt", bootstrap_servers=kafka_bootstrap, metrics_port=0,
                        session_timeout_ms=6000, **names("session"))

    async def scenario() -> tuple[int, int]:
        service = StreamerService(settings)
        task = asyncio.create_task(service.run())
        deadline = time.monotonic() + 30
        while service.consumer is None and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        consumer = service.consumer
        service.request_stop()
        await asyncio.wait_for(task, 30)
        assert consumer is not None, "the service created no consumer within 30 s"
        return consumer._session_timeout_ms, consumer._heartbeat_interval_ms

    session_ms, heartbeat_ms = asyncio.run(scenario())

    assert session_ms == 6000
    assert heartbeat_ms == 2000


def test_session_timeout_rejected_by_broker(kafka_bootstrap, tmp_path):
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    topics = names("short-session")
    command = [sys.executable, "-m", "streamer", "run", "--model", str(tmp_path / "net.pt"), "--bootstrap-servers",
               kafka_bootstrap, "--metrics-port", "0", "--session-timeout-ms", "1000",
               "--input-topics", topics["input_topics"], "--output-topic", topics["output_topic"],
               "--dead-letter-topic", topics["dead_letter_topic"], "--group-id", topics["group_id"]]

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2, result.stderr
    assert "error: Invalid session timeout 1000 ms (--session-timeout-ms)" in result.stderr


def serve_and_read(tmp_path, bootstrap: str, model_path, topics: dict[str, str], count: int, **settings) -> list:
    """Run a one-partition service until ``count`` outputs can be read (or 30 s pass); return them."""
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=bootstrap, topic_partitions=1,
                             **settings, **topics)
    try:
        service.wait_ready()
        return asyncio.run(read_topic(bootstrap, topics["output_topic"], count, timeout_s=30))
    finally:
        assert service.stop() == 0, service.log()


@pytest.mark.parametrize("compression", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_input_records(kafka_bootstrap, model_path, tmp_path, compression):
    topics = names(f"compressed-{compression}")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    events = make_events(30, 3)
    console_produce(kafka_bootstrap, topics["input_topics"], events, compression=compression)
    outputs = serve_and_read(tmp_path, kafka_bootstrap, model_path, topics, 30)
    assert len(outputs) == 30
    assert sorted(orjson.loads(record.value)["step"] for record in outputs) == sorted(list(range(1, 11)) * 3)


def test_outputs_compressed_as_configured(kafka_broker, kafka_bootstrap, model_path, tmp_path):
    topics = names("compressed-out")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(30, 3)))
    outputs = serve_and_read(tmp_path, kafka_bootstrap, model_path, topics, 30, compression_type="zstd")
    assert len(outputs) == 30
    segments = sorted((kafka_broker.log_dir / f"{topics['output_topic']}-0").glob("*.log"))
    dump = subprocess.run([*tool_command(DEFAULT_KAFKA_VERSION, "kafka.tools.DumpLogSegments"), "--files",
                           *map(str, segments)], capture_output=True, text=True, timeout=120, check=True).stdout
    codecs = set(re.findall(r"compresscodec: (\w+)", dump))
    assert codecs == {"zstd"}, dump[-2000:]


def test_latest_offset_reset_and_client_id(kafka_bootstrap, model_path, tmp_path):
    topics = names("latest")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(10, 5)))
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                             auto_offset_reset="latest", client_id="scorer-a", **topics)
    try:
        service.wait_ready()
        # The lag of a partition is exported once the consumer has looked up its position.
        deadline = time.monotonic() + 30
        while f'topic="{topics["input_topics"]}"' not in service.get("/metrics")[1]:
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.2)
        asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(5, 5, start=100)))
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 6, timeout_s=10))
        members = asyncio.run(group_members(kafka_bootstrap, topics["group_id"]))
    finally:
        assert service.stop() == 0, service.log()
    assert sorted(orjson.loads(record.value)["step"] for record in outputs) == [1] * 5
    assert [member["client_id"] for member in members] == ["scorer-a"]


async def group_members(bootstrap: str, group_id: str) -> list[dict]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = (await admin.describe_consumer_groups([group_id]))[0]
    finally:
        await admin.close()
    return response.to_object()["groups"][0]["members"]


def test_input_headers_reach_outputs_and_dead_letters(kafka_bootstrap, model_path, tmp_path):
    topics = names("headers")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    events = make_events(4, 2)
    records = [(key, value, [("traceparent", f"trace-{i}".encode()), ("empty", None)])
               for i, (key, value) in enumerate(events)]
    records.insert(2, (b"e0", b"{not json", [("traceparent", b"trace-bad")]))
    records.append((b"e1", events[0][1], []))  # a record without headers in the same batch
    asyncio.run(produce_with_headers(kafka_bootstrap, topics["input_topics"], records))
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                             **topics)
    try:
        service.wait_ready()
        outputs = asyncio.run(read_topic(kafka_bootstrap, topics["output_topic"], 5))
        letters = asyncio.run(read_topic(kafka_bootstrap, topics["dead_letter_topic"], 1))
    finally:
        assert service.stop() == 0, service.log()
    by_offset = {orjson.loads(record.value)["source"]["offset"]: list(record.headers) for record in outputs}
    assert by_offset == {0: [("traceparent", b"trace-0"), ("empty", None)],
                         1: [("traceparent", b"trace-1"), ("empty", None)],
                         3: [("traceparent", b"trace-2"), ("empty", None)],
                         4: [("traceparent", b"trace-3"), ("empty", None)],
                         5: []}
    headers = dict(letters[0].headers)
    assert headers["traceparent"] == b"trace-bad"
    assert headers[HEADER_REASON] == b"invalid_json"


async def produce_with_headers(bootstrap: str, topic: str, records: list) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value, headers=headers)
                   for key, value, headers in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_lag_follows_the_log_end_under_a_backlog(kafka_bootstrap, model_path, tmp_path):
    topics = names("lag")
    asyncio.run(create_topics(kafka_bootstrap, {topics["input_topics"]: 1}))
    asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(20_000, 50)))
    # One event per batch: the member works through a backlog that its first fetches buffered whole.
    service = ServiceProcess(tmp_path, model=model_path, bootstrap_servers=kafka_bootstrap, topic_partitions=1,
                             max_batch_events=1, **topics)
    try:
        service.wait_ready()
        deadline = time.monotonic() + 30
        while service.metric("streamer_events_consumed_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        asyncio.run(produce(kafka_bootstrap, topics["input_topics"], make_events(20_000, 50, start=20_000)))
        time.sleep(3)
        lag = service.metric("streamer_consumer_lag_records")
        consumed = service.metric("streamer_events_consumed_total")
    finally:
        assert service.stop() == 0, service.log()
    # The log end is at 40,000; the lag a second ago was at least the end minus what was consumed by now.
    assert lag >= 40_000 - consumed - 2_000, (lag, consumed)
