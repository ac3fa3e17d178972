"""A member in one process, with faults injected into its Kafka clients (pending commits, rejected or
unacknowledged batches, transactions the broker has ended) and with changes to its group and topics."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import orjson
import pytest
import torch
from aiokafka import TopicPartition

from streamer.config import Settings
from streamer.errors import BrokerError
from streamer.kafka.service import StreamerService
from streamer.model import SeedNet
from streamer.state.changelog import changelog_topic
from tests.service.service_helpers import (add_partitions, committed_offsets, create_topics, free_port, produce,
                                          read_topic)

pytestmark = pytest.mark.kafka

PARTITIONS = 2


def events(start: int, count: int) -> list[tuple[bytes, bytes]]:
    return [(f"e{i % 10}".encode(), orjson.dumps({"features": [i % 7 / 7, 0.5, -0.25, 1.0]}))
            for i in range(start, start + count)]


async def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def service_settings(kafka_bootstrap: str, tmp_path, prefix: str, seed: int, **overrides) -> Settings:
    """Settings of a service with a small random model and topics of its own."""
    torch.manual_seed(seed)
    model_path = tmp_path / "net.pt"
    torch.save(SeedNet(4, 8, 5, 1, 1).eval().state_dict(), model_path)
    suffix = uuid.uuid4().hex[:8]
    return Settings(model=model_path, bootstrap_servers=kafka_bootstrap, input_topics=[f"{prefix}-in-{suffix}"],
                    output_topic=f"{prefix}-out-{suffix}", dead_letter_topic=f"{prefix}-dlq-{suffix}",
                    group_id=f"{prefix}-group-{suffix}", topic_partitions=PARTITIONS, metrics_port=free_port(),
                    **overrides)


async def start_service(kafka_bootstrap: str, settings: Settings) -> tuple[StreamerService, asyncio.Task]:
    """Create the topics, start the service in a task and wait until it is ready."""
    await create_topics(kafka_bootstrap, {settings.input_topics[0]: PARTITIONS, settings.output_topic: PARTITIONS,
                                          settings.dead_letter_topic: PARTITIONS})
    service = StreamerService(settings)
    running = asyncio.create_task(service.run())
    await wait_until(lambda: service.consumer is not None and service.readiness()[0])
    return service, running


def test_loop_runs_during_pending_commit(kafka_bootstrap, tmp_path):
    settings = service_settings(kafka_bootstrap, tmp_path, "bg", 5, checkpoint_interval_ms=100, request_timeout_ms=30_000)

    async def scenario() -> None:
        service, running = await start_service(kafka_bootstrap, settings)

        # Hold the first commit until released.
        release = asyncio.Event()
        commit_calls = []
        original_commit = service.consumer.commit

        async def held_commit(offsets=None):
            commit_calls.append(dict(offsets))
            if len(commit_calls) == 1:
                await release.wait()
            await original_commit(offsets)

        service.consumer.commit = held_commit
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 200))
        await wait_until(lambda: service.events_processed >= 200 and commit_calls)

        # The commit is pending (its timeout is 60 s); new events are still processed and their outputs produced.
        await produce(kafka_bootstrap, settings.input_topics[0], events(200, 300))
        await wait_until(lambda: service.events_processed >= 500, timeout_s=15)
        assert len(commit_calls) == 1
        assert not release.is_set()
        assert sum(commit_calls[0][tp] for tp in commit_calls[0]) <= 200
        outputs = await read_topic(kafka_bootstrap, settings.output_topic, 500, timeout_s=30)
        assert len(outputs) == 500

        # Released, the held checkpoint commits and a later one covers every event.
        release.set()
        await wait_until(lambda: len(commit_calls) >= 2 and service._background_checkpoint is None)
        service.request_stop()
        await running
        committed = await committed_offsets(kafka_bootstrap, settings.group_id, settings.input_topics[0], PARTITIONS)
        assert sum(offset or 0 for offset in committed.values()) == 500

    asyncio.run(scenario())


def test_rejected_producer_is_replaced_and_outputs_delivered(kafka_bootstrap, tmp_path, monkeypatch):
    """After a batch expires unacknowledged, the broker rejects the idempotent producer's next batches for good
    (OutOfOrderSequenceNumber). The service starts a new producer and delivers every output."""
    from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

    from streamer.kafka import service as service_module

    settings = service_settings(kafka_bootstrap, tmp_path, "rp", 6, checkpoint_interval_ms=100, request_timeout_ms=5_000)
    rejected: list[str] = []

    async def scenario() -> None:
        service, running = await start_service(kafka_bootstrap, settings)
        first_producer = service.producer
        original_send = service_module.send_records

        async def rejecting_send(producer, topic, records, headers=None, **options):
            if producer is not first_producer or topic != settings.output_topic:
                return await original_send(producer, topic, records, headers, **options)
            error = KafkaTimeoutError() if not rejected else OutOfOrderSequenceNumber()
            rejected.append(type(error).__name__)
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(error)
            return [failed]

        monkeypatch.setattr(service_module, "send_records", rejecting_send)
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 300))
        outputs = await read_topic(kafka_bootstrap, settings.output_topic, 300, timeout_s=60)
        assert len(outputs) >= 300
        assert service.producer is not first_producer
        await wait_until(lambda: service.events_processed >= 300 and service._background_checkpoint is None)
        assert not running.done()
        service.request_stop()
        await running
        committed = await committed_offsets(kafka_bootstrap, settings.group_id, settings.input_topics[0], PARTITIONS)
        assert sum(offset or 0 for offset in committed.values()) == 300

    asyncio.run(scenario())
    assert rejected[0] == "KafkaTimeoutError"


def test_stop_deadline_during_unacknowledged_sends(kafka_bootstrap, tmp_path, monkeypatch):
    """A broker that stopped acknowledging (as during an outage) does not hold a stop past its deadline."""
    import time

    from streamer.kafka import service as service_module

    settings = service_settings(kafka_bootstrap, tmp_path, "dl", 7, request_timeout_ms=30_000, shutdown_timeout_s=3.0)
    unanswered: list[asyncio.Future] = []

    async def scenario() -> tuple[float, BaseException | None]:
        service, running = await start_service(kafka_bootstrap, settings)

        async def unacknowledged_send(producer, topic, records, headers=None, **options):
            future = asyncio.get_running_loop().create_future()
            unanswered.append(future)
            return [future]

        monkeypatch.setattr(service_module, "send_records", unacknowledged_send)
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 200))
        await wait_until(lambda: service.events_processed >= 200)
        stop_requested = time.monotonic()
        service.request_stop()
        (outcome,) = await asyncio.gather(running, return_exceptions=True)
        return time.monotonic() - stop_requested, outcome

    stop_s, outcome = asyncio.run(scenario())
    assert unanswered
    # The deadline (3 s), then the clients' own stop, which the last step may overrun by a little.
    assert stop_s < 3.0 + 2.0
    # The outputs were never acknowledged, so nothing could be committed: the stop reports it.
    assert isinstance(outcome, BrokerError), outcome
    assert "Stopped without a final checkpoint (it did not finish before the shutdown deadline)" in str(outcome)


def test_failed_final_commit_fails_stop(kafka_bootstrap, tmp_path):
    """A stop whose last commit fails ends with an error (exit code 1 from the command line), not as a clean stop."""
    from aiokafka.errors import KafkaConnectionError

    settings = service_settings(kafka_bootstrap, tmp_path, "fc", 8, checkpoint_interval_ms=60_000)

    async def scenario() -> None:
        service, running = await start_service(kafka_bootstrap, settings)
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 100))
        await wait_until(lambda: service.events_processed >= 100)

        async def rejected_commit(offsets=None):
            raise KafkaConnectionError("connection reset")

        service.consumer.commit = rejected_commit
        service.request_stop()
        with pytest.raises(BrokerError, match=r"Stopped without a final checkpoint \(it failed: "
                                              r"KafkaConnectionError"):
            await running
        committed = await committed_offsets(kafka_bootstrap, settings.group_id, settings.input_topics[0], PARTITIONS)
        assert sum(offset or 0 for offset in committed.values()) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("failing_call", ["send_offsets_to_transaction", "commit_transaction"])
def test_transaction_ended_by_the_broker_rejoins(kafka_bootstrap, tmp_path, failing_call):
    """A producer whose transaction the broker has ended (after a pause past ``transaction.timeout.ms``) fails
    with aiokafka's IllegalOperation, and its abort with an AssertionError. Neither is a KafkaError. The member
    drops its state, rejoins with a new producer, restores from the changelog and loses no event."""
    from aiokafka.errors import IllegalOperation

    from streamer.engine import Engine, EventBatch
    from streamer.model import load_model

    settings = service_settings(kafka_bootstrap, tmp_path, "te", 8, guarantee="exactly-once", changelog=True,
                                checkpoint_interval_ms=100, group_instance_id="member-a")
    first, second = events(0, 100), events(100, 100)

    def committed(service: StreamerService) -> int:
        return sum(offset or 0 for offset in service.checkpointer.committed_offsets.values())

    async def scenario() -> list:
        service, running = await start_service(kafka_bootstrap, settings)
        await produce(kafka_bootstrap, settings.input_topics[0], first)
        await wait_until(lambda: committed(service) == 100)
        ended = service.producer

        async def not_in_a_transaction(*args, **kwargs):
            raise IllegalOperation("Not in the middle of a transaction")

        async def fatal_abort():
            raise AssertionError

        setattr(ended, failing_call, not_in_a_transaction)
        ended.abort_transaction = fatal_abort
        await produce(kafka_bootstrap, settings.input_topics[0], second)
        await wait_until(lambda: service.metrics.registry.get_sample_value("streamer_resets_total") == 1)
        await wait_until(lambda: service.producer is not ended and committed(service) == 200)
        assert not running.done()
        service.request_stop()
        await running
        return await read_topic(kafka_bootstrap, settings.output_topic, 200, isolation_level="read_committed")

    outputs = asyncio.run(scenario())
    assert len(outputs) == 200
    # Every event exactly once, with the step and prediction of one uninterrupted engine.
    engine = Engine(load_model(settings.model))
    everything = first + second
    reference = engine.process(EventBatch.build([key.decode() for key, _ in everything],
                                                [orjson.loads(value)["features"] for _, value in everything]))
    expected = {}
    for position, (key, _) in enumerate(everything):
        expected.setdefault(key.decode(), []).append(
            (int(reference.steps[position]), float(reference.predictions[position, 0])))
    produced = {}
    for record in sorted(outputs, key=lambda record: (record.partition, record.offset)):
        document = orjson.loads(record.value)
        produced.setdefault(document["entity"], []).append((document["step"], document["prediction"][0]))
    assert produced.keys() == expected.keys()
    for entity, steps in expected.items():
        assert [step for step, _ in produced[entity]] == [step for step, _ in steps]
        assert np.allclose([p for _, p in produced[entity]], [p for _, p in steps], atol=1e-5)


def test_fenced_producer_replaced_at_rebalance(kafka_bootstrap, tmp_path):
    """A member whose producer is fenced at the checkpoint before a revocation keeps its consumer.

    A transaction that timed out during a pause fences the producer in this way. The member replaces only
    the producer, before its next transaction, and processes the partition assigned next without dropping its
    state again."""
    from aiokafka.errors import ProducerFenced

    # Checkpoints after each 100 events only, so that the 20 events after the first 100 are pending when the
    # second member joins.
    settings = service_settings(kafka_bootstrap, tmp_path, "pf", 11, guarantee="exactly-once", changelog=True,
                                checkpoint_events=100, checkpoint_interval_ms=600_000, group_instance_id="member-a")
    topic = settings.input_topics[0]

    def committed(service: StreamerService) -> int:
        return sum(offset or 0 for offset in service.checkpointer.committed_offsets.values())

    def resets(service: StreamerService) -> float:
        return service.metrics.registry.get_sample_value("streamer_resets_total")

    async def scenario() -> tuple[list, int]:
        first, first_running = await start_service(kafka_bootstrap, settings)
        await produce(kafka_bootstrap, topic, events(0, 100))
        await wait_until(lambda: committed(first) == 100)
        await produce(kafka_bootstrap, topic, events(100, 20))
        await wait_until(lambda: first.events_processed == 120)
        fenced = first.producer

        async def fenced_call(*args, **kwargs):
            raise ProducerFenced()

        async def fatal_call(*args, **kwargs):
            raise AssertionError("Invalid state transition TransactionState.FATAL_ERROR")

        # From here on the producer behaves as a fenced one: every transactional call fails. Its transaction of
        # the 20 events is open, so the checkpoint before the revocation meets the fence.
        fenced.send_offsets_to_transaction = fenced.commit_transaction = fenced_call
        fenced.abort_transaction = fenced.begin_transaction = fatal_call
        second = StreamerService(settings.model_copy(update={"metrics_port": free_port(),
                                                             "group_instance_id": "member-b"}))
        second_running = asyncio.create_task(second.run())
        await wait_until(lambda: second.readiness()[0] and first.readiness()[0]
                         and len(first.consumer.assignment()) == 1 and len(second.consumer.assignment()) == 1)
        processed = first.events_processed
        await produce(kafka_bootstrap, topic, events(120, 100))
        await wait_until(lambda: first.events_processed > processed)
        assert resets(first) == 0
        assert first.producer is not fenced
        assert not first_running.done()
        first.request_stop()
        second.request_stop()
        await first_running  # raises when the final checkpoint fails
        await second_running
        return await read_topic(kafka_bootstrap, settings.output_topic, 220, isolation_level="read_committed")

    outputs = asyncio.run(scenario())
    sources = [(document["source"]["partition"], document["source"]["offset"])
               for document in (orjson.loads(record.value) for record in outputs)]
    assert len(sources) == len(set(sources)) == 220


def test_idle_stop_opens_no_transaction(kafka_bootstrap, tmp_path):
    """The final checkpoint of a member that processed nothing since its last checkpoint opens no transaction
    (which a producer fenced meanwhile could not open)."""
    settings = service_settings(kafka_bootstrap, tmp_path, "it", 12, guarantee="exactly-once", changelog=True,
                                checkpoint_interval_ms=100)

    async def scenario() -> tuple[int, int]:
        service, running = await start_service(kafka_bootstrap, settings)
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 50))
        await wait_until(lambda: sum(offset or 0 for offset in service.checkpointer.committed_offsets.values()) == 50
                         and not service.checkpointer.in_transaction)
        begun = []
        begin_transaction = service.producer.begin_transaction

        async def counted_begin():
            begun.append(True)
            await begin_transaction()

        service.producer.begin_transaction = counted_begin
        await asyncio.sleep(0.5)  # several checkpoint intervals
        service.request_stop()
        await running
        return len(begun), service.events_processed

    begun, processed = asyncio.run(scenario())
    assert processed == 50
    assert begun == 0


def test_rebalances_counted_once_each(kafka_bootstrap, tmp_path):
    """Each rebalance a member takes part in adds one to streamer_rebalances_total, the first assignment
    included: a second member joining and then leaving makes three for the first member."""
    settings = service_settings(kafka_bootstrap, tmp_path, "rc", 9)

    def rebalances(service: StreamerService) -> float:
        return service.metrics.registry.get_sample_value("streamer_rebalances_total")

    async def scenario() -> tuple[list[float], float]:
        first, first_running = await start_service(kafka_bootstrap, settings)
        counts = [rebalances(first)]
        second = StreamerService(settings.model_copy(update={"metrics_port": free_port()}))
        second_running = asyncio.create_task(second.run())
        await wait_until(lambda: second.consumer is not None and second.readiness()[0] and rebalances(first) >= 2)
        await asyncio.sleep(1.0)  # a second count of the same rebalance would come within this
        counts.append(rebalances(first))
        second.request_stop()
        await second_running
        await wait_until(lambda: rebalances(first) >= 3 and len(first.consumer.assignment()) == PARTITIONS)
        await asyncio.sleep(1.0)
        counts.append(rebalances(first))
        first.request_stop()
        await first_running
        return counts, rebalances(second)

    counts, second_count = asyncio.run(scenario())
    assert counts == [1, 2, 3]
    assert second_count == 1


def test_partition_added_to_the_input_while_running(kafka_bootstrap, tmp_path):
    """A running member given an added input partition extends the changelog and writes the partition's states
    there, although its producer's metadata predates the new changelog partition."""
    settings = service_settings(kafka_bootstrap, tmp_path, "ap", 10, changelog=True, checkpoint_interval_ms=100)
    topic = settings.input_topics[0]

    async def scenario() -> dict[int, int | None]:
        service, running = await start_service(kafka_bootstrap, settings)
        await produce(kafka_bootstrap, topic, events(0, 100))
        # Checkpointed, so the producer has the changelog's metadata from before the partition is added.
        await wait_until(lambda: sum(offset or 0 for offset in service.checkpointer.committed_offsets.values()) == 100)
        await add_partitions(kafka_bootstrap, topic, PARTITIONS + 1)
        # The consumer would see the partition at its next metadata refresh (metadata_max_age_ms, 5 minutes
        # by default); the test brings that refresh forward. The producer keeps its older metadata.
        await service.consumer._client.force_metadata_update()
        await wait_until(lambda: len(service.consumer.assignment()) == PARTITIONS + 1 and service.readiness()[0])
        await produce(kafka_bootstrap, topic, events(100, 50), partition=PARTITIONS)
        await wait_until(lambda: service.checkpointer.committed_offsets.get(TopicPartition(topic, PARTITIONS)) == 50)
        assert not running.done()
        # aiokafka rejects a batch for a partition its metadata lacks with an AssertionError, which would make
        # the member drop its state and rejoin.
        assert service.metrics.registry.get_sample_value("streamer_resets_total") == 0
        service.request_stop()
        await running
        return await committed_offsets(kafka_bootstrap, settings.group_id, topic, PARTITIONS + 1)

    committed = asyncio.run(scenario())
    assert sum(offset or 0 for offset in committed.values()) == 150
    assert committed[PARTITIONS] == 50
    changelog = asyncio.run(read_topic(kafka_bootstrap, changelog_topic(settings.group_id), 10, timeout_s=10))
    assert {record.key for record in changelog if record.partition == PARTITIONS} == {
        key for key, _ in events(100, 50)}


