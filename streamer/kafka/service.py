"""The Kafka consumer-group service: fetch -> decode -> step -> produce -> checkpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (CommitFailedError, IllegalOperation, IllegalStateError, InvalidSessionTimeoutError,
                             KafkaError, MessageSizeTooLargeError, ProducerFenced, RecordListTooLargeError)

from streamer import __version__
from streamer.backtest.file_replay import event_format_for
from streamer.config import Settings
from streamer.engine import Engine, EventBatch, StepResult
from streamer.engine.gc_pause import scheduled_collection
from streamer.errors import BrokerError, ConfigError, StateError
from streamer.io.events import DeadLetter, EventDecoder
from streamer.io.outputs import HEADER_VALUE_OMITTED, dead_letter_headers, encode_outputs, topic_source
from streamer.kafka.admin import (TOPIC_MAX_MESSAGE_BYTES, TopicSpec, ensure_partitions, ensure_topics,
                                  max_message_bytes)
from streamer.kafka.assignor import CopartitionedStickyAssignor
from streamer.kafka.checkpoint import Checkpointer, PreparedCheckpoint
from streamer.kafka.fetched import FetchedBatch, stream_numbers
from streamer.kafka.producer import KeyPartitioner, OutgoingRecords, estimate_record_bytes, send_records
from streamer.kafka.restore import OTHER_MODEL_CAUSES, restore_partition
from streamer.kafka.retry import retry
from streamer.kafka.security import KafkaSecurity
from streamer.log_filters import DeadLetterLog
from streamer.metrics import MetricsServer, StreamerMetrics
from streamer.model import RecurrentModel, load_model
from streamer.state.changelog import StateCodec, changelog_topic
from streamer.state.arena import NO_OFFSET
from streamer.state.snapshot import Snapshot, read_snapshot, write_snapshot

logger = logging.getLogger(__name__)

# Exceptions outside KafkaError that aiokafka raises for a call its transaction state does not allow, as after
# the broker aborted the transaction at its timeout and fenced the producer: "Not in the middle of a
# transaction" (IllegalOperation) or an invalid state transition (AssertionError).
TRANSACTION_STATE_ERRORS = (IllegalOperation, AssertionError)
LIVENESS_STALL_S = 60.0  # the loop is considered stuck when it has not polled for this long
TRANSACTION_TIMEOUT_MS = 15_000
MAX_IN_FLIGHT_BATCHES = 8  # at-least-once batches sent but not yet acknowledged, before the loop waits
# The producer's record batches stay within this size, header included, unless one record is larger.
PRODUCER_BATCH_BYTES = 1 << 20
RETRY_SHOWN_S = 30.0  # /readyz names a retried broker call this long before the first assignment
LAG_UPDATE_INTERVAL_S = 1.0  # idle partitions get their lag exported this often
BROKER_PROBE_INTERVAL_S = 10.0  # a metadata request checks that the cluster responds, even with no traffic
DEFAULT_HEARTBEAT_INTERVAL_MS = 3000  # the Kafka consumer's default; shorter sessions get a third of theirs


@dataclass
class _InFlightBatch:
    """Outputs and dead letters handed to the producer, with the future of their acknowledgement."""

    outputs: OutgoingRecords
    letters: OutgoingRecords
    acknowledged: asyncio.Future


class RejoinRequired(Exception):
    """The producer was fenced or a transaction failed: in-memory state no longer matches what is durable."""


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, service: StreamerService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self._service.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        await self._service.on_partitions_assigned(set(assigned))


class StreamerService:
    """One member of a Kafka consumer group serving a recurrent model.

    At-least-once (default): outputs are acknowledged before the checkpoint writes state and commits the
    input offsets, so a crash replays events instead of losing them. Exactly-once: each checkpoint is one
    Kafka transaction holding the outputs, dead letters, changelog records and input offsets. With the
    changelog on, a newly assigned partition stays paused until its states are restored.
    """

    def __init__(self, settings: Settings, *, model: RecurrentModel | None = None,
                 metrics: StreamerMetrics | None = None) -> None:
        if settings.model is None and model is None:
            raise ConfigError("No model: pass --model or set STREAMER_MODEL")
        if settings.output_topic in settings.input_topics or settings.dead_letter_topic in settings.input_topics:
            raise ConfigError("The output and dead-letter topics must differ from the input topics")
        if settings.dead_letter_topic == settings.output_topic:
            raise ConfigError(f"The dead-letter topic must differ from the output topic {settings.output_topic}")
        if not settings.input_topics:
            raise ConfigError("No input topics: pass --input-topics or set STREAMER_INPUT_TOPICS")
        if settings.snapshot_dir is not None and not settings.changelog:
            raise ConfigError("--snapshot-dir needs --changelog: a snapshot contains the changelog's states up to an "
                              "offset, so that a restore reads only the changelog records after it")
        if settings.snapshot_dir is not None and settings.snapshot_dir.exists() and not settings.snapshot_dir.is_dir():
            raise ConfigError(f"Snapshot directory {settings.snapshot_dir} is a file: choose a directory")
        if settings.changelog and len(settings.input_topics) != 1:
            raise ConfigError("The changelog needs exactly one input topic, because state records are placed "
                              "by input partition number")
        self.settings = settings
        self.security = KafkaSecurity.from_settings(settings)
        self.exactly_once = settings.guarantee == "exactly-once"
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model = model or load_model(settings.model, seq_len=settings.seq_len, device=settings.device)
        self.decoder = EventDecoder(event_format_for(self.model, settings.max_record_bytes, settings.entity_field))
        self.metrics = metrics or StreamerMetrics()
        self.metrics.set_build_info(__version__, self.model.fingerprint, settings.semantics, "service")
        self.changelog_topic = changelog_topic(settings.group_id) if settings.changelog else None
        self.engine = self._new_engine()
        self.codec = StateCodec(self.engine.arena.row_shapes, settings.semantics) if settings.changelog else None
        self.state_fingerprint = self.model.state_fingerprint(settings.semantics)  # carried by state records
        self.metrics_server: MetricsServer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.checkpointer: Checkpointer | None = None
        self._assignment: set[TopicPartition] = set()
        self._joined = False  # whether the group has assigned partitions (possibly none) since the last join
        self._dropping = False  # whether the member is dropping its state to rejoin the group
        self._rebalancing = False  # between the revocation of a rebalance and its assignment
        # Revoked partitions whose entities stay in memory until the next assignment, with the offset
        # committed for each when it was revoked (see on_partitions_revoked).
        self._parked: dict[TopicPartition, int | None] = {}
        self._restores: dict[TopicPartition, asyncio.Task] = {}
        self._batch_lock = asyncio.Lock()
        self._stop_requested = asyncio.Event()
        self._stop_deadline: float | None = None
        self._last_poll = time.monotonic()
        self._input_partitions: dict[str, int] = {}
        # max.message.bytes of the output and dead-letter topics, read at start: record batches stay below it.
        self._max_message_bytes: dict[str, int] = {}
        self._dead_letter_log = DeadLetterLog(logger)
        self._changelog_partitions = 0
        self._changelog_partitions_lock = asyncio.Lock()
        self._output_partitioner: KeyPartitioner | None = None
        self._dead_letter_partitioner: KeyPartitioner | None = None
        self._transactional_id = f"{settings.group_id}-{settings.group_instance_id or uuid.uuid4().hex[:12]}"
        if self.exactly_once and self.changelog_topic is None:
            logger.warning("Exactly-once without --changelog: each output is written once, but a restarted member "
                           "starts its entities from zero state, so outputs after a restart differ from an "
                           "uninterrupted run")
        if self.exactly_once and settings.group_instance_id is None:
            logger.warning("Exactly-once without a group instance id: the transactional id %s is new on every "
                           "start, so a restarted member cannot fence its predecessor. Set --group-instance-id "
                           "(STREAMER_GROUP_INSTANCE_ID) to a stable name per member", self._transactional_id)
        self.events_processed = 0
        self._rejoin_reason: str | None = None
        self._fatal_error: StateError | None = None
        self._final_checkpoint_failure: str | None = None  # why the last checkpoint of a stop did not happen
        self._last_checkpoint_error: Exception | None = None  # of the latest at-least-once checkpoint that failed
        self._in_flight: deque[_InFlightBatch] = deque()
        # Why the producer must be replaced before its next use: the broker rejected its batches in a way that
        # only a new producer recovers from, or its transaction failed.
        self._producer_unusable: str | None = None
        self._background_checkpoint: asyncio.Task | None = None
        self._last_snapshot = time.monotonic()
        self._last_lag_update = 0.0
        self._broker_probe: asyncio.Task | None = None
        self._lag_update: asyncio.Task | None = None
        self._broker_reachable: bool | None = None  # unknown until the first probe
        self._last_retry: tuple[str, float] | None = None  # the latest broker call retried, and when
        self._evictions_seen = 0
        self._expirations_seen = 0

    def _new_engine(self) -> Engine:
        settings = self.settings
        return Engine(self.model, settings.semantics, capacity=settings.max_entities,
                      idle_expiry_ms=settings.idle_expiry_ms)

    # -- health ------------------------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        idle_s = time.monotonic() - self._last_poll
        if idle_s > LIVENESS_STALL_S:
            return False, f"the consumer loop has not polled for {idle_s:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Ready once the group gave this member an assignment and its partitions are restored.

        An empty assignment counts: in a group with more members than input partitions, the extra members
        stand by, and a readiness probe that failed for them would stall rolling updates.
        """
        if not self._joined:
            cluster = self.settings.bootstrap_servers
            if self._broker_reachable is False:
                return False, f"waiting for the Kafka cluster at {cluster}, which does not respond"
            if self._last_retry is not None and time.monotonic() - self._last_retry[1] < RETRY_SHOWN_S:
                return False, f"waiting for the Kafka cluster at {cluster}: retrying {self._last_retry[0]}"
            return False, "waiting for the first partition assignment"
        if self._rebalancing:
            return False, "rebalancing: partitions revoked, waiting for the assignment"
        if self._restores:
            return False, f"restoring {_count_partitions(len(self._restores))}"
        if not self._assignment:
            return True, "ready: no partitions assigned, standing by"
        return True, f"ready: {_count_partitions(len(self._assignment))} assigned"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def request_stop(self, reason: str = "Stop requested") -> None:
        """Ask the service to stop: no more fetches; the in-flight batch is finished and checkpointed."""
        if not self._stop_requested.is_set():
            logger.info("%s; finishing the in-flight batch (deadline %.0f s)", reason,
                        self.settings.shutdown_timeout_s)
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self._stop_requested.set()

    def _past_deadline(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def _acknowledgement_timeout_s(self) -> float:
        """Return how long to wait for the broker's acknowledgement: twice the request timeout, and after a
        stop request no longer than the shutdown deadline."""
        timeout_s = 2 * self.settings.request_timeout_ms / 1000
        if self._stop_deadline is not None:
            timeout_s = min(timeout_s, max(0.1, self._stop_deadline - time.monotonic()))
        return timeout_s

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, f"{signal.Signals(signum).name} received")

    async def run(self) -> None:
        """Start, process batches until a stop is requested, then shut down.

        A fenced producer or a failed transaction drops all in-memory state, leaves the group and joins it
        again, so the state is restored from what the changelog made durable.

        Shutdown, bounded by ``shutdown_timeout_s`` from the stop request:
        1. Stop fetching; the in-flight batch finishes, then a last checkpoint makes it durable.
        2. Flush the producer.
        3. Stop the consumer, which leaves the group (static members keep their assignment until the session
           times out).
        4. Stop the producer and the metrics server.
        """
        logger.info("Starting streamer %s: %s", __version__, self.settings.effective())
        logger.info("Kafka clients connect to %s over %s", self.settings.bootstrap_servers, self.security.describe())
        logger.info("Model %s: %s; %s semantics", self.model.fingerprint, self.model.manifest.describe(),
                    self.settings.semantics)
        self.metrics_server = MetricsServer(self.metrics, self.settings.metrics_host, self.settings.metrics_port,
                                            liveness=self.liveness, readiness=self.readiness)
        try:
            self.metrics_server.start()
        except OSError as error:
            raise ConfigError(f"{error.strerror}; choose another --metrics-port (STREAMER_METRICS_PORT), or 0 for "
                              "any free port") from error
        try:
            await self._unless_stopped(self._ensure_topics(), "the topics were ready")
            while not self._stop_requested.is_set():
                if not await self._unless_stopped(self._start_clients(), "the Kafka clients started"):
                    break
                try:
                    with scheduled_collection(on_pause=self.metrics.gc_pause_seconds.observe) as collector:
                        while not self._stop_requested.is_set():
                            await self._poll_once()
                            collector.maybe_collect()
                        # Step 1
                        if not await self._until_deadline(self._final_checkpoint(), "Final checkpoint"):
                            self._final_checkpoint_failure = "it did not finish before the shutdown deadline"
                except RejoinRequired as error:
                    await self._drop_and_rejoin(error)
        finally:
            await self._shutdown()
        if self._fatal_error is not None:
            raise self._fatal_error
        if self._final_checkpoint_failure is not None:
            # The non-zero exit shows the supervisor that events after the committed offsets are processed again.
            raise BrokerError(f"Stopped without a final checkpoint ({self._final_checkpoint_failure}); the next "
                              "owners of its partitions process the events after the committed offsets again")

    async def _unless_stopped(self, step: Awaitable[None], stage: str) -> bool:
        """Await a start-up step; return False when its retries ended because a stop was requested."""
        try:
            await step
            return True
        except BrokerError as error:
            if not self._stop_requested.is_set():
                raise
            logger.info("Stopped before %s: %s", stage, error)
            return False

    def _new_producer(self) -> AIOKafkaProducer:
        settings = self.settings
        producer_options = dict(
            bootstrap_servers=settings.bootstrap_servers, **self.security.client_options(),
            client_id=settings.client_id, enable_idempotence=True, acks="all",
            linger_ms=settings.linger_ms,
            compression_type=None if settings.compression_type == "none" else settings.compression_type,
            max_batch_size=PRODUCER_BATCH_BYTES, max_request_size=TOPIC_MAX_MESSAGE_BYTES,
            request_timeout_ms=settings.request_timeout_ms, metadata_max_age_ms=settings.metadata_max_age_ms,
        )
        if self.exactly_once:
            producer_options["transactional_id"] = self._transactional_id
            # An abandoned transaction blocks read_committed readers and restores until this timeout ends it.
            producer_options["transaction_timeout_ms"] = TRANSACTION_TIMEOUT_MS
        return AIOKafkaProducer(**producer_options)

    async def _start_clients(self) -> None:
        settings = self.settings
        self.producer = self._new_producer()
        self._producer_unusable = None
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, **self.security.client_options(),
            client_id=settings.client_id, group_id=settings.group_id,
            group_instance_id=settings.group_instance_id, enable_auto_commit=False,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(1, min(DEFAULT_HEARTBEAT_INTERVAL_MS, settings.session_timeout_ms // 3)),
            auto_offset_reset=settings.auto_offset_reset, max_poll_records=settings.max_batch_events,
            fetch_max_wait_ms=settings.fetch_max_wait_ms, fetch_min_bytes=settings.fetch_min_bytes,
            request_timeout_ms=max(settings.request_timeout_ms, 40_000),
            metadata_max_age_ms=settings.metadata_max_age_ms,
            max_partition_fetch_bytes=TOPIC_MAX_MESSAGE_BYTES, isolation_level="read_committed",
            # NOTE: one assignor only. aiokafka 0.14 sends a JoinGroup per listed assignor, each with a longer
            # protocol list, and members joining together then rebalance again and again.
            partition_assignment_strategy=(CopartitionedStickyAssignor(),),
        )
        await retry("producer start", self.producer.start, timeout_s=settings.request_timeout_ms / 1000,
                    stopping=self._stop_requested.is_set, on_retry=self._count_retry)
        await retry("consumer start", self.consumer.start, timeout_s=settings.request_timeout_ms / 1000,
                    stopping=self._stop_requested.is_set, on_retry=self._count_retry)
        self.checkpointer = Checkpointer(
            producer=self.producer, consumer=self.consumer, arena=self.engine.arena, codec=self.codec,
            fingerprint=self.state_fingerprint, changelog_topic=self.changelog_topic, group_id=settings.group_id,
            exactly_once=self.exactly_once, metrics=self.metrics, interval_ms=settings.checkpoint_interval_ms,
            max_events=settings.checkpoint_events, timeout_s=2 * settings.request_timeout_ms / 1000)
        self.consumer.subscribe(settings.input_topics, listener=_RebalanceListener(self))
        self.metrics.broker_reachable.set(1)  # both clients have just fetched the cluster's metadata
        self._broker_probe = asyncio.create_task(self._probe_broker_periodically(self.consumer))

    async def _ensure_topics(self) -> None:
        settings = self.settings
        large = {"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)}
        specs = [TopicSpec(topic, settings.topic_partitions, settings.replication_factor, large)
                 for topic in settings.input_topics]
        specs.append(TopicSpec(settings.output_topic, settings.topic_partitions, settings.replication_factor))
        specs.append(TopicSpec(settings.dead_letter_topic, settings.topic_partitions, settings.replication_factor,
                               large))
        counts = await self._create_topics(specs)
        self._input_partitions = {topic: counts[topic] for topic in settings.input_topics}
        for topic, count in sorted(self._input_partitions.items()):
            if count != settings.topic_partitions:
                logger.warning("Input topic %s has %d partitions, not the %d of --topic-partitions, which applies "
                               "only to topics the service creates", topic, count, settings.topic_partitions)
        self._output_partitioner = KeyPartitioner(counts[settings.output_topic])
        self._dead_letter_partitioner = KeyPartitioner(counts[settings.dead_letter_topic])
        self._max_message_bytes = await retry(
            "read topic configs",
            lambda: max_message_bytes(settings.bootstrap_servers, [settings.output_topic, settings.dead_letter_topic],
                                      settings.request_timeout_ms, security=self.security),
            timeout_s=3 * settings.request_timeout_ms / 1000, stopping=self._stop_requested.is_set,
            on_retry=self._count_retry)
        if self.changelog_topic is not None:
            # Same partition count as the input: an entity's state record goes to its events' partition number.
            input_partitions = counts[settings.input_topics[0]]
            compacted = {"cleanup.policy": "compact", "max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)}
            changelog = await self._create_topics(
                [TopicSpec(self.changelog_topic, input_partitions, settings.replication_factor, compacted)])
            self._changelog_partitions = changelog[self.changelog_topic]
            if self._changelog_partitions > input_partitions:
                raise ConfigError(
                    f"Changelog topic {self.changelog_topic} has {self._changelog_partitions} partitions, more than "
                    f"the {input_partitions} of {settings.input_topics[0]}: the input topic was recreated with fewer "
                    "partitions, so the recorded states belong to other partitions; delete the changelog topic or "
                    "use another group")
            await self._ensure_changelog_partitions(input_partitions)

    async def _ensure_changelog_partitions(self, count: int) -> None:
        """Give the changelog at least ``count`` partitions, as partitions added to the input topic need.

        The added changelog partitions are empty, which is the state of the added input partitions.
        """
        async with self._changelog_partitions_lock:
            if self._changelog_partitions >= count:
                return
            settings = self.settings
            self._changelog_partitions = await retry(
                "add changelog partitions",
                lambda: ensure_partitions(settings.bootstrap_servers, self.changelog_topic, count,
                                          settings.request_timeout_ms, security=self.security),
                timeout_s=3 * settings.request_timeout_ms / 1000, max_attempts=5,
                stopping=self._stop_requested.is_set, on_retry=self._count_retry)
            if self.producer is not None:
                await self._await_producer_metadata(self.changelog_topic, count)

    async def _await_producer_metadata(self, topic: str, count: int) -> None:
        """Refresh the producer's metadata until it lists ``count`` partitions of ``topic``.

        aiokafka rejects a record batch for a partition missing from its metadata with an AssertionError, and
        without a refresh its metadata would take up to ``metadata_max_age_ms`` to show partitions just added.
        """
        client = self.producer.client
        timeout_s = self.settings.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout_s

        def too_few() -> bool:
            return len(client.cluster.partitions_for_topic(topic) or ()) < count

        while too_few():
            if time.monotonic() > deadline:
                raise BrokerError(f"The producer's metadata still shows fewer than {count} partitions of {topic} "
                                  f"after {self.settings.request_timeout_ms} ms")
            await asyncio.wait_for(client.force_metadata_update(), timeout_s)
            if too_few():
                await asyncio.sleep(0.05)  # the broker may take a moment to list partitions just added

    async def _create_topics(self, specs: list[TopicSpec]) -> dict[str, int]:
        settings = self.settings
        return await retry("create topics",
                           lambda: ensure_topics(settings.bootstrap_servers, specs, settings.request_timeout_ms,
                                                 security=self.security),
                           timeout_s=3 * settings.request_timeout_ms / 1000, stopping=self._stop_requested.is_set,
                           on_retry=self._count_retry)

    async def _final_checkpoint(self) -> None:
        try:
            async with self._batch_lock:
                self._last_checkpoint_error = None
                succeeded = await self._checkpoint()
        except (BrokerError, KafkaError, asyncio.TimeoutError, RejoinRequired) as error:
            logger.warning("Final checkpoint failed; uncommitted events will be replayed: %r", error)
            self._final_checkpoint_failure = f"it failed: {error!r}"
            return
        if succeeded:
            committed = {tp: offset for tp, offset in self.checkpointer.committed_offsets.items()
                         if tp in self._assignment and offset is not None}
            logger.info("Final checkpoint done; committed offsets %s",
                        ", ".join(f"{_format_partition(tp)}@{offset}"
                                  for tp, offset in sorted(committed.items())) or "none")
        elif self._last_checkpoint_error is not None:
            self._final_checkpoint_failure = f"it failed: {self._last_checkpoint_error!r}"

    async def _drop_and_rejoin(self, error: Exception) -> None:
        logger.warning("Dropping in-memory state and rejoining the group: %r", error)
        self._dropping = True
        try:
            await self._drop_state()
        finally:
            self._dropping = False

    async def _drop_state(self) -> None:
        self.metrics.resets.inc()
        for task in self._restores.values():
            task.cancel()
        self._restores.clear()
        await self._cancel_background_checkpoint()
        self._in_flight.clear()
        if self.checkpointer is not None:
            await self._abort_quietly()
        await self._stop_clients()
        self.engine = self._new_engine()
        self._joined = False
        self._rebalancing = False
        self._assignment.clear()
        self._parked.clear()
        self.metrics.assigned_partitions.set(0)
        self.metrics.state_entities.set(0)

    async def _stop_clients(self) -> None:
        for task in (self._broker_probe, self._lag_update):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._broker_probe = self._lag_update = None
        if self.consumer is not None and await self._until_deadline(self.consumer.stop(), "Consumer leaving the group"):
            if self._dropping:
                logger.info("Closed the consumer to join group %s again", self.settings.group_id)
            elif self.settings.group_instance_id is None:
                logger.info("Left consumer group %s", self.settings.group_id)
            else:
                logger.info("Stopped static member %s of group %s: its partitions move after the session timeout "
                            "unless it returns", self.settings.group_instance_id, self.settings.group_id)
        if self.producer is not None:
            await self._until_deadline(self.producer.stop(), "Producer stop")
        self.consumer = self.producer = None

    async def _shutdown(self) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
        for task in self._restores.values():
            task.cancel()
        # A background checkpoint still running here belongs to a loop that stopped on an error.
        await self._cancel_background_checkpoint()
        # Step 2
        if self.producer is not None:
            await self._until_deadline(self.producer.flush(), "Producer flush")
        # Steps 3 and 4
        await self._stop_clients()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._dead_letter_log.flush(force=True)
        logger.info("Stopped after %d events", self.events_processed)

    async def _until_deadline(self, call, operation: str) -> bool:
        """Await one shutdown step; return whether it finished, or log a warning at the deadline or an error."""
        deadline = self._stop_deadline or time.monotonic() + self.settings.shutdown_timeout_s
        remaining_s = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(call, remaining_s)
            return True
        except (asyncio.TimeoutError, KafkaError) as error:
            logger.warning("%s did not finish before the shutdown deadline: %r", operation, error)
        except asyncio.CancelledError as error:
            # aiokafka's stop can end with the CancelledError of one of its own tasks, for example when the
            # broker is gone. Only a cancellation of this task itself goes on up.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            logger.warning("%s ended with a cancelled Kafka client task: %r", operation, error)
        return False

    # -- rebalances --------------------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Checkpoint what was processed, then park the revoked partitions' entities or drop them.

        aiokafka revokes every partition at each rebalance, and the next assignment often gives many of them
        back. After a successful checkpoint, the entities of a revoked partition stay in memory ("parked")
        with the offset committed for it. ``on_partitions_assigned`` keeps them when the partition comes back
        with that offset still committed: then no other member committed progress on it in between.
        Partitions whose checkpoint failed or whose restore was still running are dropped here.
        """
        if not revoked:
            return
        self._rebalancing = True
        restoring = set()
        for tp in revoked & set(self._restores):
            self._restores.pop(tp).cancel()
            restoring.add(tp.partition)
            self.metrics.restore_anomalies.labels(kind="rebalance_during_restore").inc()
            logger.info("Restore of %s cancelled by a rebalance", _format_partition(tp))
        async with self._batch_lock:
            checkpointed = False
            try:
                # While the member drops its state to rejoin, its transaction is being aborted: nothing to save.
                checkpointed = False if self._dropping else await self._checkpoint()
            except RejoinRequired as error:
                logger.warning("Checkpoint before revocation failed, the new owners replay: %r", error)
                await self._abort_quietly()
                # A fenced producer stays in a fatal state. The consumer joins the group anyway, so only the
                # producer is replaced, before its next transaction.
                self._producer_unusable = f"the checkpoint before a revocation failed: {error}"
            except (BrokerError, KafkaError, asyncio.TimeoutError) as error:
                logger.warning("Checkpoint before revocation failed, the new owners replay: %r", error)
            committed = self.checkpointer.committed_offsets if checkpointed else {}
            parkable = {tp for tp in revoked if tp in committed and tp.partition not in restoring}
            # The arena keys entities by partition number only. With several input topics, a dropped partition
            # number drops that number's entities of every topic, which the assignor gives to one member.
            dropped_numbers = {tp.partition for tp in revoked - parkable}
            self._parked = {tp: committed[tp] for tp in parkable if tp.partition not in dropped_numbers}
            dropped = self._drop_partitions(dropped_numbers, revoked - self._parked.keys())
            self._assignment -= revoked
            for tp in revoked:
                self.metrics.remove_partition(tp.topic, tp.partition)
            self.metrics.assigned_partitions.set(len(self._assignment))
        logger.info("Partitions revoked: %s; dropped %d entities, %d stay in memory until the assignment",
                    _format_partitions(revoked), dropped, len(self.engine.arena))

    def _drop_partitions(self, numbers: set[int], partitions: set[TopicPartition]) -> int:
        """Remove the entities of partition ``numbers`` and forget the offsets committed for ``partitions``."""
        dropped = self.engine.arena.remove_partitions(numbers) if numbers else 0
        self.engine.arena.drain_removed()
        if self.checkpointer is not None:
            self.checkpointer.forget(partitions)
        self.metrics.state_entities.set(len(self.engine.arena))
        return dropped

    async def _keep_parked(self, assigned: set[TopicPartition]) -> tuple[set[TopicPartition], set[TopicPartition]]:
        """Keep the parked partitions assigned back with their committed offsets unchanged; drop the others.

        Returns the kept partitions and the ones this call paused (the parked partitions assigned back),
        which the caller resumes unless they must be restored.
        """
        parked, self._parked = self._parked, {}
        returned = assigned & parked.keys()
        # Paused before any await, so that the fetch loop processes none of them before the check.
        self.consumer.pause(*returned)
        unchanged = set()
        async with self._batch_lock:
            try:
                for tp in returned:
                    if await self.consumer.committed(tp) == parked[tp]:
                        unchanged.add(tp)
            except (KafkaError, asyncio.TimeoutError) as error:
                logger.warning("Reading the committed offsets of partitions assigned back failed, dropping "
                               "their entities: %r", error)
                unchanged = set()
            stale_numbers = {tp.partition for tp in parked.keys() - unchanged}
            unchanged = {tp for tp in unchanged if tp.partition not in stale_numbers}
            dropped = self._drop_partitions(stale_numbers, parked.keys() - unchanged)
        logger.info("Partitions assigned back unchanged, whose entities stay: %s; dropped %d entities",
                    _format_partitions(unchanged), dropped)
        return unchanged, returned

    async def _abort_quietly(self) -> None:
        """Abort the open transaction; a failure is logged, as the transaction ends by timeout anyway.

        A fenced producer is in a fatal state in which aiokafka rejects the abort with an AssertionError;
        the rejoin that follows starts a new producer.
        """
        try:
            await self.checkpointer.abort()
        except (KafkaError, asyncio.TimeoutError, *TRANSACTION_STATE_ERRORS) as error:
            logger.warning("Aborting the open transaction failed: %r", error)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Record the assignment; with the changelog on, pause new partitions until their state is restored.

        Parked partitions assigned back unchanged keep their entities and are not restored.
        """
        if self._dropping:
            # The consumer that was given these partitions stops next; its successor gets them again.
            logger.info("Partitions assigned while the member drops its state to rejoin, left to the next "
                        "assignment: %s", _format_partitions(assigned))
            return
        self._joined = True
        self._rebalancing = False
        self._count_input_partitions(assigned)
        kept_back, returned = await self._keep_parked(assigned) if self._parked else (set(), set())
        new = assigned - self._assignment - kept_back
        self._assignment |= assigned
        self.metrics.assigned_partitions.set(len(self._assignment))
        self.metrics.rebalances.inc()  # each rebalance ends with one assignment, possibly empty
        logger.info("Partitions assigned: %s", _format_partitions(assigned))
        if self.changelog_topic is not None and new:
            # Pause and register before any await, so the fetch loop never processes these partitions unrestored.
            self.consumer.pause(*new)
            for tp in new:
                self._restores[tp] = asyncio.create_task(self._restore(tp),
                                                         name=f"restore-{tp.topic}-{tp.partition}")
            self.metrics.restore_partitions_in_progress.set(len(self._restores))
        resumed = returned if self.changelog_topic is None else returned - new
        if resumed:
            self.consumer.resume(*resumed)
        await self._check_retained_offsets(new)

    def _count_input_partitions(self, assigned: set[TopicPartition]) -> None:
        """Update the partition counts of the input topics with partitions added since the start.

        The counts decide how outputs are partitioned: by the input's partition number only while the input and
        output topics have equal counts, and by key otherwise.
        """
        for topic, count in self._input_partitions.items():
            known = self.consumer.partitions_for_topic(topic) or set()
            grown = max([count, len(known)] + [tp.partition + 1 for tp in assigned if tp.topic == topic])
            if grown > count:
                logger.info("Input topic %s now has %d partitions (had %d)", topic, grown, count)
                self._input_partitions[topic] = grown

    async def _check_retained_offsets(self, partitions: set[TopicPartition]) -> None:
        """Log and count partitions whose committed offset is below the log start, because records were deleted.

        Also log partitions whose committed offset is past the log end, as after a topic was deleted and
        created again.

        Also records each partition's committed offset as the checkpointer's, unless a checkpoint already
        committed a newer one, so that a partition revoked before its first commit can be parked.
        """
        if not partitions:
            return
        try:
            beginnings = await self.consumer.beginning_offsets(list(partitions))
            ends = await self.consumer.end_offsets(list(partitions))
            for tp in partitions:
                committed = await self.consumer.committed(tp)
                if self.checkpointer is not None:
                    self.checkpointer.committed_offsets.setdefault(tp, committed)
                if committed is not None and committed < beginnings[tp]:
                    self.metrics.restore_anomalies.labels(kind="offsets_not_retained").inc()
                    logger.warning("Committed offset %d of %s is no longer retained (log starts at %d); "
                                   "events in between are lost and processing resumes at the log %s",
                                   committed, tp, beginnings[tp], self._reset_position)
                if committed is not None and committed > ends[tp]:
                    logger.warning("Committed offset %d of %s is past the log end %d, as after the topic was deleted "
                                   "and created again; processing restarts at the log %s", committed,
                                   _format_partition(tp), ends[tp], self._reset_position)
        except (KafkaError, asyncio.TimeoutError) as error:
            logger.warning("Checking retained offsets failed: %r", error)

    @property
    def _reset_position(self) -> str:
        """Return where the consumer starts a partition without a valid committed offset: the log's start or end."""
        return "start" if self.settings.auto_offset_reset == "earliest" else "end"

    async def _check_restored_offsets(self, tp: TopicPartition) -> None:
        """Forget the restored last offsets of ``tp`` if they reach past its log end.

        An event's offset is always below the end of its log, so such states were recorded before the topic
        was deleted and created again. The new log's offsets start below theirs, so kept, they would make the
        new events count as duplicates.
        """
        arena = self.engine.arena
        if not arena.occupied_slots(tp.partition).size:
            return
        end = (await self.consumer.end_offsets([tp]))[tp]
        # Read after the request: meanwhile, batches of other partitions may have evicted entities of this one
        # and given their slots to others.
        slots = arena.occupied_slots(tp.partition)
        past = int(np.count_nonzero(arena.last_offset[slots] >= end))
        if past:
            self.metrics.restore_anomalies.labels(kind="offsets_past_end").inc()
            logger.warning("%d restored entities of %s have last applied offsets past the log end %d, as after the "
                           "topic was deleted and created again; their states go on, and every event of the new log "
                           "applies", past, _format_partition(tp), end)
            arena.last_offset[slots] = NO_OFFSET

    async def _restore(self, tp: TopicPartition) -> None:
        settings = self.settings
        logger.info("Restoring state of %s from %s[%d]", _format_partition(tp), self.changelog_topic, tp.partition)
        try:
            await self._ensure_changelog_partitions(tp.partition + 1)
            start_offset = await self._load_snapshot(tp.partition)
            result = await restore_partition(
                bootstrap_servers=settings.bootstrap_servers, security=self.security, topic=self.changelog_topic,
                partition=tp.partition,
                codec=self.codec, arena=self.engine.arena, fingerprint=self.state_fingerprint,
                mismatch_policy=settings.model_mismatch, request_timeout_ms=settings.request_timeout_ms,
                start_offset=start_offset)
        except asyncio.CancelledError:
            raise
        except StateError as error:
            logger.error("Restore of %s failed, stopping: %s", _format_partition(tp), error)
            self._fatal_error = error
            self.request_stop("Stopping after the failed restore")
            return
        except (KafkaError, BrokerError, asyncio.TimeoutError, OSError) as error:
            logger.warning("Restore of %s failed, rejoining: %r", _format_partition(tp), error)
            self._restores.pop(tp, None)
            self.metrics.restore_partitions_in_progress.set(len(self._restores))
            self._rejoin_reason = f"the restore of {_format_partition(tp)} failed: {error!r}"
            return
        except Exception as error:
            # A task's exception is seen only when the task is awaited, which nothing does for a restore: without
            # this, the partition would stay paused, and the member not ready, with nothing in the log.
            logger.exception("Restore of %s failed with an unexpected error, stopping", _format_partition(tp))
            self._fatal_error = StateError(f"The restore of {_format_partition(tp)} failed: {error!r}")
            self.request_stop("Stopping after the failed restore")
            return
        try:
            await self._check_restored_offsets(tp)
        except (KafkaError, asyncio.TimeoutError) as error:
            logger.warning("Checking the restored offsets of %s failed: %r", _format_partition(tp), error)
        for kind, count in result.anomalies.items():
            self.metrics.restore_anomalies.labels(kind=kind).inc(count)
        mismatched = result.anomalies.get("model_mismatch", 0)
        if mismatched:
            logger.warning("Discarded the state of %d entities of %s made by another model (--model-mismatch "
                           "reset), that is, %s; they start from zero state", mismatched, _format_partition(tp),
                           OTHER_MODEL_CAUSES)
        self.metrics.restored_records.inc(result.records)
        self.metrics.restore_duration_seconds.observe(result.duration_s)
        self.metrics.state_entities.set(len(self.engine.arena))
        if self._restores.get(tp) is asyncio.current_task():
            del self._restores[tp]
            if tp in self._assignment:
                self.consumer.resume(tp)
        self.metrics.restore_partitions_in_progress.set(len(self._restores))
        logger.info("Restored %s: %d entities, %d changelog records read in %.2f s", _format_partition(tp),
                    result.entities, result.records, result.duration_s)

    async def _load_snapshot(self, partition: int) -> int | None:
        """Load the partition's snapshot into the arena; return the changelog offset to continue from."""
        if self.settings.snapshot_dir is None:
            return None
        snapshot = await asyncio.to_thread(read_snapshot, self.settings.snapshot_dir, self.changelog_topic, partition)
        if snapshot is None:
            return None
        usable = (snapshot.fingerprint == self.state_fingerprint and snapshot.semantics == self.settings.semantics
                  and snapshot.rows.shape[1:] == (self.codec.floats,))
        if not usable:
            logger.info("Ignoring the snapshot of %s[%d]: made by another model or semantics",
                        self.changelog_topic, partition)
            return None
        self.engine.arena.load(snapshot.entities, partition, snapshot.steps, snapshot.last_offsets,
                               snapshot.last_ts_ms, self.codec.split_rows(snapshot.rows))
        logger.info("Loaded the snapshot of %s[%d]: %d entities, changelog offsets below %d", self.changelog_topic,
                    partition, len(snapshot.entities), snapshot.next_offset)
        return snapshot.next_offset

    async def _maybe_snapshot(self) -> None:
        """Write one snapshot per owned, restored partition when the snapshot interval has passed.

        Runs right after a checkpoint, when every entity's state equals its latest changelog record. The
        changelog's read_committed end offset can only lag the records written, so a restore may re-read a
        few records the snapshot holds, which is harmless, but never skips one it lacks.
        """
        if not self._snapshot_due():
            return
        settings = self.settings
        self._last_snapshot = time.monotonic()
        self._last_lag_update = 0.0
        partitions = sorted({tp.partition for tp in self._assignment if tp not in self._restores})
        tps = [TopicPartition(self.changelog_topic, partition) for partition in partitions]
        try:
            ends = await self.consumer.end_offsets(tps)
        except (KafkaError, asyncio.TimeoutError) as error:
            logger.warning("Skipping snapshots: the changelog end offsets are unavailable: %r", error)
            return
        arena = self.engine.arena
        for tp in tps:
            slots = arena.occupied_slots(tp.partition)
            snapshot = Snapshot(topic=self.changelog_topic, partition=tp.partition, next_offset=ends[tp],
                                fingerprint=self.state_fingerprint, semantics=settings.semantics,
                                created_s=time.time(), entities=[arena.entity_of(slot) for slot in slots.tolist()],
                                steps=arena.steps[slots], last_offsets=arena.last_offset[slots],
                                last_ts_ms=arena.last_event_ms[slots], rows=arena.export_rows(slots))
            await asyncio.to_thread(write_snapshot, settings.snapshot_dir, snapshot)
        logger.debug("Wrote snapshots of changelog partitions %s", partitions)

    # -- the batch ---------------------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        if self._rejoin_reason is not None:
            reason, self._rejoin_reason = self._rejoin_reason, None
            raise RejoinRequired(reason)
        try:
            records = await self.consumer.getmany(timeout_ms=100, max_records=self.settings.max_batch_events)
        except InvalidSessionTimeoutError:
            raise ConfigError(
                f"Invalid session timeout {self.settings.session_timeout_ms} ms (--session-timeout-ms): the broker "
                "rejected it. Brokers accept group.min.session.timeout.ms to group.max.session.timeout.ms, 6000 to "
                "1800000 ms by default") from None
        self._hold_back_restoring(records)
        self._last_poll = time.monotonic()
        self.metrics.mark_poll()
        self._dead_letter_log.flush()
        fetched = FetchedBatch.from_records(records)
        if time.monotonic() - self._last_lag_update >= LAG_UPDATE_INTERVAL_S and (
                self._lag_update is None or self._lag_update.done()):
            self._last_lag_update = time.monotonic()
            self._lag_update = asyncio.create_task(self._update_lag(self.consumer))
        async with self._batch_lock:
            if len(fetched):
                await self._process(fetched)
            self._check_background_checkpoint()
            if self.checkpointer.due():
                if self.exactly_once or self._snapshot_due():
                    if await self._checkpoint():
                        await self._maybe_snapshot()
                elif self._background_checkpoint is None:
                    self._start_background_checkpoint()

    async def _probe_broker_periodically(self, consumer: AIOKafkaConsumer) -> None:
        """Probe the cluster every ``BROKER_PROBE_INTERVAL_S``, also while the loop waits in delivery retries."""
        while True:
            started = time.monotonic()
            await self._probe_broker(consumer)
            await asyncio.sleep(max(0.0, BROKER_PROBE_INTERVAL_S - (time.monotonic() - started)))

    async def _probe_broker(self, consumer: AIOKafkaConsumer) -> None:
        """Send a metadata request and export whether the cluster responded; log when that changes.

        An idle member sends no other request that it would notice failing: fetches that fail look like
        fetches that returned nothing.
        """
        try:
            # A slow response on a busy machine is still a response, so the probe waits at least its interval.
            await asyncio.wait_for(consumer.topics(), max(self.settings.request_timeout_ms / 1000,
                                                          BROKER_PROBE_INTERVAL_S))
            reachable = True
        except (KafkaError, asyncio.TimeoutError, OSError) as error:
            reachable = False
            if self._broker_reachable is not False:
                logger.warning("The Kafka cluster at %s did not respond to a metadata request: %r",
                               self.settings.bootstrap_servers, error)
        if reachable and self._broker_reachable is False:
            logger.info("The Kafka cluster at %s responds again", self.settings.bootstrap_servers)
        self._broker_reachable = reachable
        self.metrics.broker_reachable.set(int(reachable))

    async def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Export the lag of every assigned partition, idle ones included: log end minus position.

        The end offsets come from a request of their own. aiokafka's ``highwater()`` changes only when a fetch
        returns data for the partition, and a consumer with a backlog buffered for one partition does not
        fetch it again until the buffer is drained, so under a backlog it would stand still.
        """
        partitions = [tp for tp in consumer.assignment() if tp not in self._restores]
        if not partitions:
            return
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(partitions), self.settings.request_timeout_ms / 1000)
            # position() waits for an offset lookup when the position is unknown, so it is bounded here.
            positions = {tp: await asyncio.wait_for(consumer.position(tp), 1.0) for tp in partitions}
        except (asyncio.TimeoutError, KafkaError) as error:
            logger.debug("Consumer lag not updated: %r", error)
            return
        for tp in partitions:
            if tp in self._assignment:  # not revoked while the offsets were requested
                self.metrics.set_consumer_lag(tp.topic, tp.partition, max(0, ends[tp] - positions[tp]))

    def _hold_back_restoring(self, records: dict[TopicPartition, list]) -> None:
        """Drop fetched records of partitions still being restored and rewind to the first of them.

        Pausing a partition stops new fetches, but a fetch already under way when the partition was assigned
        can still return its records. Applying them before the restore would advance a stale state.
        """
        for tp in [tp for tp in records if tp in self._restores]:
            messages = records.pop(tp)
            if messages:
                self.consumer.seek(tp, messages[0].offset)
                logger.info("Held back %d records of %s until its restore completes", len(messages),
                            _format_partition(tp))

    def _start_background_checkpoint(self) -> None:
        """Capture an at-least-once checkpoint now and complete it in a task while the loop goes on.

        The task owns the batches in flight at this moment; batches processed after it belong to the next
        checkpoint. One runs at a time, and every blocking checkpoint waits for it first.
        """
        prepared = self.checkpointer.prepare(lambda tp: tp in self.consumer.assignment())
        in_flight, self._in_flight = self._in_flight, deque()
        self._background_checkpoint = asyncio.create_task(self._complete_checkpoint(prepared, in_flight))

    async def _complete_checkpoint(self, prepared: PreparedCheckpoint, in_flight: deque[_InFlightBatch]) -> bool:
        return await self._handle_checkpoint_errors(
            self.checkpointer.complete(prepared, lambda: self._await_acknowledgements(in_flight)))

    def _check_background_checkpoint(self) -> None:
        """Forget a finished background checkpoint; an error it did not handle stops the loop here."""
        task = self._background_checkpoint
        if task is not None and task.done():
            self._background_checkpoint = None
            task.result()

    async def _wait_background_checkpoint(self) -> None:
        task = self._background_checkpoint
        if task is not None:
            self._background_checkpoint = None
            await task

    async def _cancel_background_checkpoint(self) -> None:
        task, self._background_checkpoint = self._background_checkpoint, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _snapshot_due(self) -> bool:
        return (self.settings.snapshot_dir is not None and self.changelog_topic is not None
                and time.monotonic() - self._last_snapshot >= self.settings.snapshot_interval_ms / 1000)

    async def _checkpoint(self) -> bool:
        """Run a checkpoint and wait for it; return whether it succeeded.

        Exactly-once failures require a rejoin; at-least-once ones are retried at the next checkpoint.
        """
        if self.checkpointer is None:
            return False
        await self._wait_background_checkpoint()

        async def checkpoint() -> None:
            await self._replace_unusable_producer()
            # Step 1 of the checkpoint (outputs acknowledged) for at-least-once.
            await self.checkpointer.checkpoint(lambda tp: tp in self.consumer.assignment(),
                                               lambda: self._await_acknowledgements(self._in_flight))

        return await self._handle_checkpoint_errors(checkpoint())

    async def _handle_checkpoint_errors(self, checkpoint: Awaitable[None]) -> bool:
        """Await ``checkpoint`` and return whether it succeeded; failures that need a rejoin raise it."""
        try:
            await checkpoint
            return True
        except ProducerFenced as error:
            self.metrics.checkpoint_failures.inc()
            raise RejoinRequired(f"producer fenced: {error!r}") from error
        except TRANSACTION_STATE_ERRORS as error:
            self.metrics.checkpoint_failures.inc()
            if self.exactly_once:
                raise RejoinRequired(f"transaction ended by the broker: {error!r}") from error
            raise RejoinRequired(f"the Kafka client rejected the checkpoint: {error!r}") from error
        except (KafkaError, asyncio.TimeoutError) as error:
            self.metrics.checkpoint_failures.inc()
            if self.exactly_once:
                raise RejoinRequired(f"transaction failed: {error!r}") from error
            self.metrics.commit_failures.inc()
            self._last_checkpoint_error = error
            if isinstance(error, (CommitFailedError, IllegalStateError)):
                # The group rebalanced: these partitions belong to another member now, which resumes from the
                # last committed offset. Outputs already produced may be produced again (at-least-once).
                logger.warning("Commit rejected after a rebalance; the new owner will replay: %r", error)
                self.checkpointer.pending_offsets.clear()
                return False
            if self._stop_requested.is_set():
                logger.warning("Checkpoint failed: %r", error)
            else:
                logger.warning("Checkpoint failed, retrying at the next one: %r", error)
            return False

    async def _process(self, fetched: FetchedBatch) -> None:
        started = time.perf_counter()
        batch, dead = self.decoder.decode(fetched.keys, fetched.values, fetched.timestamps_ms, fetched.offsets,
                                          fetched.partitions)
        if len(self.settings.input_topics) > 1:
            batch.streams = stream_numbers(fetched.topics, fetched.partitions,
                                           self.settings.input_topics)[batch.record_index]
        result = self.engine.process(batch)
        outputs = self._output_records(fetched, batch, result)
        letters = self._dead_letter_records(fetched, dead)
        self.metrics.batch_duration_seconds.observe(time.perf_counter() - started)
        event_times_ms = np.asarray(fetched.timestamps_ms, np.float64)[batch.record_index[result.applied]]
        if self.exactly_once:
            await self._send_in_transaction(outputs, letters)
            self.checkpointer.record_batch(fetched.next_offsets, len(fetched), event_times_ms, fetched.first_offsets)
        else:
            await self._send_without_waiting(outputs, letters, event_times_ms)
            self.checkpointer.record_batch(fetched.next_offsets, len(fetched), first_offsets=fetched.first_offsets)
        self._record_batch(fetched, result, dead, len(outputs[0]))

    def _output_records(self, fetched: FetchedBatch, batch: EventBatch, result: StepResult) -> OutgoingRecords:
        """Return the outputs keyed by entity, each with the headers of its input record."""
        records = self._keyed_outputs(fetched, batch, result)
        if fetched.headers is None:
            return records, None
        inputs = batch.record_index[result.applied].tolist()
        return records, [list(fetched.headers[index]) for index in inputs]

    def _keyed_outputs(self, fetched: FetchedBatch, batch: EventBatch, result: StepResult
                       ) -> list[tuple[int, bytes, bytes]]:
        topics = fetched.topics
        keys = fetched.keys
        record_index = batch.record_index.tolist()
        partitions = batch.partitions.tolist()
        encoded = encode_outputs(batch, result, self.model.fingerprint, topic_source(topics, batch))
        partitioner = self._output_partitioner
        # Outputs are keyed by entity. With equal partition counts, an input keyed by entity and written with the
        # default partitioner is already on the output's partition number, so that number is reused unhashed.
        reuse = {topic for topic, count in self._input_partitions.items() if count == partitioner.partitions}
        if len(reuse) == len(self._input_partitions) and all(keys):
            return [(partitions[position], key, value) for position, key, value in encoded]
        return [(partitions[position] if keys[record_index[position]] and topics[record_index[position]] in reuse
                 else partitioner(key), key, value)
                for position, key, value in encoded]

    def _dead_letter_records(self, fetched: FetchedBatch, dead: list[DeadLetter]) -> OutgoingRecords:
        """Return the dead letters: the original key, value and headers, plus headers saying why and where from."""
        records, headers = [], []
        for letter in dead:
            topic, partition = fetched.topics[letter.index], int(fetched.partitions[letter.index])
            offset = int(fetched.offsets[letter.index])
            # A dead letter keeps its original key; without one it stays on its input partition number.
            if letter.key:
                target_partition = self._dead_letter_partitioner(letter.key)
            else:
                target_partition = partition % self._dead_letter_partitioner.partitions
            original = [] if fetched.headers is None else list(fetched.headers[letter.index])
            record_headers = original + dead_letter_headers(letter, topic, partition, offset)
            value = letter.value or b""
            limit = self._max_message_bytes.get(self.settings.dead_letter_topic)
            if limit is not None and estimate_record_bytes(letter.key, value, record_headers) > limit:
                # The broker would reject the whole batch, again at every retry. The headers still give the
                # topic, partition and offset of the original record.
                logger.warning("Dead letter of %s[%d]@%d sent without its value: %d bytes with headers are over "
                               "the max.message.bytes of %s (%d); raise that topic config to keep such values",
                               topic, partition, offset, len(value), self.settings.dead_letter_topic, limit)
                record_headers.append((HEADER_VALUE_OMITTED, str(len(value)).encode()))
                value = b""
            records.append((target_partition, letter.key, value))
            headers.append(record_headers)
            self._dead_letter_log.record(letter.reason, f"{topic}[{partition}]@{offset}", letter.message)
        return records, headers

    async def _send(self, outputs: OutgoingRecords, letters: OutgoingRecords) -> list[asyncio.Future]:
        """Hand outputs and dead letters to the producer; return one future per record batch."""
        settings = self.settings
        futures = await send_records(self.producer, settings.output_topic, *outputs,
                                     max_batch_bytes=self._batch_limit(settings.output_topic))
        futures += await send_records(self.producer, settings.dead_letter_topic, *letters,
                                      max_batch_bytes=self._batch_limit(settings.dead_letter_topic))
        return futures

    def _batch_limit(self, topic: str) -> int | None:
        """Return the topic's max.message.bytes where the producer's own batches could exceed it, else None.

        send_records estimates the size of every record under a limit, which the common case skips.
        """
        limit = self._max_message_bytes.get(topic)
        return limit if limit is not None and limit < PRODUCER_BATCH_BYTES else None

    async def _send_in_transaction(self, outputs, letters) -> None:
        """Hand outputs and dead letters to the open transaction; the checkpoint's commit makes them visible."""
        try:
            await self._replace_unusable_producer()
            await self.checkpointer.begin()
            futures = await self._send(outputs, letters)
        except (KafkaError, asyncio.TimeoutError, *TRANSACTION_STATE_ERRORS) as error:
            raise RejoinRequired(f"sending in a transaction failed: {error!r}") from error
        # A failed send also fails the transaction's commit, which is where it is handled.
        for future in futures:
            future.add_done_callback(_retrieve_exception)

    async def _send_without_waiting(self, outputs, letters, event_times_ms: np.ndarray) -> None:
        """Hand a batch to the producer and go on; the next checkpoint waits for its acknowledgement.

        Up to ``MAX_IN_FLIGHT_BATCHES`` batches wait for acknowledgement while the next ones are processed,
        so the broker round trip is not paid once per batch in series.
        """
        try:
            futures = await self._send(outputs, letters)
        except (KafkaError, asyncio.TimeoutError) as error:
            logger.warning("Sending a batch failed, retrying until acknowledged: %r", error)
            await self._deliver(outputs, letters)
            self._observe_latency(event_times_ms)
            return
        acknowledged = asyncio.gather(*futures)
        acknowledged.add_done_callback(lambda done: None if done.cancelled() or done.exception()
                                       else self._observe_latency(event_times_ms))
        self._in_flight.append(_InFlightBatch(outputs, letters, acknowledged))
        while len(self._in_flight) > MAX_IN_FLIGHT_BATCHES:
            await self._reap_oldest(self._in_flight)

    def _observe_latency(self, event_times_ms: np.ndarray) -> None:
        self.metrics.observe_latencies(np.maximum(0.0, (time.time() * 1000 - event_times_ms) / 1000.0))

    async def _reap_oldest(self, in_flight: deque[_InFlightBatch]) -> None:
        """Wait for the oldest batch of ``in_flight``; if it failed, send it again until it is acknowledged."""
        entry = in_flight.popleft()
        try:
            await asyncio.wait_for(asyncio.shield(entry.acknowledged), self._acknowledgement_timeout_s())
        except (KafkaError, asyncio.TimeoutError) as error:
            logger.warning("A batch was not acknowledged (%r); sending it again", error)
            await self._deliver(entry.outputs, entry.letters)

    async def _await_acknowledgements(self, in_flight: deque[_InFlightBatch]) -> None:
        """Wait until every batch of ``in_flight`` is acknowledged: step 1 of an at-least-once checkpoint."""
        while in_flight:
            await self._reap_oldest(in_flight)

    async def _deliver(self, outputs: OutgoingRecords, letters: OutgoingRecords) -> None:
        """Send outputs and dead letters and wait until the broker acknowledges all of them, retrying."""
        settings = self.settings

        async def send_and_wait() -> None:
            await self._replace_unusable_producer()
            try:
                futures = await self._send(outputs, letters)
                acknowledged = asyncio.gather(*futures)
                acknowledged.add_done_callback(_retrieve_exception)  # still pending when the wait times out
                await asyncio.wait_for(asyncio.shield(acknowledged), self._acknowledgement_timeout_s())
            except KafkaError as error:
                if error.retriable:
                    raise
                if isinstance(error, (MessageSizeTooLargeError, RecordListTooLargeError)):
                    # The same batch is rejected at every attempt, and each attempt produces its outputs again.
                    raise ConfigError(
                        f"The broker rejected a record batch for {settings.output_topic} or "
                        f"{settings.dead_letter_topic} as too large ({error!r}), as it would at every retry. The "
                        f"member read their max.message.bytes at start: {self._max_message_bytes}. Restart it "
                        "if a limit was lowered since, or raise the limit of the topic") from error
                # A batch that expired unacknowledged (KafkaTimeoutError) still used up its sequence numbers,
                # so the broker rejects the producer's next batches (OutOfOrderSequenceNumber) for good.
                self._producer_unusable = ("a batch of the previous one expired or was rejected, which puts its "
                                           "sequence numbers out of step with the broker")
                raise BrokerError(f"{error!r}; the next attempt starts a new producer") from error

        await retry("produce outputs", send_and_wait, timeout_s=2 * settings.request_timeout_ms / 1000,
                    stopping=self._past_deadline, on_retry=self._count_retry)

    async def _replace_unusable_producer(self) -> None:
        """Stop the producer and start a new one if it was marked unusable; its batches start a new sequence.

        A new transactional producer registers the same transactional id with a higher epoch.
        """
        if self._producer_unusable is None:
            return
        logger.warning("Starting a new producer: %s", self._producer_unusable)
        try:
            await asyncio.wait_for(self.producer.stop(), self.settings.request_timeout_ms / 1000)
        except (KafkaError, asyncio.TimeoutError, OSError) as error:
            logger.warning("Stopping the previous producer failed: %r", error)
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self.producer = self.checkpointer.producer = producer
        self._producer_unusable = None

    def _record_batch(self, fetched: FetchedBatch, result: StepResult, dead: list[DeadLetter], produced: int
                      ) -> None:
        arena = self.engine.arena
        self.metrics.record_batch(fetched.topics, self.settings.output_topic, produced,
                                  [letter.reason for letter in dead], result.duplicates, result.inference_s,
                                  len(arena), arena.evictions - self._evictions_seen,
                                  arena.expirations - self._expirations_seen)
        self._evictions_seen, self._expirations_seen = arena.evictions, arena.expirations
        self.events_processed += len(fetched)
        logger.debug("Batch of %d events: %d outputs, %d dead letters, %d waves", len(fetched), produced,
                     len(dead), result.waves)

    def _count_retry(self, operation: str) -> None:
        self.metrics.broker_retries.labels(operation=operation).inc()
        self._last_retry = (operation, time.monotonic())
        # A loop that retries a broker call is alive: liveness must not restart a member for a broker outage.
        self._last_poll = time.monotonic()


def _retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _count_partitions(count: int) -> str:
    return f"{count} partition" if count == 1 else f"{count} partitions"


def _format_partition(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _format_partitions(partitions: set[TopicPartition]) -> str:
    return ", ".join(map(_format_partition, sorted(partitions))) or "none"


async def run_service(settings: Settings) -> None:
    """Run a service until SIGTERM or SIGINT."""
    service = StreamerService(settings)
    service.install_signal_handlers()
    await service.run()
