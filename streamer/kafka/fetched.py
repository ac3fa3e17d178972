"""Records of one fetch, flattened into parallel columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from aiokafka import TopicPartition


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
    # Each record's headers, as (name, value) pairs; None when no record of the batch has any.
    headers: list[Sequence[tuple[str, bytes]]] | None = None
    # The offset of each partition's first record in the batch.
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: dict[TopicPartition, list]) -> FetchedBatch:
        topics, partitions, offsets, timestamps, keys, values, headers = [], [], [], [], [], [], []
        first_offsets, next_offsets = {}, {}
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
                headers.append(message.headers)
            first_offsets[tp] = messages[0].offset
            next_offsets[tp] = messages[-1].offset + 1
        return cls(topics, np.asarray(partitions, np.int32), np.asarray(offsets, np.int64), timestamps, keys,
                   values, next_offsets, headers if any(headers) else None, first_offsets)

    def __len__(self) -> int:
        return len(self.values)


def stream_numbers(topics: list[str], partitions: Sequence[int] | np.ndarray, topic_order: Sequence[str]
                   ) -> np.ndarray:
    """Number each record's input stream: its topic's position in ``topic_order`` and its partition.

    Offsets are comparable only within one stream. With one topic, the number is the partition.
    """
    positions = {topic: position for position, topic in enumerate(topic_order)}
    return (np.array([positions[topic] for topic in topics], np.int64) << 32) | np.asarray(partitions, np.int64)
