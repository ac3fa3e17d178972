"""Wrappers around Apache Kafka's own console producer and consumer.

These run the Java clients from the jars that :mod:`streamer.kafka.jars`
fetches, so tests can check that records written or read by aiokafka are
interoperable with the reference client. Main classes (verified in
kafka-tools 4.1.2):

- ``org.apache.kafka.tools.ConsoleProducer``
- ``org.apache.kafka.tools.consumer.ConsoleConsumer``

Each call starts a JVM, which takes one to two seconds.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from streamer.kafka.jars import (
    DEFAULT_KAFKA_VERSION,
    fetch_kafka_jars,
    kafka_classpath,
)
from streamer.kafka.local_broker import java_executable, tool_jvm_options

logger = logging.getLogger(__name__)

CONSOLE_PRODUCER_MAIN_CLASS = "org.apache.kafka.tools.ConsoleProducer"
CONSOLE_CONSUMER_MAIN_CLASS = "org.apache.kafka.tools.consumer.ConsoleConsumer"

# Separates key and value on both tools' text streams. Both tools split at the
# first tab, so only keys must be free of it; JSON escapes tabs inside strings.
KEY_SEPARATOR = "\t"
# The console producer reads one record per line, while the consumer prints
# records separated by the ASCII record separator, so consumed values may
# contain newlines.
RECORD_SEPARATOR = "\x1e"
# Stands for a null key or value on the text streams. An actual key or value
# equal to this marker is also read as null.
NULL_MARKER = "<streamer-null>"

JVM_STARTUP_ALLOWANCE_S = 30.0
OUTPUT_TAIL_LINES = 40

Record = tuple[bytes | None, bytes | None]


class ConsoleToolError(RuntimeError):
    """Raised when a Kafka console tool fails or receives invalid input."""


def console_produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes]],
    *,
    timeout_s: float = 60.0,
    version: str = DEFAULT_KAFKA_VERSION,
    compression: str = "none",
) -> None:
    """Write ``(key, value)`` records to ``topic`` with Kafka's console producer, acks=all.

    ``compression`` is the producer's ``compression.type``: none, gzip, snappy, lz4 or zstd.

    Keys and values must be UTF-8 text without line breaks, because the tool
    reads one record per line and encodes it as UTF-8. Keys must not contain a
    tab. A None key is sent as a null key.

    Raises:
        ValueError: a key or value cannot be represented on the tool's input.
        ConsoleToolError: the tool exited with an error or timed out.
    """
    lines = [_encode_input_line(key, value) for key, value in records]
    command = [
        *tool_command(version, CONSOLE_PRODUCER_MAIN_CLASS),
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--request-required-acks",
        "all",
        "--property",
        "parse.key=true",
        "--property",
        f"key.separator={KEY_SEPARATOR}",
        "--property",
        f"null.marker={NULL_MARKER}",
        "--compression-codec",
        compression,
    ]
    stdin = "".join(line + "\n" for line in lines).encode("utf-8")
    _run_tool(command, stdin, timeout_s + JVM_STARTUP_ALLOWANCE_S, "console producer")


def console_consume(
    bootstrap: str,
    topic: str,
    max_messages: int,
    timeout_s: float,
    isolation_level: str = "read_committed",
    from_beginning: bool = True,
    *,
    version: str = DEFAULT_KAFKA_VERSION,
) -> list[Record]:
    """Read up to ``max_messages`` records from ``topic`` with Kafka's console consumer.

    The tool stops after ``max_messages`` records or after ``timeout_s``
    seconds without a new record, whichever comes first, so the result may be
    shorter than ``max_messages``. It joins a fresh consumer group each call.
    A key containing a tab or a value containing the ASCII record separator
    (0x1e) is split wrongly.

    Raises:
        ValueError: ``isolation_level`` or ``max_messages`` is invalid.
        ConsoleToolError: the tool exited with an error or did not exit in time.
    """
    if isolation_level not in ("read_committed", "read_uncommitted"):
        raise ValueError(
            f"isolation_level must be 'read_committed' or 'read_uncommitted', "
            f"got {isolation_level!r}"
        )
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")

    command = [
        *tool_command(version, CONSOLE_CONSUMER_MAIN_CLASS),
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--max-messages",
        str(max_messages),
        "--timeout-ms",
        str(int(timeout_s * 1000)),
        "--isolation-level",
        isolation_level,
        "--property",
        "print.key=true",
        "--property",
        f"key.separator={KEY_SEPARATOR}",
        "--property",
        f"line.separator={RECORD_SEPARATOR}",
        "--property",
        f"null.literal={NULL_MARKER}",
    ]
    if from_beginning:
        command.append("--from-beginning")

    # On --timeout-ms the tool logs a TimeoutException and still exits with 0.
    output = _run_tool(command, b"", timeout_s + JVM_STARTUP_ALLOWANCE_S, "console consumer")
    return _decode_output(output)


def _encode_input_line(key: bytes | None, value: bytes) -> str:
    key_text = NULL_MARKER if key is None else _decode_field(key, "key")
    value_text = _decode_field(value, "value")
    if KEY_SEPARATOR in key_text:
        raise ValueError(f"console producer keys must not contain a tab: {key!r}")
    return key_text + KEY_SEPARATOR + value_text


def _decode_field(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"console producer {name} is not valid UTF-8: {raw!r}") from error
    if "\n" in text or "\r" in text:
        raise ValueError(f"console producer {name} must not contain a line break: {raw!r}")
    return text


def _decode_output(output: bytes) -> list[Record]:
    null_marker = NULL_MARKER.encode("utf-8")
    separator = KEY_SEPARATOR.encode("utf-8")
    records: list[Record] = []
    for frame in output.split(RECORD_SEPARATOR.encode("utf-8")):
        if not frame:
            continue
        key, found, value = frame.partition(separator)
        if not found:
            raise ConsoleToolError(f"console consumer printed a record without a key separator: {frame!r}")
        records.append(
            (None if key == null_marker else key, None if value == null_marker else value)
        )
    return records


def tool_command(version: str, main_class: str) -> list[str]:
    """Return the command line that runs ``main_class`` of the Kafka jars of ``version`` (fetched if missing)."""
    libs_dir: Path = fetch_kafka_jars(version)
    return [
        java_executable(),
        *tool_jvm_options(),
        "-cp",
        kafka_classpath(libs_dir),
        main_class,
    ]


def _run_tool(command: list[str], stdin: bytes, timeout_s: float, name: str) -> bytes:
    logger.debug("Running Kafka %s: %s", name, command)
    try:
        result = subprocess.run(
            command,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr if isinstance(error.stderr, bytes) else b""
        raise ConsoleToolError(
            f"Kafka {name} did not exit within {timeout_s:.0f} s; stderr:\n{_tail(stderr)}"
        ) from error
    if result.returncode != 0:
        raise ConsoleToolError(
            f"Kafka {name} failed with exit code {result.returncode}; stderr:\n"
            f"{_tail(result.stderr)}"
        )
    return result.stdout


def _tail(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-OUTPUT_TAIL_LINES:])