def test_oversized_dead_letter_omits_value(kafka_bootstrap, tmp_path):
    """A dead letter that would exceed the dead-letter topic's max.message.bytes (here Kafka's default, 1 MiB)
    goes without its value, instead of failing its batch at every retry while the outputs are sent again."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    settings = service_settings(kafka_bootstrap, tmp_path, "dl", 11, checkpoint_interval_ms=100)
    # 1,048,500 bytes: under the 1 MiB record limit, so invalid_features, but over the topic's 1,048,588 with the
    # dead-letter headers.
    huge = b'{"entity": "x", "features": "' + b"y" * (1_048_500 - 31) + b'"}'
    inputs = events(0, 50) + [(b"x", huge)] + events(50, 50)

    async def scenario() -> StreamerService:
        await create_topics(kafka_bootstrap, {settings.input_topics[0]: PARTITIONS, settings.output_topic: PARTITIONS})
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(settings.dead_letter_topic, PARTITIONS, 1)])  # broker defaults
        finally:
            await admin.close()
        service = StreamerService(settings)
        running = asyncio.create_task(service.run())
        await wait_until(lambda: service.consumer is not None and service.readiness()[0])
        await produce(kafka_bootstrap, settings.input_topics[0], inputs, partition=0)
        await wait_until(lambda: committed_sum(service) == 101)
        assert not running.done()
        service.request_stop()
        await running
        return service

    def committed_sum(service: StreamerService) -> int:
        return sum(offset or 0 for offset in service.checkpointer.committed_offsets.values())

    service = asyncio.run(scenario())
    outputs = asyncio.run(read_topic(kafka_bootstrap, settings.output_topic, 100, timeout_s=10))
    letters = asyncio.run(read_topic(kafka_bootstrap, settings.dead_letter_topic, 1, timeout_s=10))
    assert len(outputs) == 100
    assert service.metrics.registry.get_sample_value("streamer_broker_retries_total",
                                                     {"operation": "produce outputs"}) in (None, 0)
    assert len(letters) == 1
    headers = dict(letters[0].headers)
    assert letters[0].value == b""
    assert headers["streamer.value.omitted"] == str(len(huge)).encode()
    assert headers["streamer.reason"] == b"invalid_features"
    assert headers["streamer.source.offset"] == b"50"


def test_rejected_oversized_batch_stops_member(kafka_bootstrap, tmp_path):
    """An output topic whose max.message.bytes is below one output record rejects every attempt: the member
    stops with an error that names the setting, instead of producing the other records again and again."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from streamer.errors import ConfigError

    settings = service_settings(kafka_bootstrap, tmp_path, "tl", 12, checkpoint_interval_ms=100)

    async def scenario() -> BaseException | None:
        await create_topics(kafka_bootstrap, {settings.input_topics[0]: PARTITIONS,
                                              settings.dead_letter_topic: PARTITIONS})
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(settings.output_topic, PARTITIONS, 1,
                                                topic_configs={"max.message.bytes": "100"})])
        finally:
            await admin.close()
        service = StreamerService(settings)
        running = asyncio.create_task(service.run())
        await wait_until(lambda: service.consumer is not None and service.readiness()[0])
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 20))
        done, _ = await asyncio.wait([running], timeout=60)
        assert done, "the member kept running"
        return running.exception()

    error = asyncio.run(scenario())
    assert isinstance(error, ConfigError)
    assert "max.message.bytes" in str(error)
    assert "'" + settings.output_topic + "': 100" in str(error)


