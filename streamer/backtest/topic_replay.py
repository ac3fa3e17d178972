"""Topic backtests: replay offset ranges of Kafka topics through the engine without touching the live service.

The replay reads with Fetch requests of its own (``RangeReader``) and no group id, so it commits no offsets,
joins no consumer group and writes nothing except its own outputs (a file, or an output topic that is not an
input).

Processing order, the rule that makes a replay deterministic whatever the broker's fetch sizes:

- Partitions are ordered by topic (in the order given) and then by partition number.
- Each round takes the next ``batch_size`` records (fewer at the end of a range) of every unfinished
  partition, in that partition order and in offset order within a partition. By default ``batch_size`` is
  ``ROUND_EVENTS`` divided by the number of replayed partitions.
- One round is one engine batch, and outputs are written in the batch's order.

So the output file is ordered by round, then partition, then offset. With ``next-value`` targets an output
is written once its target is known; see :class:`NextValueTargets`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from streamer.backtest.file_replay import BacktestResult, event_format_for
from streamer.backtest.progress import EventProgress
from streamer.engine import Engine, EventBatch, StepResult
from streamer.engine.gc_pause import scheduled_collection
from streamer.errors import BrokerError, ConfigError
from streamer.io.events import DeadLetter, EventDecoder
from streamer.io.files import OutputWriter, StagedFile
from streamer.io.outputs import encode_dead_letter_line, encode_output_lines, encode_outputs, topic_source
from streamer.kafka.admin import TOPIC_MAX_MESSAGE_BYTES, TopicSpec, ensure_topics
from streamer.kafka.fetched import stream_numbers
from streamer.kafka.producer import KeyPartitioner, send_records
from streamer.kafka.range_reader import RangeReader
from streamer.kafka.restore import OTHER_MODEL_CAUSES, restore_partition
from streamer.kafka.security import PLAINTEXT, KafkaSecurity
from streamer.metrics import StreamerMetrics
from streamer.model.network import RecurrentModel
from streamer.state.changelog import StateCodec, changelog_topic
from streamer.state.snapshot import read_snapshot

logger = logging.getLogger(__name__)

INITIAL_STATES = ("empty", "changelog:GROUP", "snapshot:GROUP:DIR")
# Default records per round, split evenly across the replayed partitions. The engine's throughput peaks
# near 4,096 events per batch. Rounds of 16,384 (4,096 from each of four partitions) replayed about 6 %
# slower in interleaved runs.
ROUND_EVENTS = 4096
DEFAULT_STALL_TIMEOUT_S = 60.0

# Kafka topic names contain only ASCII letters, digits, '.', '_' and '-', so ':' separates the fields of
# an explicit offset: "partition:offset" or "topic:partition:offset".
_OFFSET_ITEM = re.compile(r"^(?:(?P<topic>[A-Za-z0-9._-]+):)?(?P<partition>\d+):(?P<offset>\d+|earliest|latest)$")


# -- ranges ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RangeBound:
    """One ``--from`` or ``--to`` value.

    ``kind`` is ``earliest``, ``latest``, ``time`` (``timestamp_ms`` for every partition) or ``offsets``
    (``offsets`` maps ``(topic or None, partition)`` to an offset, ``"earliest"`` or ``"latest"``; a
    ``None`` topic means the only input topic).
    """

    kind: Literal["earliest", "latest", "time", "offsets"]
    timestamp_ms: int | None = None
    offsets: dict[tuple[str | None, int], int | str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "time":
            iso = datetime.fromtimestamp(self.timestamp_ms / 1000, timezone.utc).isoformat()
            return f"time {iso} ({self.timestamp_ms} ms)"
        if self.kind == "offsets":
            return ",".join(f"{topic + ':' if topic else ''}{partition}:{offset}"
                            for (topic, partition), offset in self.offsets.items())
        return self.kind


def parse_range_bound(text: str, flag: str = "--from") -> RangeBound:
    """Parse ``earliest``, ``latest``, epoch milliseconds, ISO-8601 or ``[topic:]partition:offset,...``.

    An ISO-8601 value without a time zone is read as UTC.
    """
    value = text.strip()
    if value in ("earliest", "latest"):
        return RangeBound(value)
    if value.isdigit():
        return RangeBound("time", timestamp_ms=int(value))
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is not None:
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        timestamp_ms = int(parsed.timestamp() * 1000)
        if timestamp_ms < 0:
            raise ConfigError(f"Invalid {flag} {text!r}: timestamps before 1970 cannot be looked up in Kafka")
        return RangeBound("time", timestamp_ms=timestamp_ms)
    offsets: dict[tuple[str | None, int], int | str] = {}
    for item in value.split(","):
        match = _OFFSET_ITEM.match(item.strip())
        if match is None:
            raise ConfigError(
                f"Invalid {flag} {text!r}: expected earliest, latest, epoch milliseconds, an ISO-8601 time such as "
                "2024-12-04T10:00:00Z, or offsets per partition such as 0:100,1:250 (topic:0:100 with several topics)")
        key = (match["topic"], int(match["partition"]))
        if key in offsets:
            raise ConfigError(f"Invalid {flag} {text!r}: partition {item.strip().rsplit(':', 1)[0]} is named twice")
        offset = match["offset"]
        offsets[key] = offset if offset in ("earliest", "latest") else int(offset)
    return RangeBound("offsets", offsets=offsets)


@dataclass(frozen=True)
class PartitionRange:
    """Records ``[start, end)`` of one partition. ``end`` is exclusive."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def size(self) -> int:
        """Offsets in the range; an upper bound on the records, since transaction markers use offsets too."""
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "from": self.start, "to": self.end}


