"""The Kafka consumer-group service: fetch -> decode -> step -> produce -> commit, at least once."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from streamer import __version__
from streamer.backtest.file_replay import event_format_for
from streamer.config import Settings
from streamer.engine import Engine, EventBatch, StepResult
from streamer.errors import BrokerError, ConfigError
from streamer.io.events import DeadLetter, EventDecoder
from streamer.io.outputs import dead_letter_headers, encode_outputs
from streamer.kafka.admin import TOPIC_MAX_MESSAGE_BYTES, TopicSpec, ensure_topics
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.kafka.retry import retry
from streamer.metrics import MetricsServer, StreamerMetrics
from streamer.model import RecurrentModel, load_model

logger = logging.getLogger(__name__)

LIVENESS_STALL_S = 60.0  # the loop is considered stuck when it has not polled for this long


@dataclass
class FetchedBatch:
    """Records of one ``getmany`` call, flattened in partition order, as parallel columns."""

    topics: list[str]
    partitions: np.ndarray
    offsets: np.ndarray
    timestamps_ms: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    next_offsets: dict[TopicPartition, int]

    @classmethod
    def from_records(cls, records: dict[TopicPartition, list]) -> FetchedBatch:
        topics, partitions, offsets, timestamps, keys, values = [], [], [], [], [], []
        next_offsets = {}
        for tp, messages in records.items():
            if not messages:
                continue
            count = len(messages)
            topics.extend([tp.topic] * count)
            partitions.extend([tp.partition] * count)
            for message in messages:
                offsets.append(message.offset)
                timestamps.append(message.timestamp)
                keys.append(message.key)
                values.append(message.value)
            next_offsets[tp] = messages[-1].offset + 1
        return cls(topics, np.asarray(partitions, np.int32), np.asarray(offsets, np.int64), timestamps, keys,
                   values, next_offsets)

    def __len__(self) -> int:
        return len(self.values)


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, service: StreamerService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self._service.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        await self._service.on_partitions_assigned(set(assigned))


class StreamerService:
    """One member of a Kafka consumer group serving a recurrent model, at-least-once.

    Input offsets are committed only after the outputs and dead letters of those events are acknowledged
    by the broker, so a crash replays events instead of losing them.
    """

    def __init__(self, settings: Settings, *, model: RecurrentModel | None = None,
                 metrics: StreamerMetrics | None = None) -> None:
        if settings.model is None and model is None:
            raise ConfigError("No model: pass --model or set STREAMER_MODEL")
        if settings.output_topic in settings.input_topics or settings.dead_letter_topic in settings.input_topics:
            raise ConfigError("The output and dead-letter topics must differ from the input topics")
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model = model or load_model(settings.model, seq_len=settings.seq_len, device=settings.device)
        self.engine = Engine(self.model, settings.semantics, capacity=settings.max_entities,
                             idle_expiry_ms=settings.idle_expiry_ms)
        self.decoder = EventDecoder(event_format_for(self.model, settings.max_record_bytes, settings.entity_field))
        self.metrics = metrics or StreamerMetrics()
        self.metrics.set_build_info(__version__, self.model.fingerprint, settings.semantics, "service")
        self.metrics_server: MetricsServer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._assignment: set[TopicPartition] = set()
        self._batch_lock = asyncio.Lock()
        self._stop_requested = asyncio.Event()
        self._stop_deadline: float | None = None
        self._last_poll = time.monotonic()
        self._input_partitions: dict[str, int] = {}
        self._output_partitioner: KeyPartitioner | None = None
        self._dead_letter_partitioner: KeyPartitioner | None = None
        self.events_processed = 0
        self._evictions_seen = 0
        self._expirations_seen = 0

    # -- health ------------------------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        idle_s = time.monotonic() - self._last_poll
        if idle_s > LIVENESS_STALL_S:
            return False, f"the consumer loop has not polled for {idle_s:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self._assignment:
            return False, "no partitions assigned"
        return True, f"ready: {len(self._assignment)} partitions assigned"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the service to stop: no more fetches; the in-flight batch is finished and committed."""
        if not self._stop_requested.is_set():
            logger.info("Stop requested; finishing the in-flight batch (deadline %.0f s)",
                        self.settings.shutdown_timeout_s)
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self._stop_requested.set()

    def _past_deadline(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)

    async def run(self) -> None:
        """Start, process batches until a stop is requested, then shut down.

        Shutdown, bounded by ``shutdown_timeout_s`` from the stop request:
        1. Stop fetching; the in-flight batch finishes, its outputs are acknowledged and its offsets committed.
        2. Flush the producer.
        3. Stop the consumer, which leaves the group (static members keep their assignment until the session
           times out).
        4. Stop the producer and the metrics server.
        """
        logger.info("Starting streamer %s: %s", __version__, self.settings.effective())
        await self._start()
        try:
            while not self._stop_requested.is_set():
                await self._poll_once()
        finally:
            await self._shutdown()

    async def _start(self) -> None:
        settings = self.settings
        self.metrics_server = MetricsServer(self.metrics, settings.metrics_host, settings.metrics_port,
                                            liveness=self.liveness, readiness=self.readiness)
        self.metrics_server.start()
        await self._ensure_topics()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, enable_idempotence=True, acks="all", linger_ms=2,
            max_batch_size=1 << 20, max_request_size=TOPIC_MAX_MESSAGE_BYTES,
            request_timeout_ms=settings.request_timeout_ms,
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id,
            group_instance_id=settings.group_instance_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=settings.max_batch_events,
            fetch_max_wait_ms=settings.fetch_max_wait_ms, request_timeout_ms=max(settings.request_timeout_ms, 40_000),
            max_partition_fetch_bytes=TOPIC_MAX_MESSAGE_BYTES, isolation_level="read_committed",
        )
        await retry("producer start", self.producer.start, timeout_s=settings.request_timeout_ms / 1000,
                    stopping=self._stop_requested.is_set, on_retry=self._count_retry)
        await retry("consumer start", self.consumer.start, timeout_s=settings.request_timeout_ms / 1000,
                    stopping=self._stop_requested.is_set, on_retry=self._count_retry)
        self.consumer.subscribe(settings.input_topics, listener=_RebalanceListener(self))

    async def _ensure_topics(self) -> None:
        settings = self.settings
        large = {"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)}
        specs = [TopicSpec(topic, settings.topic_partitions, settings.replication_factor, large)
                 for topic in settings.input_topics]
        specs.append(TopicSpec(settings.output_topic, settings.topic_partitions, settings.replication_factor))
        specs.append(TopicSpec(settings.dead_letter_topic, settings.topic_partitions, settings.replication_factor,
                               large))
        counts = await retry("create topics", lambda: ensure_topics(settings.bootstrap_servers, specs,
                                                                     settings.request_timeout_ms),
                             timeout_s=3 * settings.request_timeout_ms / 1000, stopping=self._stop_requested.is_set,
                             on_retry=self._count_retry)
        self._input_partitions = {topic: counts[topic] for topic in settings.input_topics}
        self._output_partitioner = KeyPartitioner(counts[settings.output_topic])
        self._dead_letter_partitioner = KeyPartitioner(counts[settings.dead_letter_topic])

    async def _shutdown(self) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
        # Step 2
        if self.producer is not None:
            await self._until_deadline(self.producer.flush(), "Producer flush")
        # Step 3
        if self.consumer is not None:
            await self._until_deadline(self.consumer.stop(), "Consumer leaving the group")
        # Step 4
        if self.producer is not None:
            await self._until_deadline(self.producer.stop(), "Producer stop")
        if self.metrics_server is not None:
            self.metrics_server.stop()
        logger.info("Stopped after %d events", self.events_processed)

    async def _until_deadline(self, call, operation: str) -> None:
        """Await one shutdown step, giving up with a warning at the shutdown deadline or on a broker error."""
        remaining_s = max(0.1, self._stop_deadline - time.monotonic())
        try:
            await asyncio.wait_for(call, remaining_s)
        except (asyncio.TimeoutError, KafkaError) as error:
            logger.warning("%s did not finish before the shutdown deadline: %r", operation, error)

    # -- rebalances --------------------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Wait for the in-flight batch (it commits its offsets), then drop the revoked partitions' entities."""
        if not revoked:
            return
        async with self._batch_lock:
            partitions = {tp.partition for tp in revoked}
            # NOTE: the arena keys entities by partition number only. With several input topics, a revoked
            # partition number drops that number's entities of every topic, which range assignment co-assigns.
            dropped = self.engine.arena.remove_partitions(partitions)
            self.engine.arena.drain_removed()
            self._assignment -= revoked
            for tp in revoked:
                self.metrics.remove_partition(tp.topic, tp.partition)
            self.metrics.rebalances.inc()
            self.metrics.assigned_partitions.set(len(self._assignment))
            self.metrics.state_entities.set(len(self.engine.arena))
        logger.info("Partitions revoked: %s; dropped %d entities", _format_partitions(revoked), dropped)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assignment |= assigned
        self.metrics.assigned_partitions.set(len(self._assignment))
        if assigned:
            self.metrics.rebalances.inc()
        logger.info("Partitions assigned: %s", _format_partitions(assigned))

    # -- the batch ---------------------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        records = await self.consumer.getmany(timeout_ms=100, max_records=self.settings.max_batch_events)
        self._last_poll = time.monotonic()
        self.metrics.mark_poll()
        fetched = FetchedBatch.from_records(records)
        if not len(fetched):
            return
        async with self._batch_lock:
            await self._process(fetched)

    async def _process(self, fetched: FetchedBatch) -> None:
        started = time.perf_counter()
        batch, dead = self.decoder.decode(fetched.keys, fetched.values, fetched.timestamps_ms, fetched.offsets,
                                          fetched.partitions)
        result = self.engine.process(batch)
        outputs = self._output_records(fetched, batch, result)
        letters = self._dead_letter_records(fetched, dead)
        self.metrics.batch_duration_seconds.observe(time.perf_counter() - started)
        await self._deliver(outputs, letters)
        acknowledged_ms = time.time() * 1000
        await self._commit(fetched.next_offsets)
        self._record_batch(fetched, batch, result, dead, len(outputs), acknowledged_ms)

    def _output_records(self, fetched: FetchedBatch, batch: EventBatch, result: StepResult
                        ) -> list[tuple[int, bytes, bytes]]:
        topics = fetched.topics
        record_index = batch.record_index.tolist()
        partitions = batch.partitions.tolist()
        offsets = batch.offsets.tolist()

        def source(position: int) -> dict:
            return {"topic": topics[record_index[position]], "partition": partitions[position],
                    "offset": offsets[position]}

        encoded = encode_outputs(batch, result, self.model.fingerprint, source)
        partitioner = self._output_partitioner
        # Outputs are keyed by entity. With equal partition counts, an input keyed by entity and written with the
        # default partitioner is already on the output's partition number, so that number is reused unhashed.
        reuse = {topic for topic, count in self._input_partitions.items() if count == partitioner.partitions}
        records = []
        for position, key, value in encoded:
            index = record_index[position]
            keyed_input = fetched.keys[index] is not None and topics[index] in reuse
            partition = partitions[position] if keyed_input else partitioner(key)
            records.append((partition, key, value))
        return records

    def _dead_letter_records(self, fetched: FetchedBatch, dead: list[DeadLetter]
                             ) -> tuple[list[tuple[int, bytes, bytes]], list[list[tuple[str, bytes]]]]:
        records, headers = [], []
        for letter in dead:
            topic, partition = fetched.topics[letter.index], int(fetched.partitions[letter.index])
            offset = int(fetched.offsets[letter.index])
            # A dead letter keeps its original key; without one it stays on its input partition number.
            if letter.key:
                target_partition = self._dead_letter_partitioner(letter.key)
            else:
                target_partition = partition % self._dead_letter_partitioner.partitions
            records.append((target_partition, letter.key, letter.value or b""))
            headers.append(dead_letter_headers(letter, topic, partition, offset))
            logger.debug("Dead letter %s[%d]@%d: %s", topic, partition, offset, letter.reason)
        return records, headers

    async def _deliver(self, outputs: list[tuple[int, bytes, bytes]],
                       letters: tuple[list[tuple[int, bytes, bytes]], list[list[tuple[str, bytes]]]]) -> None:
        """Send outputs and dead letters and wait until the broker acknowledges all of them, retrying."""
        settings = self.settings

        async def send_and_wait() -> None:
            futures = await send_records(self.producer, settings.output_topic, outputs)
            futures += await send_records(self.producer, settings.dead_letter_topic, letters[0], letters[1])
            await asyncio.gather(*futures)

        await retry("produce outputs", send_and_wait, timeout_s=2 * settings.request_timeout_ms / 1000,
                    stopping=self._past_deadline, on_retry=self._count_retry)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        owned = {tp: offset for tp, offset in offsets.items() if tp in self.consumer.assignment()}
        if not owned:
            return
        try:
            await retry("commit offsets", lambda: self.consumer.commit(owned),
                        timeout_s=self.settings.request_timeout_ms / 1000, stopping=self._past_deadline,
                        on_retry=self._count_retry)
            self.metrics.commits.inc()
        except BrokerError as error:
            self.metrics.commit_failures.inc()
            if isinstance(error.__cause__, (CommitFailedError, IllegalStateError)):
                # The group rebalanced: these partitions belong to another member now, which resumes from the
                # last committed offset. Outputs already produced may be produced again (at-least-once).
                logger.warning("Commit rejected after a rebalance; the new owner will replay: %r", error.__cause__)
                return
            raise

    def _record_batch(self, fetched: FetchedBatch, batch: EventBatch, result: StepResult, dead: list[DeadLetter],
                      produced: int, acknowledged_ms: float) -> None:
        metrics = self.metrics
        for topic in set(fetched.topics):
            metrics.events_consumed.labels(topic=topic).inc(fetched.topics.count(topic))
        metrics.events_produced.labels(topic=self.settings.output_topic).inc(produced)
        for letter in dead:
            metrics.events_dead_lettered.labels(reason=letter.reason).inc()
        if result.duplicates:
            metrics.events_duplicate.inc(result.duplicates)
        metrics.batch_events.observe(len(fetched))
        metrics.inference_duration_seconds.observe(result.inference_s)
        timestamps = np.asarray(fetched.timestamps_ms, np.float64)[batch.record_index[result.applied]]
        if timestamps.size:
            metrics.observe_latencies(np.maximum(0.0, (acknowledged_ms - timestamps) / 1000.0))
        arena = self.engine.arena
        metrics.state_entities.set(len(arena))
        metrics.state_evictions.inc(arena.evictions - self._evictions_seen)
        metrics.state_expirations.inc(arena.expirations - self._expirations_seen)
        self._evictions_seen, self._expirations_seen = arena.evictions, arena.expirations
        arena.drain_removed()
        for tp, next_offset in fetched.next_offsets.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                metrics.set_consumer_lag(tp.topic, tp.partition, max(0, highwater - next_offset))
        self.events_processed += len(fetched)
        logger.debug("Batch of %d events: %d outputs, %d dead letters, %d waves", len(fetched), produced,
                     len(dead), result.waves)

    def _count_retry(self, operation: str) -> None:
        self.metrics.broker_retries.labels(operation=operation).inc()


def _format_partitions(partitions: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


async def run_service(settings: Settings) -> None:
    """Run a service until SIGTERM or SIGINT."""
    service = StreamerService(settings)
    service.install_signal_handlers()
    await service.run()
