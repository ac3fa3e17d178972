"""File backtests: replay a JSON Lines, CSV or Parquet file through the engine, with no broker."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.backtest.progress import EventProgress
from streamer.engine import Engine
from streamer.engine.batch import EventBatch
from streamer.engine.gc_pause import scheduled_collection
from streamer.errors import ConfigError
from streamer.io.events import DeadLetter, EventDecoder, EventFormat
from streamer.io.files import (OutputWriter, RecordChunk, StagedFile, check_input_file, count_csv_rows,
                               read_records)
from streamer.io.outputs import encode_dead_letter_line, encode_output_lines, encode_outputs, file_source
from streamer.model.network import RecurrentModel

logger = logging.getLogger(__name__)


@dataclass
class BacktestResult:
    """Counts and paths of one backtest run."""

    events: int = 0
    outputs: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    # Entities in state at the end; with --max-entities or --idle-expiry-ms, fewer than the run saw.
    entities: int = 0
    evictions: int = 0
    expirations: int = 0
    elapsed_s: float = 0.0
    output_path: Path | None = None
    dead_letter_path: Path | None = None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events, "outputs": self.outputs, "dead_letters": self.dead_letters,
            "duplicates": self.duplicates, "entities_in_state": self.entities, "evictions": self.evictions,
            "expirations": self.expirations, "elapsed_s": round(self.elapsed_s, 3),
            "events_per_second": round(self.events_per_s, 1), "output": str(self.output_path),
            "dead_letter_output": str(self.dead_letter_path), "dead_letter_reasons": self.dead_letter_reasons,
        }


def dead_letter_path_for(output_path: Path) -> Path:
    """Return the dead-letter file beside an output file: ``out.jsonl`` -> ``out.dead-letter.jsonl``."""
    return output_path.with_name(f"{output_path.stem}.dead-letter.jsonl")


def event_format_for(model: RecurrentModel, max_record_bytes: int = 1_048_576, entity_field: str = "entity"
                     ) -> EventFormat:
    manifest = model.manifest
    return EventFormat(input_size=manifest.input_size, feature_names=manifest.feature_names,
                       max_record_bytes=max_record_bytes, entity_field=entity_field,
                       output_size=manifest.output_size)


def run_file_backtest(model: RecurrentModel, input_path: str | Path, output_path: str | Path, *,
                      semantics: str = "stateful", batch_size: int = 4096, max_entities: int | None = None,
                      idle_expiry_ms: int | None = None, max_record_bytes: int = 1_048_576,
                      progress: bool | None = None) -> BacktestResult:
    """Replay ``input_path`` in file order and write one output per valid event, in input order.

    Invalid records go to the dead-letter file beside the output with their reason. The same input and
    batch size give byte-identical output. Both files replace earlier ones only when the run completes.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    check_input_file(input_path)
    for role, path in (("output", output_path), ("dead-letter", dead_letter_path_for(output_path))):
        if path.exists() and input_path.exists() and path.samefile(input_path):
            raise ConfigError(f"The {role} file {path} is the input file {input_path}: choose another output path")
    engine = Engine(model, semantics, capacity=max_entities, idle_expiry_ms=idle_expiry_ms)
    decoder = EventDecoder(event_format_for(model, max_record_bytes))
    result = BacktestResult(output_path=output_path, dead_letter_path=dead_letter_path_for(output_path))
    show_progress = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    # The output file closes first: if that fails, the dead-letter file is discarded too.
    with scheduled_collection() as collector, StagedFile(result.dead_letter_path) as dead_file, \
            OutputWriter(output_path) as writer, \
            EventProgress(f"backtest {input_path.name}", _total_events(input_path, show_progress),
                          show_progress) as advance:
        for chunk in read_records(input_path, batch_size, model.manifest.feature_names):
            batch, dead = decode_chunk(decoder, chunk)
            step = engine.process(batch)
            output_source = file_source(input_path.name, batch)
            if writer.writes_lines:
                produced, lines = encode_output_lines(batch, step, model.fingerprint, output_source)
                writer.write_lines(produced, lines)
            else:
                outputs = encode_outputs(batch, step, model.fingerprint, output_source)
                writer.write([value for _, _, value in outputs])
                produced = len(outputs)
            for letter in dead:
                source = {"file": input_path.name, "record": chunk.indices[letter.index]}
                dead_file.write(encode_dead_letter_line(letter, source) + b"\n")
                result.dead_letter_reasons[letter.reason] = result.dead_letter_reasons.get(letter.reason, 0) + 1
            result.events += len(chunk.values)
            result.outputs += produced
            result.dead_letters += len(dead)
            result.duplicates += step.duplicates
            advance(len(chunk.values))
            collector.maybe_collect()
    result.elapsed_s = time.perf_counter() - started
    result.entities = len(engine.arena)
    result.evictions, result.expirations = engine.arena.evictions, engine.arena.expirations
    logger.info("Backtest of %s: %d events, %d outputs, %d dead letters in %.2f s", input_path, result.events,
                result.outputs, result.dead_letters, result.elapsed_s)
    return result


def decode_chunk(decoder: EventDecoder, chunk: RecordChunk) -> tuple[EventBatch, list[DeadLetter]]:
    """Decode a chunk of file records; records the reader found invalid become dead letters with its reasons."""
    if not chunk.invalid:
        return decoder.decode([None] * len(chunk.values), chunk.values, None, chunk.indices)
    # A value of None never decodes to an event, so each invalid record yields exactly one dead letter here.
    values = [None if position in chunk.invalid else value for position, value in enumerate(chunk.values)]
    batch, dead = decoder.decode([None] * len(values), values, None, chunk.indices)
    letters = []
    for letter in dead:
        if letter.index in chunk.invalid:
            reason, message = chunk.invalid[letter.index]
            letter = DeadLetter(letter.index, letter.key, chunk.values[letter.index], reason, message)
        letters.append(letter)
    return batch, letters


def _total_events(path: Path, counted: bool) -> int | None:
    """Count the records for the progress bar (lines of JSON Lines, rows of CSV or Parquet), or None without a bar."""
    suffix = path.suffix.lower()
    if not counted or not path.is_file():
        return None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # an unreadable file gets its own error from the reader; the bar just has no total
            return None
    if suffix == ".csv":
        return count_csv_rows(path)
    if suffix not in (".jsonl", ".ndjson", ".json"):
        return None
    return _count_lines(path)


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