def _named_partitions(bound: RangeBound, topics: Sequence[str]) -> dict[TopicPartition, int | str]:
    """Map each partition named by an ``offsets`` bound to its offset, checking topic names."""
    named: dict[TopicPartition, int | str] = {}
    for (topic, partition), offset in bound.offsets.items():
        if topic is None:
            if len(topics) > 1:
                raise ConfigError(f"Ambiguous offset {partition}:{offset} with several topics: "
                                  f"write it as topic:{partition}:{offset}")
            topic = topics[0]
        elif topic not in topics:
            raise ConfigError(f"Invalid offset {topic}:{partition}:{offset}: topic {topic!r} is not one of the "
                              f"replayed topics {', '.join(topics)}")
        named[TopicPartition(topic, partition)] = offset
    return named


async def describe_partitions(bootstrap_servers: str, topics: Sequence[str], request_timeout_ms: int, *,
                              security: KafkaSecurity = PLAINTEXT
                              ) -> dict[str, list[dict[str, Any]]]:
    """Return each topic's partition descriptions (``partition``, ``replicas``, ...) from the admin client.

    Raises ConfigError for an unknown topic. Existence is checked with a list of all topics first, because a
    metadata request that names a topic creates it on a broker with ``auto.create.topics.enable``.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **security.client_options(),
                                request_timeout_ms=request_timeout_ms)
    await _start(admin, "admin client", bootstrap_servers)
    try:
        existing = set(await admin.list_topics())
        missing = [topic for topic in topics if topic not in existing]
        if missing:
            raise ConfigError(f"Topic {', '.join(missing)} not found on {bootstrap_servers}: expected existing "
                              "topics; check the topic names")
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {item["topic"]: sorted(item["partitions"], key=lambda p: p["partition"]) for item in described}


async def resolve_ranges(consumer: AIOKafkaConsumer, topics: Sequence[str], start: RangeBound, end: RangeBound,
                         partition_counts: dict[str, int]) -> list[PartitionRange]:
    """Resolve ``--from`` and ``--to`` to offsets of every replayed partition, in replay order.

    Times resolve with ``offsets_for_times`` to the first offset whose timestamp is at or after the time; a
    time after every record resolves to the end offset at the start of the replay. An ``offsets`` bound
    selects the partitions it names (with both bounds explicit, the union); an unnamed bound of such a
    partition is ``earliest`` for ``--from`` and ``latest`` for ``--to``.
    """
    if start.kind == end.kind == "time" and start.timestamp_ms > end.timestamp_ms:
        raise ConfigError(f"Invalid range: --from {start.describe()} is after --to {end.describe()}; expected "
                          "--from before --to")
    partitions = [TopicPartition(topic, number) for topic in topics for number in range(partition_counts[topic])]
    named_start = _named_partitions(start, topics) if start.kind == "offsets" else {}
    named_end = _named_partitions(end, topics) if end.kind == "offsets" else {}
    if named_start or named_end:
        selected = set(named_start) | set(named_end)
        unknown = sorted(selected - set(partitions))
        if unknown:
            raise ConfigError(f"Partition {', '.join(f'{tp.topic}[{tp.partition}]' for tp in unknown)} not found: "
                              f"{', '.join(topics)} have partitions "
                              f"{', '.join(f'{tp.topic}[{tp.partition}]' for tp in partitions)}")
        partitions = [tp for tp in partitions if tp in selected]
    beginning = await consumer.beginning_offsets(partitions)
    ends = await consumer.end_offsets(partitions)

    async def resolve(bound: RangeBound, named: dict[TopicPartition, int | str], default: str
                      ) -> dict[TopicPartition, int]:
        if bound.kind == "time":
            found = await consumer.offsets_for_times({tp: bound.timestamp_ms for tp in partitions})
            return {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in partitions}
        resolved = {}
        for tp in partitions:
            position = named.get(tp, default) if bound.kind == "offsets" else bound.kind
            if position == "earliest":
                resolved[tp] = beginning[tp]
            elif position == "latest":
                resolved[tp] = ends[tp]
            else:
                resolved[tp] = position
        return resolved

    starts = await resolve(start, named_start, "earliest")
    stops = await resolve(end, named_end, "latest")
    ranges = []
    for tp in partitions:
        name = f"{tp.topic}[{tp.partition}]"
        first, stop = starts[tp], stops[tp]
        if first < beginning[tp]:
            raise ConfigError(f"Invalid --from offset {first} for {name}: the earliest offset still on the broker "
                              f"is {beginning[tp]}; use earliest or an offset from {beginning[tp]}")
        if first > ends[tp]:
            raise ConfigError(f"Invalid --from offset {first} for {name}: it is after the end offset {ends[tp]}; "
                              f"use an offset up to {ends[tp]}")
        if stop > ends[tp]:
            raise ConfigError(f"Invalid --to offset {stop} for {name}: the end offset is {ends[tp]}; use latest "
                              f"or an offset up to {ends[tp]}")
        if first > stop:
            raise ConfigError(f"Invalid range for {name}: --from {start.describe()} resolves to offset {first}, "
                              f"after --to {end.describe()} at offset {stop}; expected --from before --to")
        ranges.append(PartitionRange(tp.topic, tp.partition, first, stop))
    return ranges


# -- reading ---------------------------------------------------------------------------------------------


@dataclass
class Round:
    """Records of one round as parallel columns, in replay order (see the module docstring)."""

    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    timestamps_ms: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]

    def __len__(self) -> int:
        return len(self.values)


async def iter_rounds(reader: RangeReader, ranges: Sequence[PartitionRange], batch_size: int
                      ) -> AsyncIterator[Round]:
    """Yield rounds of up to ``batch_size`` records per partition from ``reader``.

    Before a round is handed out, the Fetch requests for the next one are started, so the broker reads
    while the caller processes.
    """
    active = [r for r in ranges if r.size > 0]
    while active:
        tps = [r.tp for r in active]
        await reader.fill(tps, batch_size)
        columns = Round([], [], [], [], [], [])
        still_active = []
        for r in active:
            head = reader.buffers[r.tp].take(batch_size)
            count = len(head)
            columns.topics.extend([r.topic] * count)
            columns.partitions.extend([r.partition] * count)
            columns.offsets.extend(head.offsets)
            columns.timestamps_ms.extend(head.timestamps_ms)
            columns.keys.extend(head.keys)
            columns.values.extend(head.values)
            if len(reader.buffers[r.tp]) or not reader.finished(r.tp):
                still_active.append(r)
        active = still_active
        reader.prefetch([r.tp for r in active], batch_size)
        if len(columns):
            yield columns


# -- targets and outputs ---------------------------------------------------------------------------------


def parse_target(text: str, model: RecurrentModel) -> int | None:
    """Parse ``--target``: ``event`` (None, the event's own ``target`` field) or ``next-value:K``.

    ``K`` is a feature index or, for a bundle with feature names, a feature name. Returns the feature index.
    """
    if text == "event":
        return None
    kind, _, feature = text.partition(":")
    manifest = model.manifest
    if kind != "next-value" or not feature:
        raise ConfigError(f"Invalid --target {text!r}: expected event or next-value:K with K a feature index "
                          "or name")
    if manifest.output_size != 1:
        raise ConfigError(f"Invalid --target {text!r}: next-value targets are scalars, but the model has "
                          f"{manifest.output_size} outputs; use --target event")
    if feature.isdigit():
        index = int(feature)
    elif manifest.feature_names and feature in manifest.feature_names:
        index = manifest.feature_names.index(feature)
    else:
        names = f"one of {', '.join(manifest.feature_names)} or " if manifest.feature_names else ""
        raise ConfigError(f"Invalid --target feature {feature!r}: expected {names}an index below "
                          f"{manifest.input_size}")
    if index >= manifest.input_size:
        raise ConfigError(f"Invalid --target feature index {index}: the model has {manifest.input_size} features")
    return index


OutputRecord = tuple[int, bytes, bytes]  # (output partition, key, value)


class NextValueTargets:
    """Set each output's ``target`` to feature ``K`` of the same entity's next event in the replay.

    An output is pending until the entity's next applied event is processed. When that event has
    ``reset: true`` it starts a new sequence, so the pending output is released without a target, as is the
    output of each entity's last event in the range (at :meth:`finish`). Outputs without a target count as
    unscored in the report. Pending outputs are released in the order of the event that released them, and
    :meth:`finish` releases the rest in the order of each entity's last event, so the order is deterministic.
    """

    def __init__(self, feature_index: int) -> None:
        self.feature_index = feature_index
        self._pending: dict[str, OutputRecord] = {}

    def release(self, batch: EventBatch, encoded: Sequence[tuple[int, OutputRecord]]) -> list[OutputRecord]:
        """Keep the outputs of ``batch`` pending and return the earlier ones whose target became known."""
        values = batch.features[:, self.feature_index]
        released = []
        for position, record in encoded:
            entity = batch.entities[position]
            pending = self._pending.pop(entity, None)
            if pending is not None:
                if batch.resets[position]:
                    released.append(pending)
                else:
                    # str() of a float32 is its shortest round-trip text, so 2.3 stays 2.3 in the output.
                    target = float(str(values[position]))
                    partition, key, value = pending
                    released.append((partition, key, value[:-1] + b',"target":' + orjson.dumps(target) + b"}"))
            self._pending[entity] = record
        return released

    def finish(self) -> list[OutputRecord]:
        """Release the outputs still pending, without a target."""
        pending, self._pending = list(self._pending.values()), {}
        return pending


class _FileSink:
    """Outputs to a JSON Lines or Parquet file through ``OutputWriter``; dead letters to a JSON Lines file."""

    def __init__(self, path: Path, dead_letter_path: Path) -> None:
        self._writer = OutputWriter(path)
        self._dead = StagedFile(dead_letter_path)

    @property
    def writes_lines(self) -> bool:
        return self._writer.writes_lines

    def write_lines(self, count: int, lines: bytes) -> None:
        self._writer.write_lines(count, lines)

    async def write(self, records: Sequence[OutputRecord]) -> None:
        self._writer.write([value for _, _, value in records])

    def write_dead_letters(self, lines: list[bytes]) -> None:
        if lines:
            self._dead.write(b"\n".join(lines) + b"\n")

    async def close(self, completed: bool) -> None:
        """Move the files to their paths after a completed replay; remove them after a failed one."""
        if completed:
            try:
                self._writer.close()
            except BaseException:
                self._dead.discard()
                raise
            self._dead.commit()
        else:
            self._writer.discard()
            self._dead.discard()


class _TopicSink(_FileSink):
    """Outputs to a Kafka topic, acknowledged per round; dead letters still go to a file."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, dead_letter_path: Path, keep: bool) -> None:
        self._producer = producer
        self._topic = topic
        self._dead = StagedFile(dead_letter_path)
        self.produced_values: list[bytes] | None = [] if keep else None

    @property
    def writes_lines(self) -> bool:
        return False

    async def write(self, records: Sequence[OutputRecord]) -> None:
        if not records:
            return
        try:
            futures = await send_records(self._producer, self._topic, records)
            await asyncio.gather(*futures)
        except KafkaError as error:
            raise BrokerError(f"Producing {len(records)} outputs to {self._topic} failed: {error!r}") from error
        if self.produced_values is not None:
            self.produced_values.extend(value for _, _, value in records)

    async def close(self, completed: bool) -> None:
        if completed:
            self._dead.commit()
        else:
            self._dead.discard()


# -- the replay ------------------------------------------------------------------------------------------


@dataclass
class TopicBacktestResult(BacktestResult):
    """Counts, paths and resolved ranges of one topic replay."""

    ranges: list[PartitionRange] = field(default_factory=list)
    output_topic: str | None = None
    semantics: str = "stateful"
    output_values: list[bytes] | None = None  # outputs produced to a topic, with keep_topic_outputs
    batch_size: int | None = None  # records per partition per round

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "output_topic": self.output_topic, "semantics": self.semantics,
                "batch_size": self.batch_size, "ranges": [r.as_dict() for r in self.ranges]}


