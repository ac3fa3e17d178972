"""Tests of the local Kafka broker and of aiokafka features the engine depends on.

All tests run against a real broker started from the Maven Central jars.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from streamer.kafka.console_tools import console_consume, console_produce
from streamer.kafka.local_broker import (
    STATUS_NOT_RUNNING_EXIT_CODE,
    BrokerError,
    LocalKafka,
    main,
    _random_kafka_uuid,
    probe_broker_count,
    read_state_file,
)
# The fixtures kafka_broker, kafka_bootstrap, topic_factory and unique_topic
# come from tests/kafka_fixtures.py through tests/conftest.py. Importing them
# here as well would register a second session-scoped broker.
from tests.kafka_fixtures import TopicFactory, create_topic

pytestmark = pytest.mark.kafka

Record = tuple[bytes | None, bytes | None]

JSON_VALUE = json.dumps(
    {"entity": "sensor-7", "ts": 1718000000.25, "text": "naïve café ✓", "tab": "a\tb"},
    ensure_ascii=False,
).encode("utf-8")


async def consume_records(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    isolation_level: str = "read_uncommitted",
    group_id: str | None = None,
    timeout_s: float = 30.0,
) -> list[Record]:
    """Read ``count`` records from the start of ``topic`` with aiokafka, or fewer on timeout."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                records += [(message.key, message.value) for message in messages]
    finally:
        await consumer.stop()
    return records


async def produce_records(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


def describe_group_members(port: int, group_id: str) -> list[tuple[str, str | None]]:
    """Return ``(member_id, group_instance_id)`` pairs from a raw DescribeGroups v4 request.

    aiokafka 0.14 sends DescribeGroups v3 at most, whose response lacks
    group_instance_id (added in v4).
    """
    client_id = b"streamer-test"
    group = group_id.encode()
    request = struct.pack(">hhih", 15, 4, 7, len(client_id)) + client_id
    request += struct.pack(">ih", 1, len(group)) + group + struct.pack(">?", False)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", connection.recv(4, socket.MSG_WAITALL))[0]
        response = connection.recv(size, socket.MSG_WAITALL)

    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, response, offset)
        offset += struct.calcsize(fmt)
        return value

    def take_string() -> str | None:
        nonlocal offset
        length = take(">h")
        if length < 0:
            return None
        text = response[offset : offset + length].decode()
        offset += length
        return text

    def skip_bytes() -> None:
        nonlocal offset
        offset += max(take(">i"), 0)

    correlation_id, _throttle_ms, group_count = take(">i"), take(">i"), take(">i")
    if correlation_id != 7 or group_count != 1:
        raise RuntimeError(f"unexpected DescribeGroups response: {response!r}")
    error_code = take(">h")
    if error_code != 0:
        raise RuntimeError(f"DescribeGroups for {group_id} failed with error code {error_code}")
    for _ in range(4):  # group_id, group_state, protocol_type, protocol_data
        take_string()
    members = []
    for _ in range(take(">i")):
        member_id = take_string() or ""
        instance_id = take_string()
        take_string()  # client_id
        take_string()  # client_host
        skip_bytes()  # member_metadata
        skip_bytes()  # member_assignment
        members.append((member_id, instance_id))
    return members


