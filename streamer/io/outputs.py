"""Encoding outputs and dead letters."""

from __future__ import annotations

import base64
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from streamer.engine.batch import EventBatch, StepResult
from streamer.engine.gc_pause import paused_gc
from streamer.io.events import DeadLetter
from streamer.state.arena import NO_TIME

# Dead-letter header names; values are UTF-8 text.
HEADER_REASON = "streamer.reason"
HEADER_ERROR = "streamer.error"
HEADER_SOURCE_TOPIC = "streamer.source.topic"
HEADER_SOURCE_PARTITION = "streamer.source.partition"
HEADER_SOURCE_OFFSET = "streamer.source.offset"
# The byte length of an original value left out because the dead letter would exceed the topic's limit.
HEADER_VALUE_OMITTED = "streamer.value.omitted"

# A function from batch positions to the ``source`` objects of the events at those positions.
SourceFn = Callable[[list[int]], list[dict[str, Any]]]


def encode_outputs(batch: EventBatch, result: StepResult, fingerprint: str, source: SourceFn
                   ) -> list[tuple[int, bytes, bytes]]:
    """Return ``(event position, key, value)`` for every applied event, in batch order.

    ``source(positions)`` gives the ``source`` objects of the events at those positions of the batch.
    """
    entities = batch.entities
    with paused_gc():
        positions, documents = _output_documents(batch, result, fingerprint, source)
        values = _dumps_each(documents)
        return [(position, entities[position].encode(), value) for position, value in zip(positions, values)]


def encode_output_lines(batch: EventBatch, result: StepResult, fingerprint: str, source: SourceFn
                        ) -> tuple[int, bytes]:
    """Return the number of outputs and their JSON Lines, each line ending in a newline.

    The bytes equal the values of ``encode_outputs`` joined by newlines, made with one orjson call and one
    replacement of the separator between documents instead of one bytes object per output.
    """
    with paused_gc():
        _, documents = _output_documents(batch, result, fingerprint, source)
        if not documents:
            return 0, b""
        # The separator occurs only between documents (see _SEPARATOR), so replacing it splits the lines.
        return len(documents), orjson.dumps(documents)[1:-1].replace(_SEPARATOR, _LINE_SEPARATOR) + b"\n"


def _output_documents(batch: EventBatch, result: StepResult, fingerprint: str, source: SourceFn
                      ) -> tuple[list[int], list[dict]]:
    entities = batch.entities
    predictions = result.predictions.tolist()
    steps = result.steps.tolist()
    ts_column = [None if ts == NO_TIME else ts for ts in batch.ts_ms.tolist()]
    positions = np.flatnonzero(result.applied).tolist()
    documents = [{"entity": entities[position], "ts": ts_column[position], "step": steps[position],
                  "prediction": predictions[position], "model": fingerprint, "source": event_source}
                 for position, event_source in zip(positions, source(positions))]
    if batch.targets is not None:
        targets = batch.targets
        for position, document in zip(positions, documents):
            if targets[position] is not None:
                document["target"] = targets[position]
    return positions, documents


# Every output document starts with its "entity" key. Between two documents in one JSON array, orjson writes
# this separator. It cannot occur inside an encoded string, because a quote there is always escaped, nor
# inside a document, whose values contain no lists of objects.
_DOCUMENT_START = b'{"entity":'
_SEPARATOR = b'},{"entity":'
_LINE_SEPARATOR = b'}\n{"entity":'


def _dumps_each(documents: list[dict]) -> list[bytes]:
    """Encode each document as orjson would alone, with one orjson call for the whole list."""
    if not documents:
        return []
    pieces = orjson.dumps(documents)[len(_DOCUMENT_START) + 1:-2].split(_SEPARATOR)
    if len(pieces) != len(documents):
        return [orjson.dumps(document) for document in documents]
    return [_DOCUMENT_START + piece + b"}" for piece in pieces]


def topic_source(topics: Sequence[str], batch: EventBatch) -> SourceFn:
    """Return the sources ``{topic, partition, offset}`` of a batch decoded from Kafka records.

    ``topics[i]`` is the topic of the batch's input record ``i``, and ``batch.record_index`` maps positions to
    records. Partitions and offsets come from the batch.
    """
    record_index = batch.record_index.tolist()
    partitions = batch.partitions.tolist()
    offsets = batch.offsets.tolist()
    return lambda positions: [{"topic": topics[record_index[position]], "partition": partitions[position],
                               "offset": offsets[position]} for position in positions]


def file_source(file_name: str, batch: EventBatch) -> SourceFn:
    """Return the sources ``{file, record}`` of a batch read from a file."""
    offsets = batch.offsets.tolist()
    return lambda positions: [{"file": file_name, "record": offsets[position]} for position in positions]


def dead_letter_headers(letter: DeadLetter, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead-letter record: reason code, error message and where the record came from."""
    return [
        (HEADER_REASON, letter.reason.encode()),
        (HEADER_ERROR, letter.message.encode("utf-8", "replace")),
        (HEADER_SOURCE_TOPIC, topic.encode()),
        (HEADER_SOURCE_PARTITION, str(partition).encode()),
        (HEADER_SOURCE_OFFSET, str(offset).encode()),
    ]


def encode_dead_letter_line(letter: DeadLetter, source: dict[str, Any]) -> bytes:
    """Encode one JSON line for a dead-letter file: reason, message, source, and the original bytes in base64."""
    document: dict[str, Any] = {"reason": letter.reason, "message": letter.message, "source": source}
    for name, raw in (("key", letter.key), ("value", letter.value)):
        document[f"{name}_base64"] = None if raw is None else base64.b64encode(raw).decode()
    return orjson.dumps(document)