@dataclass(frozen=True)
class TopicReplaySpec:
    """Topics, offset range and broker address of one replay."""

    bootstrap_servers: str
    topics: tuple[str, ...]
    start: RangeBound = RangeBound("earliest")
    end: RangeBound = RangeBound("latest")
    request_timeout_ms: int = 30_000
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    security: KafkaSecurity = PLAINTEXT


def run_topic_backtest(model: RecurrentModel, spec: TopicReplaySpec, *, output_path: Path | None = None,
                       output_topic: str | None = None, dead_letter_path: Path | None = None,
                       allow_existing_output: bool = False, keep_topic_outputs: bool = False,
                       semantics: str = "stateful", batch_size: int | None = None, max_entities: int | None = None,
                       idle_expiry_ms: int | None = None, max_record_bytes: int = 1_048_576,
                       initial_state: str = "empty", target_feature: int | None = None,
                       progress: bool | None = None, metrics: StreamerMetrics | None = None) -> TopicBacktestResult:
    """Replay ``spec``'s range and write one output per valid event to a file or an output topic.

    Exactly one of ``output_path`` and ``output_topic`` is given. Dead letters go to ``dead_letter_path``
    (default: beside the output file). An output topic must not be an input topic, and must be empty unless
    ``allow_existing_output`` is set; a missing one is created like the first input topic. With
    ``keep_topic_outputs`` the values produced to a topic are also returned in ``output_values``.
    ``target_feature`` selects next-value targets (:class:`NextValueTargets`). With ``metrics``, each round
    updates the counters and gauges the live service exports for its batches.
    """
    return asyncio.run(_replay(model, spec, output_path=output_path, output_topic=output_topic,
                               dead_letter_path=dead_letter_path, allow_existing_output=allow_existing_output,
                               keep_topic_outputs=keep_topic_outputs, semantics=semantics, batch_size=batch_size,
                               max_entities=max_entities, idle_expiry_ms=idle_expiry_ms,
                               max_record_bytes=max_record_bytes, initial_state=initial_state,
                               target_feature=target_feature, progress=progress, metrics=metrics))