async def consume_to_end(
    bootstrap: str, topic: str, isolation_level: str, partition_count: int = 1
) -> list[Record]:
    """Read ``topic`` from the start up to its end offsets, which are the last stable offsets for read_committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        partitions = [TopicPartition(topic, partition) for partition in range(partition_count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end_offsets = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + 30
        while True:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= end_offsets[tp] for tp in partitions):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out reading {topic} up to {end_offsets}")
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                records += [(message.key, message.value) for message in messages]
    finally:
        await consumer.stop()
    return records


# Broker lifecycle.


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 encodes to "-" as the first base64url character; the storage tool would read it as an option.
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" + bytes(15))])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))

    cluster_id = _random_kafka_uuid()

    assert cluster_id == "AQAAAAAAAAAAAAAAAAAAAA"
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_broker_serves_metadata(kafka_broker: LocalKafka, kafka_bootstrap: str) -> None:
    assert kafka_bootstrap == f"127.0.0.1:{kafka_broker.port}"
    assert kafka_broker.is_running()
    assert probe_broker_count("127.0.0.1", kafka_broker.port or 0, 5.0) == 1

    async def describe() -> dict:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            return await admin.describe_cluster()
        finally:
            await admin.close()

    cluster = asyncio.run(describe())
    assert [broker["node_id"] for broker in cluster["brokers"]] == [1]
    assert cluster["controller_id"] == 1


def test_created_topic_is_listed(kafka_bootstrap: str, unique_topic: str) -> None:
    assert unique_topic in asyncio.run(list_topics(kafka_bootstrap))


@pytest.mark.parametrize("spec,reason", [
    (dict(partitions=1, replication_factor=3), "InvalidReplicationFactorError"),
    (dict(partitions=1, name="bad topic!"), "InvalidTopicError"),
])
def test_topic_the_broker_refuses_raises_its_reason(kafka_bootstrap: str, spec: dict, reason: str) -> None:
    from streamer.errors import ConfigError
    from streamer.kafka.admin import TopicSpec, ensure_topics

    name = spec.pop("name", f"refused-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match=f"Cannot create topic '{name}'.*{reason}"):
        asyncio.run(ensure_topics(kafka_bootstrap, [TopicSpec(name, **spec)], 10_000))


def test_state_file_records_running_broker(kafka_broker: LocalKafka, kafka_bootstrap: str) -> None:
    state = read_state_file(kafka_broker.data_dir)

    assert state is not None
    assert state.pid == kafka_broker.pid
    assert state.bootstrap_servers == kafka_bootstrap


def test_restart_keeps_port_topics_and_data(tmp_path: Path) -> None:
    records: list[Record] = [(b"k1", b"before-restart-1"), (b"k2", b"before-restart-2")]

    with LocalKafka(tmp_path / "broker") as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topic(bootstrap, "restart-topic"))
        asyncio.run(produce_records(bootstrap, "restart-topic", records))
        first_pid = broker.pid

        broker.stop()
        assert not broker.is_running()
        assert broker.start() == bootstrap

        assert broker.pid != first_pid
        assert "restart-topic" in asyncio.run(list_topics(bootstrap))
        assert asyncio.run(consume_records(bootstrap, "restart-topic", 2)) == records

        assert broker.restart() == bootstrap
        assert asyncio.run(consume_records(bootstrap, "restart-topic", 2)) == records
    assert not broker.is_running()

    # A new handle on the same data directory reuses the recorded, now free, ports.
    new_handle = LocalKafka(tmp_path / "broker")
    assert new_handle.port == broker.port
    assert new_handle.controller_port == broker.controller_port


def test_crash_with_connected_client_keeps_port(tmp_path: Path) -> None:
    async def connect(bootstrap: str) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        return producer

    broker = LocalKafka(tmp_path / "broker")
    bootstrap = broker.start()
    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(connect(bootstrap))
    restarted = None
    try:
        # The kernel closes the killed broker's connections, which leaves them in TIME-WAIT on its port.
        os.kill(broker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while broker.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)

        restarted = LocalKafka(tmp_path / "broker")

        assert restarted.start() == bootstrap
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()
        if restarted is not None:
            restarted.stop()


def test_start_fails_when_another_broker_has_the_port(kafka_broker: LocalKafka, tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "broker", port=kafka_broker.port)

    with pytest.raises(BrokerError) as raised:
        broker.start(timeout_s=60)

    assert "Address already in use" in str(raised.value)
    assert not broker.is_running()
    assert probe_broker_count("127.0.0.1", kafka_broker.port or 0, 5.0) == 1


def test_running_clients_survive_restart(
    kafka_broker: LocalKafka, kafka_bootstrap: str, unique_topic: str
) -> None:
    async def produce_restart_consume() -> list[bytes | None]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        # An assigned partition keeps the group coordinator out of a test about the broker's restart. With a
        # group, one run hung after the restart while the broker log showed the member failing its session.
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
        await producer.start()
        await consumer.start()
        consumer.assign([TopicPartition(unique_topic, 0)])
        try:
            await asyncio.wait_for(producer.send_and_wait(unique_topic, b"before", partition=0), 30)
            first = await asyncio.wait_for(consumer.getone(), 30)

            await asyncio.to_thread(kafka_broker.restart)

            await asyncio.wait_for(producer.send_and_wait(unique_topic, b"after", partition=0), 60)
            second = await asyncio.wait_for(consumer.getone(), 60)
        finally:
            await asyncio.wait_for(consumer.stop(), 30)
            await asyncio.wait_for(producer.stop(), 30)
        return [first.value, second.value]

    assert asyncio.run(produce_restart_consume()) == [b"before", b"after"]
    assert kafka_broker.bootstrap_servers == kafka_bootstrap


def test_start_fails_when_port_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        broker = LocalKafka(tmp_path / "broker", port=port)

        with pytest.raises(BrokerError) as raised:
            broker.start(timeout_s=60)

    message = str(raised.value)
    assert "exited with code" in message
    assert str(broker.log_path) in message
    assert "Address already in use" in message
    assert not broker.is_running()


def test_command_line_start_status_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(tmp_path / "cli-broker")
    try:
        assert main(["start", "--data-dir", data_dir]) == 0
        bootstrap = capsys.readouterr().out.strip()
        assert bootstrap.startswith("127.0.0.1:")

        assert main(["start", "--data-dir", data_dir]) == 0
        assert capsys.readouterr().out.strip() == bootstrap

        assert main(["status", "--data-dir", data_dir]) == 0
        assert f"bootstrap={bootstrap}" in capsys.readouterr().out
        assert probe_broker_count("127.0.0.1", int(bootstrap.rsplit(":", 1)[1]), 5.0) == 1
    finally:
        assert main(["stop", "--data-dir", data_dir]) == 0

    assert "stopped Kafka broker" in capsys.readouterr().out
    assert main(["status", "--data-dir", data_dir]) == STATUS_NOT_RUNNING_EXIT_CODE
    assert main(["stop", "--data-dir", data_dir]) == 0
    assert "no Kafka broker running" in capsys.readouterr().out


# Interoperability with Kafka's console clients.


def test_console_producer_to_aiokafka(kafka_bootstrap: str, unique_topic: str) -> None:
    records: list[tuple[bytes | None, bytes]] = [
        (b"entity-1", JSON_VALUE),
        (None, b'{"key": null}'),
        (b"entity-2", b"  value with surrounding spaces  "),
        (b"entity-3", b""),
    ]

    console_produce(kafka_bootstrap, unique_topic, records)
    received = asyncio.run(consume_records(kafka_bootstrap, unique_topic, len(records)))

    assert received == records
    assert json.loads(received[0][1] or b"") == json.loads(JSON_VALUE)


def test_aiokafka_to_console_consumer(kafka_bootstrap: str, unique_topic: str) -> None:
    pretty_json = json.dumps({"a": [1, 2], "b": "x"}, indent=2).encode("utf-8")
    records: list[Record] = [
        (b"entity-1", JSON_VALUE),
        (None, b"null-key"),
        (b"entity-2", pretty_json),
        (b"entity-3", None),
    ]
    asyncio.run(produce_records(kafka_bootstrap, unique_topic, records))

    for isolation_level in ("read_uncommitted", "read_committed"):
        received = console_consume(
            kafka_bootstrap, unique_topic, len(records), 20.0, isolation_level=isolation_level
        )
        assert received == records, isolation_level


def test_console_producer_rejects_unrepresentable_records(unique_topic: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        console_produce("127.0.0.1:1", unique_topic, [(b"k", b"a\nb")])
    with pytest.raises(ValueError, match="tab"):
        console_produce("127.0.0.1:1", unique_topic, [(b"k\t1", b"v")])
    with pytest.raises(ValueError, match="UTF-8"):
        console_produce("127.0.0.1:1", unique_topic, [(b"k", b"\xff")])


def test_console_consumer_stops_after_idle_timeout(kafka_bootstrap: str, unique_topic: str) -> None:
    asyncio.run(produce_records(kafka_bootstrap, unique_topic, [(b"k", b"only")]))

    started = time.monotonic()
    received = console_consume(kafka_bootstrap, unique_topic, 5, 3.0)

    assert received == [(b"k", b"only")]
    assert time.monotonic() - started < 30.0


# aiokafka features used by the engine: consumer groups, idempotence,
# transactions and static membership.


def test_consumer_group_commit_and_committed(kafka_bootstrap: str, unique_topic: str) -> None:
    records: list[Record] = [(b"k", f"v{index}".encode()) for index in range(5)]
    asyncio.run(produce_records(kafka_bootstrap, unique_topic, records))
    group_id = f"group-{unique_topic}"
    partition = TopicPartition(unique_topic, 0)

    async def consume_and_commit() -> tuple[int, int | None]:
        consumer = AIOKafkaConsumer(
            unique_topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            seen = 0
            deadline = time.monotonic() + 30
            while seen < 3 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500, max_records=3 - seen)
                seen += sum(len(messages) for messages in batches.values())
            await consumer.commit({partition: seen})
            return seen, await consumer.committed(partition)
        finally:
            await consumer.stop()

    seen, committed = asyncio.run(consume_and_commit())
    assert seen == 3
    assert committed == 3

    resumed = asyncio.run(
        consume_records(kafka_bootstrap, unique_topic, 2, group_id=group_id, timeout_s=15)
    )
    assert resumed == records[3:]


def test_idempotent_producer(kafka_bootstrap: str, unique_topic: str) -> None:
    async def produce() -> list[int]:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all"
        )
        await producer.start()
        try:
            futures = [
                await producer.send(unique_topic, key=b"k", value=f"v{index}".encode())
                for index in range(20)
            ]
            metadata = await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return [item.offset for item in metadata]

    offsets = asyncio.run(produce())
    received = asyncio.run(consume_records(kafka_bootstrap, unique_topic, 20))

    assert offsets == list(range(20))
    assert [value for _key, value in received] == [f"v{index}".encode() for index in range(20)]


def test_transaction_commits_output_and_offsets(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    input_topic = topic_factory(prefix="txn-in")
    output_topic = topic_factory(prefix="txn-out")
    group_id = f"group-{input_topic}"
    input_partition = TopicPartition(input_topic, 0)
    asyncio.run(
        produce_records(kafka_bootstrap, input_topic, [(b"k", f"in{i}".encode()) for i in range(4)])
    )

    async def process_in_transaction() -> None:
        consumer = AIOKafkaConsumer(
            input_topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{input_topic}"
        )
        await consumer.start()
        await producer.start()
        try:
            messages = []
            deadline = time.monotonic() + 30
            while len(messages) < 4 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    messages += batch
            if len(messages) != 4:
                raise RuntimeError(f"expected 4 input records, got {len(messages)}")

            await producer.begin_transaction()
            for message in messages:
                await producer.send(output_topic, key=message.key, value=b"out-" + message.value)
            await producer.send_offsets_to_transaction(
                {input_partition: OffsetAndMetadata(messages[-1].offset + 1, "")}, group_id
            )
            await producer.commit_transaction()
        finally:
            await producer.stop()
            await consumer.stop()

    async def committed_offset() -> int | None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group_id)
        await consumer.start()
        try:
            return await consumer.committed(input_partition)
        finally:
            await consumer.stop()

    asyncio.run(process_in_transaction())

    expected: list[Record] = [(b"k", f"out-in{i}".encode()) for i in range(4)]
    assert (
        asyncio.run(
            consume_records(kafka_bootstrap, output_topic, 4, isolation_level="read_committed")
        )
        == expected
    )
    assert asyncio.run(committed_offset()) == 4
    assert console_consume(kafka_bootstrap, output_topic, 4, 20.0) == expected


def test_aborted_transaction_invisible_to_read_committed(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    async def abort_then_commit() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{unique_topic}"
        )
        await producer.start()
        try:
            await producer.begin_transaction()
            await producer.send(unique_topic, key=b"k", value=b"aborted-1")
            await producer.send(unique_topic, key=b"k", value=b"aborted-2")
            await producer.abort_transaction()

            await producer.begin_transaction()
            await producer.send(unique_topic, key=b"k", value=b"committed")
            await producer.commit_transaction()
        finally:
            await producer.stop()

    asyncio.run(abort_then_commit())

    read_committed = asyncio.run(consume_to_end(kafka_bootstrap, unique_topic, "read_committed"))
    read_uncommitted = asyncio.run(
        consume_to_end(kafka_bootstrap, unique_topic, "read_uncommitted")
    )
    # The aborted records precede the committed one, so the first record a
    # read_committed console consumer prints shows whether it skipped them.
    console_committed = console_consume(kafka_bootstrap, unique_topic, 1, 20.0)

    assert read_committed == [(b"k", b"committed")]
    assert read_uncommitted == [(b"k", b"aborted-1"), (b"k", b"aborted-2"), (b"k", b"committed")]
    assert console_committed == [(b"k", b"committed")]


def test_static_membership_join(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory(partitions=2, prefix="static")
    group_id = f"group-{topic}"

    async def join(instance_id: str) -> set[TopicPartition]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group_id,
            group_instance_id=instance_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + 30
            while not consumer.assignment() and time.monotonic() < deadline:
                await consumer.getmany(timeout_ms=500)
            return set(consumer.assignment())
        finally:
            await consumer.stop()

    all_partitions = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    port = int(kafka_bootstrap.rsplit(":", 1)[1])

    assert asyncio.run(join("instance-a")) == all_partitions
    # aiokafka sends no LeaveGroup for a static member, so the broker keeps it
    # until the session timeout.
    first_members = describe_group_members(port, group_id)
    assert [instance_id for _member_id, instance_id in first_members] == ["instance-a"]

    # Rejoining with the same instance id replaces the member instead of adding one.
    assert asyncio.run(join("instance-a")) == all_partitions
    second_members = describe_group_members(port, group_id)
    assert [instance_id for _member_id, instance_id in second_members] == ["instance-a"]
    assert second_members[0][0] != first_members[0][0]