def test_broker_probe_runs_while_the_loop_is_blocked(kafka_bootstrap, tmp_path):
    """streamer_broker_reachable follows the cluster while the poll loop waits, as it does in delivery retries
    during an outage."""
    from aiokafka.errors import KafkaConnectionError

    settings = service_settings(kafka_bootstrap, tmp_path, "pb", 13)

    async def scenario() -> list[float]:
        service, running = await start_service(kafka_bootstrap, settings)
        await wait_until(lambda: service._broker_probe is not None)
        release, blocked = asyncio.Event(), asyncio.Event()

        async def held_send(outputs, letters, event_times_ms):
            blocked.set()
            await release.wait()

        async def unreachable():
            raise KafkaConnectionError("Connection refused")

        service._send_without_waiting = held_send
        await produce(kafka_bootstrap, settings.input_topics[0], events(0, 10))
        await asyncio.wait_for(blocked.wait(), 10)
        service.consumer.topics = unreachable
        reachable = service.metrics.registry.get_sample_value("streamer_broker_reachable")
        await wait_until(lambda: service.metrics.registry.get_sample_value("streamer_broker_reachable") == 0,
                         timeout_s=25)
        release.set()
        service.request_stop()
        await running
        return [reachable, service.metrics.registry.get_sample_value("streamer_broker_reachable")]

    assert asyncio.run(scenario()) == [1, 0]