def _check_arguments(spec: TopicReplaySpec, output_path: Path | None, output_topic: str | None,
                     dead_letter_path: Path | None, batch_size: int | None, initial_state: str) -> None:
    if not spec.topics:
        raise ConfigError("No input topic: pass --topic at least once")
    if len(set(spec.topics)) != len(spec.topics):
        raise ConfigError(f"Topics named more than once: {', '.join(spec.topics)}; pass each --topic once")
    if (output_path is None) == (output_topic is None):
        raise ConfigError("Expected exactly one of --output (a file) and --output-topic")
    for bound in (spec.start, spec.end):
        if bound.kind == "offsets":
            _named_partitions(bound, spec.topics)
    if output_topic is not None and output_topic in spec.topics:
        raise ConfigError(f"Invalid --output-topic {output_topic!r}: it is also an input topic; replay outputs "
                          "must go to a topic of their own")
    if output_topic is not None and dead_letter_path is None:
        raise ConfigError("Missing dead-letter file: a replay to --output-topic writes dead letters to a file")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"Invalid batch size {batch_size}: expected a positive number of records per partition")
    parse_initial_state(initial_state)


def parse_initial_state(text: str) -> tuple[str, str | None, Path | None]:
    """Parse ``empty``, ``changelog:GROUP`` or ``snapshot:GROUP:DIR`` into (kind, group, directory)."""
    kind, _, rest = text.partition(":")
    if kind == "empty" and not rest:
        return "empty", None, None
    if kind == "changelog" and rest:
        return "changelog", rest, None
    if kind == "snapshot" and ":" in rest:
        group, _, directory = rest.partition(":")
        if group and directory:
            return "snapshot", group, Path(directory)
    raise ConfigError(f"Invalid --initial-state {text!r}: expected one of {', '.join(INITIAL_STATES)}")


