"""Fetch the Apache Kafka broker and console-tool jars from Maven Central.

The jars are resolved by Maven from ``deploy/kafka/pom.xml`` and copied into a
cache outside the git tree, ``$STREAMER_KAFKA_CACHE/<version>/libs`` (default
``~/.cache/streamer/kafka/<version>/libs``). A marker file written after a
successful copy makes later calls return without running Maven.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Kafka 4.1.2 (KRaft only) is the default because aiokafka 0.14 passes every
# check in tests/kafka/test_local_broker.py against it: consumer groups with
# commits, static membership (group_instance_id), idempotent produce, and
# transactions with send_offsets_to_transaction read back by read_committed
# consumers. The old protocol versions that Kafka 4.0 removed (KIP-896) are not
# ones aiokafka 0.14 negotiates for these calls.
DEFAULT_KAFKA_VERSION = "4.1.2"

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
POM_PATH = DEPLOY_DIR / "pom.xml"
LOG4J2_CONFIG_PATH = DEPLOY_DIR / "log4j2.xml"

MARKER_NAME = ".complete"
MVN_OUTPUT_TAIL_LINES = 40
MVN_TIMEOUT_S = 900.0


class KafkaJarsError(RuntimeError):
    """Raised when the Kafka jars cannot be fetched or are missing."""


def kafka_cache_root() -> Path:
    """Return the cache root, ``$STREAMER_KAFKA_CACHE`` or ``~/.cache/streamer/kafka``."""
    configured = os.environ.get("STREAMER_KAFKA_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "streamer" / "kafka"


def kafka_libs_dir(version: str = DEFAULT_KAFKA_VERSION, cache_root: Path | None = None) -> Path:
    """Return the cache directory for the jars of ``version``, which may not exist yet."""
    root = cache_root if cache_root is not None else kafka_cache_root()
    return root / version / "libs"


def kafka_classpath(libs_dir: Path) -> str:
    """Return a JVM class path that contains every jar in ``libs_dir``."""
    return str(libs_dir / "*")


def jars_complete(libs_dir: Path) -> bool:
    """Return True when ``libs_dir`` contains a finished copy of the jars."""
    return (libs_dir / MARKER_NAME).is_file()


def fetch_kafka_jars(
    version: str = DEFAULT_KAFKA_VERSION,
    cache_root: Path | None = None,
    *,
    mvn: str | None = None,
) -> Path:
    """Copy the Kafka jars of ``version`` into the cache and return their directory.

    Does nothing when the marker file shows a complete earlier copy. Maven
    downloads into its local repository (``~/.m2`` unless configured otherwise),
    so the first call needs access to Maven Central.

    Raises:
        KafkaJarsError: ``mvn`` or the pom is missing, or Maven fails. The
            message contains the tail of Maven's output.
    """
    libs_dir = kafka_libs_dir(version, cache_root)
    if jars_complete(libs_dir):
        return libs_dir

    # An exclusive lock serialises concurrent fetches of the same version, for
    # example from parallel test workers; the loser finds the marker and returns.
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(libs_dir.parent / ".fetch.lock", "w", encoding="utf-8") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if jars_complete(libs_dir):
            return libs_dir
        _run_maven_copy(version, libs_dir, mvn)
    return libs_dir


def _run_maven_copy(version: str, libs_dir: Path, mvn: str | None) -> None:
    mvn_path = mvn or shutil.which("mvn")
    if mvn_path is None:
        raise KafkaJarsError(
            "mvn not found on PATH; install Maven (Debian package 'maven') "
            f"to fetch the Kafka {version} jars into {libs_dir}"
        )
    if not POM_PATH.is_file():
        raise KafkaJarsError(f"Maven project not found: {POM_PATH}")

    # Copy into a sibling directory and rename it at the end, so that an
    # interrupted copy never looks complete.
    staging_dir = libs_dir.with_name(libs_dir.name + ".partial")
    shutil.rmtree(staging_dir, ignore_errors=True)

    command = [
        mvn_path,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={staging_dir}",
    ]
    logger.info("Fetching Kafka %s jars into %s", version, libs_dir)
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=MVN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        shutil.rmtree(staging_dir, ignore_errors=True)
        output = error.output if isinstance(error.output, str) else ""
        raise KafkaJarsError(
            f"mvn timed out after {MVN_TIMEOUT_S:.0f} s fetching Kafka {version} jars:\n"
            f"{_tail(output)}"
        ) from error

    if result.returncode != 0:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise KafkaJarsError(
            f"mvn failed with exit code {result.returncode} fetching Kafka {version} jars "
            f"(command: {' '.join(command)}):\n{_tail(result.stdout)}"
        )

    broker_jar = staging_dir / f"kafka_2.13-{version}.jar"
    if not broker_jar.is_file():
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise KafkaJarsError(f"mvn succeeded but {broker_jar.name} is missing from its output")

    (staging_dir / MARKER_NAME).write_text(version + "\n", encoding="utf-8")
    shutil.rmtree(libs_dir, ignore_errors=True)
    staging_dir.rename(libs_dir)
    logger.info(
        "Fetched Kafka %s jars into %s in %.1f s", version, libs_dir, time.monotonic() - started
    )


def _tail(text: str, lines: int = MVN_OUTPUT_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])
