"""`streamer kafka produce` and `kafka consume`: a file's events on a topic, keyed by entity, and read back."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from typer.testing import CliRunner

from streamer.cli import app
from streamer.errors import ConfigError
from streamer.kafka.file_producer import entity_key, produce_file
from streamer.kafka.producer import KeyPartitioner
from streamer.kafka.topic_printer import format_record

LINES = [
    orjson.dumps({"entity": "a", "features": [1.0, 2.0]}),
    orjson.dumps({"entity": 7, "features": [1.0, 2.0]}),
    b"{not json",
    orjson.dumps({"entity": "", "features": [1.0, 2.0]}),
    orjson.dumps({"entity": "b", "features": [3.0, 4.0]}),
    orjson.dumps({"entity": "a", "features": [5.0, 6.0]}),
]


def read_topic(bootstrap: str, topic: str, partitions: int) -> dict[int, list[tuple[bytes | None, bytes]]]:
    async def read() -> dict[int, list[tuple[bytes | None, bytes]]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            rows: dict[int, list[tuple[bytes | None, bytes]]] = {p: [] for p in range(partitions)}
            while sum(len(v) for v in rows.values()) < sum(ends.values()):
                for tp, messages in (await consumer.getmany(timeout_ms=1000)).items():
                    rows[tp.partition].extend((m.key, m.value) for m in messages)
            return rows
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_entity_key_rules():
    assert entity_key(b'{"entity": "s-1"}') == b"s-1"
    assert entity_key(b'{"entity": 12}') == b"12"
    assert entity_key(b'{"entity": 1.5}') is None
    assert entity_key(b'{"entity": true}') is None
    assert entity_key(b'{"entity": ""}') is None
    assert entity_key(b"[1, 2]") is None
    assert entity_key(b"\xff not json") is None
    # Fields the event does not use may hold what Python's json.dumps writes for non-finite floats.
    assert entity_key(b'{"entity": "x", "note": NaN, "features": [1]}') == b"x"
    assert entity_key(b'{"entity": "x", "note": 1e999}') == b"x"


def test_produce_file_keys_by_entity(kafka_bootstrap, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n\n")
    topic = f"produce-{uuid.uuid4().hex[:12]}"

    count = asyncio.run(produce_file(path, topic, kafka_bootstrap, partitions=3))

    rows = read_topic(kafka_bootstrap, topic, 3)
    produced = [row for partition_rows in rows.values() for row in partition_rows]
    partitioner = KeyPartitioner(3)
    assert count == len(LINES)
    assert sorted(value for _, value in produced) == sorted(LINES)
    assert sorted(key for key, _ in produced if key is not None) == [b"7", b"a", b"a", b"b"]
    for partition, partition_rows in rows.items():
        for key, _ in partition_rows:
            if key is not None:
                assert partitioner(key) == partition
    assert [value for key, value in rows[partitioner(b"a")] if key == b"a"] == [LINES[0], LINES[5]]


def test_cli_produce_uses_the_given_broker(kafka_bootstrap, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(LINES[:2]) + b"\n")
    topic = f"produce-cli-{uuid.uuid4().hex[:12]}"

    result = CliRunner().invoke(app, ["kafka", "produce", str(path), "--topic", topic,
                                      "--bootstrap-servers", kafka_bootstrap, "--partitions", "2"])

    assert result.exit_code == 0, result.output
    assert f"produced 2 records to {topic}" in result.output
    assert sum(len(v) for v in read_topic(kafka_bootstrap, topic, 2).values()) == 2


def test_cli_consume_prints_keys_and_headers(kafka_bootstrap, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(LINES[:2]) + b"\n")
    topic = f"consume-cli-{uuid.uuid4().hex[:12]}"
    runner = CliRunner()
    produced = runner.invoke(app, ["kafka", "produce", str(path), "--topic", topic,
                                   "--bootstrap-servers", kafka_bootstrap, "--partitions", "1"])
    assert produced.exit_code == 0, produced.output

    result = runner.invoke(app, ["kafka", "consume", topic, "--bootstrap-servers", kafka_bootstrap,
                                 "--from-beginning", "--max-messages", "2", "--print-key", "--print-headers"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines == [f"NO_HEADERS\ta\t{LINES[0].decode()}", f"NO_HEADERS\t7\t{LINES[1].decode()}"]


def test_cli_consume_stops_after_timeout(kafka_bootstrap, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(LINES[0] + b"\n")
    topic = f"consume-idle-{uuid.uuid4().hex[:12]}"
    runner = CliRunner()
    assert runner.invoke(app, ["kafka", "produce", str(path), "--topic", topic,
                               "--bootstrap-servers", kafka_bootstrap]).exit_code == 0

    result = runner.invoke(app, ["kafka", "consume", topic, "--bootstrap-servers", kafka_bootstrap,
                                 "--from-beginning", "--timeout-ms", "1500"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [LINES[0].decode()]


def test_cli_consume_skips_aborted_transactions(kafka_bootstrap, unique_topic):
    topic = unique_topic

    async def write_transactions() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"t-{topic}")
        await producer.start()
        try:
            for value, commit in ((b"committed-1", True), (b"aborted", False), (b"committed-2", True)):
                await producer.begin_transaction()
                await producer.send_and_wait(topic, value, partition=0)
                if commit:
                    await producer.commit_transaction()
                else:
                    await producer.abort_transaction()
        finally:
            await producer.stop()

    asyncio.run(write_transactions())
    runner = CliRunner()
    command = ["kafka", "consume", topic, "--bootstrap-servers", kafka_bootstrap, "--from-beginning",
               "--timeout-ms", "1500"]

    committed = runner.invoke(app, command)
    uncommitted = runner.invoke(app, command + ["--isolation-level", "read_uncommitted"])

    assert committed.exit_code == 0, committed.output
    assert committed.output.splitlines() == ["committed-1", "committed-2"]
    assert uncommitted.exit_code == 0, uncommitted.output
    assert uncommitted.output.splitlines() == ["committed-1", "aborted", "committed-2"]


def test_cli_consume_invalid_isolation_level(kafka_bootstrap):
    result = CliRunner().invoke(app, ["kafka", "consume", "any-topic", "--bootstrap-servers", kafka_bootstrap,
                                      "--isolation-level", "dirty"])

    assert isinstance(result.exception, ConfigError)
    assert "Invalid isolation level 'dirty'" in str(result.exception)


def test_cli_consume_unknown_topic(kafka_bootstrap):
    result = CliRunner().invoke(app, ["kafka", "consume", "no-such-topic-here", "--bootstrap-servers",
                                      kafka_bootstrap, "--timeout-ms", "1000"])

    assert isinstance(result.exception, ConfigError)
    assert "Topic not found: no-such-topic-here" in str(result.exception)


def test_format_record_fields():
    headers = [("streamer.reason", b"invalid_json"), ("streamer.source.offset", b"12")]

    line = format_record(None, b"{not json", headers, with_key=True, with_headers=True)

    assert line == "streamer.reason:invalid_json,streamer.source.offset:12\tnull\t{not json"
    assert format_record(b"a", b"\xffx", [], with_key=False, with_headers=False) == "\ufffdx"