async def load_initial_state(engine: Engine, model: RecurrentModel, spec: TopicReplaySpec, initial_state: str,
                             semantics: str, input_partitions: dict[str, int]) -> None:
    """Fill the engine's arena with the states a live service group recorded, read-only.

    ``changelog:GROUP`` reads ``GROUP``'s state changelog as it stands now; ``snapshot:GROUP:DIR`` starts
    from that group's local snapshots in DIR and reads the changelog after them. Events at or below an
    entity's last applied offset are then duplicates, so a range that starts where live processing stood
    continues it exactly.
    """
    kind, group, directory = parse_initial_state(initial_state)
    if kind == "empty":
        return
    topic = changelog_topic(group)
    try:
        changelog_partitions = await describe_partitions(spec.bootstrap_servers, [topic], spec.request_timeout_ms,
                                                         security=spec.security)
    except ConfigError:
        raise ConfigError(f"Changelog topic {topic} of group {group} not found on {spec.bootstrap_servers}: "
                          "check the group id of --initial-state; only groups run with --changelog have one") from None
    if len(changelog_partitions[topic]) != input_partitions[spec.topics[0]]:
        raise ConfigError(f"Changelog topic {topic} has {len(changelog_partitions[topic])} partitions, but "
                          f"{spec.topics[0]} has {input_partitions[spec.topics[0]]}: it belongs to another input")
    codec = StateCodec(engine.arena.row_shapes, semantics)
    state_fingerprint = model.state_fingerprint(semantics)
    for partition in range(input_partitions[spec.topics[0]]):
        start_offset = None
        if directory is not None:
            snapshot = read_snapshot(directory, topic, partition)
            if snapshot is not None and snapshot.fingerprint == state_fingerprint:
                engine.arena.load(snapshot.entities, partition, snapshot.steps, snapshot.last_offsets,
                                  snapshot.last_ts_ms, codec.split_rows(snapshot.rows))
                start_offset = snapshot.next_offset
        result = await restore_partition(bootstrap_servers=spec.bootstrap_servers, security=spec.security,
                                         topic=topic, partition=partition,
                                         codec=codec, arena=engine.arena, fingerprint=state_fingerprint,
                                         mismatch_policy="reset", request_timeout_ms=spec.request_timeout_ms,
                                         start_offset=start_offset)
        logger.info("Initial state of partition %d from %s: %d entities, %d records", partition, topic,
                    result.entities, result.records)
        mismatched = result.anomalies.get("model_mismatch", 0)
        if mismatched:
            logger.warning("Discarded the initial state of %d entities of partition %d in %s: made by another model "
                           "(%s); they start from zero state", mismatched, partition, topic, OTHER_MODEL_CAUSES)