def test_members_own_copartitioned_numbers(kafka_bootstrap, tmp_path):
    """With two input topics, partition N of both goes to one member, so an entity's events of both topics
    advance one state. Members that stay keep their partitions when another joins."""
    settings = service_settings(kafka_bootstrap, tmp_path, "cp", 11)
    suffix = settings.input_topics[0].rsplit("-", 1)[1]
    topics = [f"cp-a-{suffix}", f"cp-b-{suffix}"]
    settings = settings.model_copy(update={"input_topics": topics, "topic_partitions": 3})

    def numbers(service: StreamerService) -> dict[str, set[int]]:
        owned = {topic: set() for topic in topics}
        for tp in service.consumer.assignment():
            owned[tp.topic].add(tp.partition)
        return owned

    async def scenario() -> tuple[list[dict[str, set[int]]], list[dict[str, set[int]]], list]:
        members, tasks = [], []

        async def join() -> None:
            member = StreamerService(settings.model_copy(update={"metrics_port": free_port()}))
            members.append(member)
            tasks.append(asyncio.create_task(member.run()))

        def settled(count: int) -> bool:
            return (all(member.consumer is not None and member.readiness()[0] for member in members)
                    and sum(len(member.consumer.assignment()) for member in members) == 3 * len(topics)
                    and all(member.consumer.assignment() for member in members[:count]))

        await join()
        await join()
        await wait_until(lambda: settled(2))
        await asyncio.sleep(1.0)
        two = [numbers(member) for member in members]
        for index in range(12):
            events_of_topic = [(f"e{index % 6}".encode(), orjson.dumps({"features": [index / 12, 0.5, -0.25, 1.0]}))]
            await produce(kafka_bootstrap, topics[index % 2], events_of_topic)
        outputs = await read_topic(kafka_bootstrap, settings.output_topic, 12, timeout_s=60)
        await join()
        await wait_until(lambda: settled(3))
        await asyncio.sleep(1.0)
        three = [numbers(member) for member in members]
        for member in members:
            member.request_stop()
        await asyncio.gather(*tasks)
        return two, three, outputs

    two, three, outputs = asyncio.run(scenario())

    for assignment in two + three:
        assert assignment[topics[0]] == assignment[topics[1]], assignment
    assert sorted(n for assignment in two for n in assignment[topics[0]]) == [0, 1, 2]
    assert sorted(n for assignment in three for n in assignment[topics[0]]) == [0, 1, 2]
    for before, after in zip(two, three[:2]):
        assert after[topics[0]] <= before[topics[0]]
    steps: dict[str, list[int]] = {}
    for record in outputs:
        output = orjson.loads(record.value)
        steps.setdefault(output["entity"], []).append(output["step"])
    assert {entity: sorted(values) for entity, values in steps.items()} == {f"e{i}": [1, 2] for i in range(6)}