async def _replay(model: RecurrentModel, spec: TopicReplaySpec, *, output_path: Path | None,
                  output_topic: str | None, dead_letter_path: Path | None, allow_existing_output: bool,
                  keep_topic_outputs: bool, semantics: str, batch_size: int | None, max_entities: int | None,
                  idle_expiry_ms: int | None, max_record_bytes: int, initial_state: str,
                  target_feature: int | None, progress: bool | None,
                  metrics: StreamerMetrics | None = None) -> TopicBacktestResult:
    _check_arguments(spec, output_path, output_topic, dead_letter_path, batch_size, initial_state)
    described = await describe_partitions(spec.bootstrap_servers, spec.topics, spec.request_timeout_ms,
                                          security=spec.security)
    input_partitions = {topic: len(described[topic]) for topic in spec.topics}
    if output_path is not None:
        output_path = Path(output_path)
        dead_letter_path = Path(dead_letter_path) if dead_letter_path else \
            output_path.with_name(f"{output_path.stem}.dead-letter.jsonl")
    engine = Engine(model, semantics, capacity=max_entities, idle_expiry_ms=idle_expiry_ms)
    await load_initial_state(engine, model, spec, initial_state, semantics, input_partitions)
    result = TopicBacktestResult(output_path=output_path, dead_letter_path=dead_letter_path,
                                 output_topic=output_topic, semantics=semantics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec.bootstrap_servers, **spec.security.client_options(), group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none", isolation_level="read_committed", request_timeout_ms=spec.request_timeout_ms,
    )
    producer: AIOKafkaProducer | None = None
    await _start(consumer, "consumer", spec.bootstrap_servers)
    try:
        result.ranges = await resolve_ranges(consumer, spec.topics, spec.start, spec.end, input_partitions)
    finally:
        await consumer.stop()
    if batch_size is None:
        batch_size = max(1, ROUND_EVENTS // max(1, len(result.ranges)))
    result.batch_size = batch_size
    client = AIOKafkaClient(bootstrap_servers=spec.bootstrap_servers, **spec.security.client_options(),
                            request_timeout_ms=spec.request_timeout_ms)
    await _start(client, "client", spec.bootstrap_servers)
    try:
        await client.set_topics(list(spec.topics))
        reader = RangeReader(client, [(r.tp, r.start, r.end) for r in result.ranges],
                             partition_max_bytes=TOPIC_MAX_MESSAGE_BYTES, stall_timeout_s=spec.stall_timeout_s)
        if output_topic is None:
            dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            sink: _FileSink = _FileSink(output_path, dead_letter_path)
            output_partitions = None
        else:
            output_partitions = await _prepare_output_topic(spec, output_topic, allow_existing_output,
                                                            described[spec.topics[0]])
            producer = AIOKafkaProducer(bootstrap_servers=spec.bootstrap_servers, **spec.security.client_options(),
                                        enable_idempotence=True,
                                        acks="all", linger_ms=5, max_batch_size=1 << 20,
                                        max_request_size=TOPIC_MAX_MESSAGE_BYTES,
                                        request_timeout_ms=spec.request_timeout_ms)
            await _start(producer, "producer", spec.bootstrap_servers)
            dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            sink = _TopicSink(producer, output_topic, dead_letter_path, keep_topic_outputs)
        router = _OutputRouter(input_partitions, output_partitions)
        logger.info("Replaying %s from %s to %s: %d offsets in %d partitions", ", ".join(spec.topics),
                    spec.start.describe(), spec.end.describe(), sum(r.size for r in result.ranges),
                    len(result.ranges))
        completed = False
        try:
            await _process_rounds(reader, engine, model, sink, router, result, spec, batch_size,
                                  max_record_bytes, target_feature, progress, metrics, output_topic)
            completed = True
        finally:
            await reader.close()
            await sink.close(completed)
        if isinstance(sink, _TopicSink):
            result.output_values = sink.produced_values
    finally:
        await client.close()
        if producer is not None:
            await producer.stop()
    result.entities = len(engine.arena)
    result.evictions, result.expirations = engine.arena.evictions, engine.arena.expirations
    logger.info("Replay of %s: %d events, %d outputs, %d dead letters in %.2f s", ", ".join(spec.topics),
                result.events, result.outputs, result.dead_letters, result.elapsed_s)
    return result


async def _process_rounds(reader: RangeReader, engine: Engine, model: RecurrentModel, sink: _FileSink,
                          router: _OutputRouter, result: TopicBacktestResult, spec: TopicReplaySpec,
                          batch_size: int, max_record_bytes: int, target_feature: int | None,
                          progress: bool | None, metrics: StreamerMetrics | None = None,
                          output_topic: str | None = None) -> None:
    decoder = EventDecoder(event_format_for(model, max_record_bytes))
    targets = NextValueTargets(target_feature) if target_feature is not None else None
    show_progress = sys.stderr.isatty() if progress is None else progress
    evictions, expirations = engine.arena.evictions, engine.arena.expirations  # counted in metrics so far
    total = sum(r.size for r in result.ranges)
    started = time.perf_counter()
    # The total counts offsets, so transaction markers can leave the bar a little short of full.
    with scheduled_collection() as collector, \
            EventProgress(f"replay {', '.join(spec.topics)}", total, show_progress) as advance:
        async for records in iter_rounds(reader, result.ranges, batch_size):
            batch, dead = decoder.decode(records.keys, records.values, records.timestamps_ms, records.offsets,
                                         records.partitions)
            if len(spec.topics) > 1:
                batch.streams = stream_numbers(records.topics, records.partitions, spec.topics)[batch.record_index]
            step = engine.process(batch)
            if targets is None and sink.writes_lines:
                produced, lines = encode_output_lines(batch, step, model.fingerprint,
                                                      topic_source(records.topics, batch))
                sink.write_lines(produced, lines)
            else:
                encoded = _encode(batch, step, model.fingerprint, records, router,
                                  strip_targets=targets is not None)
                outputs = targets.release(batch, encoded) if targets else [record for _, record in encoded]
                await sink.write(outputs)
                produced = len(encoded)
            sink.write_dead_letters(_dead_letter_lines(dead, records, result))
            result.events += len(records)
            result.outputs += produced
            result.dead_letters += len(dead)
            result.duplicates += step.duplicates
            if metrics is not None:
                arena = engine.arena
                metrics.record_batch(records.topics, output_topic, produced, [letter.reason for letter in dead],
                                     step.duplicates, step.inference_s, len(arena), arena.evictions - evictions,
                                     arena.expirations - expirations)
                evictions, expirations = arena.evictions, arena.expirations
                metrics.mark_poll()
            advance(len(records))
            collector.maybe_collect()
        if targets is not None:
            await sink.write(targets.finish())
    result.elapsed_s = time.perf_counter() - started


def _encode(batch: EventBatch, step: StepResult, fingerprint: str, records: Round, router: _OutputRouter,
            strip_targets: bool) -> list[tuple[int, OutputRecord]]:
    """Encode outputs like the live service, with source ``{topic, partition, offset}``, in batch order."""
    to_encode = dataclasses.replace(batch, targets=None) if strip_targets else batch
    encoded = encode_outputs(to_encode, step, fingerprint, topic_source(records.topics, batch))
    if not router.routes:
        return [(position, (0, key, value)) for position, key, value in encoded]
    record_index = batch.record_index.tolist()
    topics, partitions, keys = records.topics, records.partitions, records.keys
    routed = []
    for position, key, value in encoded:
        index = record_index[position]
        routed.append((position, (router(topics[index], partitions[index], keys[index], key), key, value)))
    return routed


def _dead_letter_lines(dead: list[DeadLetter], records: Round, result: TopicBacktestResult) -> list[bytes]:
    lines = []
    for letter in dead:
        source = {"topic": records.topics[letter.index], "partition": records.partitions[letter.index],
                  "offset": records.offsets[letter.index]}
        lines.append(encode_dead_letter_line(letter, source))
        result.dead_letter_reasons[letter.reason] = result.dead_letter_reasons.get(letter.reason, 0) + 1
    return lines


class _OutputRouter:
    """Choose an output's partition with the live service's rule, so replayed outputs land where it puts them.

    A keyed input record on a topic with as many partitions as the output topic keeps its partition number;
    any other output goes to the partition of its key (Kafka's default partitioner).
    """

    def __init__(self, input_partitions: dict[str, int], output_partitions: int | None) -> None:
        self.routes = output_partitions is not None  # False for a file, where outputs have no partition
        self._partitioner = KeyPartitioner(output_partitions) if output_partitions else None
        self._reuse = {topic for topic, count in input_partitions.items() if count == output_partitions}

    def __call__(self, topic: str, partition: int, input_key: bytes | None, key: bytes) -> int:
        if self._partitioner is None:
            return partition
        if input_key is not None and topic in self._reuse:
            return partition
        return self._partitioner(key)


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer | AIOKafkaClient, role: str,
                 bootstrap_servers: str) -> None:
    try:
        await (client.bootstrap() if isinstance(client, AIOKafkaClient) else client.start())
    except KafkaError as error:
        raise BrokerError(f"Cannot start the replay {role} at {bootstrap_servers}: {error!r}; check "
                          "--bootstrap-servers and that the broker is running") from error
    # aiokafka 0.14's consumer without a group starts a task in start() that raises CancelledError out of
    # stop() when it is cancelled before its first step, so the task gets one event-loop step here.
    await asyncio.sleep(0)


async def _prepare_output_topic(spec: TopicReplaySpec, output_topic: str, allow_existing_output: bool,
                                input_layout: list[dict[str, Any]]) -> int:
    """Create the output topic when missing, reject one that has records, and return its partition count.

    A missing output topic gets the partition count and replication factor of the first input topic.
    """
    try:
        described = await describe_partitions(spec.bootstrap_servers, [output_topic], spec.request_timeout_ms,
                                              security=spec.security)
    except ConfigError:
        replication = len(input_layout[0]["replicas"]) if input_layout else 1
        await ensure_topics(spec.bootstrap_servers, [TopicSpec(output_topic, len(input_layout), replication)],
                            spec.request_timeout_ms, security=spec.security)
        logger.info("Created output topic %s with %d partitions", output_topic, len(input_layout))
        return len(input_layout)
    partitions = [TopicPartition(output_topic, item["partition"]) for item in described[output_topic]]
    probe = AIOKafkaConsumer(bootstrap_servers=spec.bootstrap_servers, **spec.security.client_options(),
                             group_id=None, enable_auto_commit=False,
                             request_timeout_ms=spec.request_timeout_ms)
    await _start(probe, "consumer", spec.bootstrap_servers)
    try:
        beginning = await probe.beginning_offsets(partitions)
        ends = await probe.end_offsets(partitions)
    finally:
        await probe.stop()
    records = sum(ends[tp] - beginning[tp] for tp in partitions)
    if records and not allow_existing_output:
        raise ConfigError(f"Output topic {output_topic!r} already contains {records} records: choose a new topic "
                          "or pass --allow-existing-output to append to it")
    return len(partitions)
