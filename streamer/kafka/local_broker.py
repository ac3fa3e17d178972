"""Single-node Apache Kafka broker (KRaft, broker and controller in one JVM) on 127.0.0.1.

Used by tests, CI, benchmarks and the demo. The broker runs from the jars that
:mod:`streamer.kafka.jars` fetches from Maven Central, keeps its data under a
caller-chosen directory and can be stopped and started again on the same port
with the same data.

Files in the data directory:

- ``server.properties``: the broker configuration, rewritten on every start.
- ``kraft-logs/``: partition and metadata logs (``log.dirs``).
- ``broker.log``: the JVM's stdout and stderr, appended to on every start.
- ``broker.json``: state of the last start (pid, ports, version), read by the
  command line ``stop`` and ``status`` and by :meth:`LocalKafka.from_state_file`.

Command line::

    python -m streamer.kafka.local_broker start|stop|status [--data-dir DIR] [--port N]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from streamer.kafka.jars import (
    DEFAULT_KAFKA_VERSION,
    LOG4J2_CONFIG_PATH,
    KafkaJarsError,
    fetch_kafka_jars,
    kafka_classpath,
)

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
BROKER_MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_MAIN_CLASS = "kafka.tools.StorageTool"
NODE_ID = 1

PROPERTIES_NAME = "server.properties"
LOG_DIR_NAME = "kraft-logs"
BROKER_LOG_NAME = "broker.log"
STATE_FILE_NAME = "broker.json"
LOG_TAIL_LINES = 40

# A fixed 768 MiB heap keeps the broker light next to the service under test
# (Kafka's own scripts use 1 GiB and G1). ZGC, because SerialGC's young
# collections stopped the broker for 8-11 ms about every 0.75 s at 10,000
# events/s on the benchmark machine, which showed in the service's p99.
BROKER_JVM_OPTIONS = (
    "-Xms768m",
    "-Xmx768m",
    "-XX:+UseZGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

STATUS_NOT_RUNNING_EXIT_CODE = 3


class BrokerError(RuntimeError):
    """Raised when the local broker fails to format, start or stop."""


def default_data_dir() -> Path:
    """Return ``$STREAMER_KAFKA_DATA`` or ``~/.cache/streamer/kafka-data/default``."""
    configured = os.environ.get("STREAMER_KAFKA_DATA")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "streamer" / "kafka-data" / "default"


def java_executable() -> str:
    """Return the ``java`` binary from ``$JAVA_HOME`` or ``PATH``."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise BrokerError("java not found on PATH or in $JAVA_HOME; install a JDK 17 or newer")
    return found


@dataclasses.dataclass(frozen=True)
class BrokerState:
    """Contents of ``broker.json``: the last start of the broker in a data directory."""

    pid: int | None
    port: int
    controller_port: int
    version: str

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"


def read_state_file(data_dir: Path) -> BrokerState | None:
    """Return the state stored in ``data_dir``, or None when there is none."""
    path = Path(data_dir) / STATE_FILE_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise BrokerError(f"invalid broker state file {path}: {error}") from error
    return BrokerState(
        pid=raw.get("pid"),
        port=int(raw["port"]),
        controller_port=int(raw["controller_port"]),
        version=str(raw["version"]),
    )


class LocalKafka:
    """A single-node KRaft Kafka broker listening on 127.0.0.1.

    ``port=None`` reuses the port recorded in the data directory by an earlier
    start when that port is free, and otherwise picks a free port. After the
    first start the ports stay fixed, so ``stop()`` followed by ``start()``
    serves the same bootstrap address and the same data.

    A broker started with ``detach=False`` is stopped when the Python process
    exits normally. A broker started with ``detach=True`` runs in its own
    session and outlives the process.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        version: str = DEFAULT_KAFKA_VERSION,
        *,
        controller_port: int | None = None,
        cache_root: Path | None = None,
        extra_listeners: Mapping[str, int] | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        for name, value in (("port", port), ("controller_port", controller_port)):
            if value is not None and not 0 < value < 65536:
                raise ValueError(f"{name} must be between 1 and 65535, got {value}")
        self.data_dir = Path(data_dir).resolve()
        self.version = version
        self.cache_root = cache_root
        self._port = port
        self._controller_port = controller_port
        # More client listeners, named by their security protocol (SSL, SASL_PLAINTEXT, SASL_SSL), with their
        # ports, and the broker properties they need (keystores, JAAS configuration).
        self.extra_listeners = dict(extra_listeners or {})
        self.extra_properties = dict(extra_properties or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._detached = False
        self._log_offset = 0

        previous = read_state_file(self.data_dir)
        if previous is not None:
            if self._port is None and _port_is_free(previous.port):
                self._port = previous.port
            if self._controller_port is None and _port_is_free(previous.controller_port):
                self._controller_port = previous.controller_port

    @classmethod
    def from_state_file(cls, data_dir: Path) -> LocalKafka:
        """Return a handle on the broker recorded in ``data_dir``, which may run in another process.

        Raises:
            BrokerError: ``data_dir`` contains no state file.
        """
        state = read_state_file(data_dir)
        if state is None:
            raise BrokerError(f"no broker state file in {data_dir}; start a broker there first")
        broker = cls(
            data_dir, state.port, state.version, controller_port=state.controller_port
        )
        if state.pid is not None and broker._owns_pid(state.pid):
            broker._pid = state.pid
            broker._detached = True
        return broker

    @property
    def port(self) -> int | None:
        """Port of the PLAINTEXT listener; None until the first start chooses one."""
        return self._port

    @property
    def controller_port(self) -> int | None:
        """Port of the KRaft CONTROLLER listener; None until the first start chooses one."""
        return self._controller_port

    @property
    def bootstrap_servers(self) -> str:
        """Bootstrap address ``127.0.0.1:<port>`` for Kafka clients."""
        if self._port is None:
            raise BrokerError("the broker port is not chosen yet; call start() first")
        return f"{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM while it runs, else None."""
        return self._pid if self.is_running() else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / BROKER_LOG_NAME

    @property
    def properties_path(self) -> Path:
        return self.data_dir / PROPERTIES_NAME

    @property
    def log_dir(self) -> Path:
        return self.data_dir / LOG_DIR_NAME

    def is_running(self) -> bool:
        """Return True while the broker process is alive, whether or not it serves requests."""
        if self._process is not None:
            return self._process.poll() is None
        if self._pid is None:
            return False
        return self._owns_pid(self._pid)

    def start(self, timeout_s: float = 60.0, *, detach: bool = False) -> str:
        """Start the broker and return its bootstrap address once it serves metadata.

        Fetches the jars when the cache lacks them and formats the storage on
        the first start in ``data_dir``. Returns at once when the broker already
        runs.

        Raises:
            BrokerError: the broker exited early or did not serve metadata
                within ``timeout_s`` (then it is killed). The message contains
                the last lines of ``broker.log``.
        """
        if self.is_running():
            return self.bootstrap_servers

        libs_dir = fetch_kafka_jars(self.version, self.cache_root)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        self._write_properties()
        if not self._storage_formatted():
            self._format_storage(libs_dir)

        started = time.monotonic()
        self._launch(libs_dir, detach)
        try:
            self._wait_until_ready(started + timeout_s, timeout_s)
        except BaseException:
            self._kill()
            raise
        logger.info(
            "Kafka %s broker pid %d serves %s (data %s) after %.1f s",
            self.version,
            self._pid,
            self.bootstrap_servers,
            self.data_dir,
            time.monotonic() - started,
        )
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the broker with SIGTERM, and with SIGKILL when it is still alive after ``timeout_s``."""
        atexit.unregister(self._stop_at_exit)
        if not self.is_running():
            self._forget_process()
            return

        pid = self._pid
        if pid is None:
            raise BrokerError("internal error: running broker without a pid")
        logger.info("Stopping Kafka broker pid %d (%s)", pid, self.bootstrap_servers)
        _signal(pid, signal.SIGTERM)
        if not self._wait_for_exit(timeout_s):
            logger.warning(
                "Kafka broker pid %d still alive %.0f s after SIGTERM; sending SIGKILL",
                pid,
                timeout_s,
            )
            _signal(pid, signal.SIGKILL)
            if not self._wait_for_exit(10.0):
                raise BrokerError(f"Kafka broker pid {pid} survived SIGKILL")
        self._forget_process()

    def restart(self, timeout_s: float = 60.0) -> str:
        """Stop the broker and start it again on the same ports with the same data."""
        detach = self._detached
        self.stop()
        return self.start(timeout_s, detach=detach)

    def log_tail(self, lines: int = LOG_TAIL_LINES, offset: int = 0) -> str:
        """Return the last ``lines`` lines of ``broker.log`` after byte ``offset``."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(offset)
                data = log_file.read()
        except FileNotFoundError:
            return "(no broker log)"
        text = data.decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LocalKafka(data_dir={str(self.data_dir)!r}, port={self._port}, "
            f"version={self.version!r}, pid={self.pid})"
        )

    # Configuration and storage.

    def _choose_ports(self) -> None:
        taken = {port for port in (self._port, self._controller_port) if port is not None}
        if self._port is None:
            self._port = _free_port(exclude=taken)
            taken.add(self._port)
        if self._controller_port is None:
            self._controller_port = _free_port(exclude=taken)
        if self._port == self._controller_port:
            raise BrokerError(f"broker and controller ports must differ, both are {self._port}")

    def _write_properties(self) -> None:
        extra = [f"{name}://{HOST}:{port}" for name, port in self.extra_listeners.items()]
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            # A static voter set keeps the quorum independent of the ports in
            # the formatted storage, so a restart may use other ports.
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{self._controller_port}",
            "listeners": ",".join([f"PLAINTEXT://{HOST}:{self._port}", f"CONTROLLER://{HOST}:{self._controller_port}",
                                   *extra]),
            "advertised.listeners": ",".join([f"PLAINTEXT://{HOST}:{self._port}", *extra]),
            "listener.security.protocol.map": ",".join(["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT",
                                                        *(f"{name}:{name}" for name in self.extra_listeners)]),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            # One partition each for the internal topics: creating the default
            # 50 partitions delays the first group join and transaction by seconds.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.retention.hours": "168",
            **self.extra_properties,
        }
        lines = ["# Written by streamer.kafka.local_broker on every start."]
        lines += [f"{key}={value}" for key, value in properties.items()]
        self.properties_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _formatted_cluster_id(self) -> str | None:
        """Return the cluster id in the formatted storage's meta.properties, or None before formatting."""
        try:
            lines = (self.log_dir / "meta.properties").read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        return next((line.split("=", 1)[1].strip() for line in lines if line.startswith("cluster.id=")), None)

    def _storage_formatted(self) -> bool:
        return (self.log_dir / "meta.properties").is_file()

    def _format_storage(self, libs_dir: Path) -> None:
        cluster_id = _random_kafka_uuid()
        command = [
            java_executable(),
            *tool_jvm_options(),
            "-cp",
            kafka_classpath(libs_dir),
            STORAGE_TOOL_MAIN_CLASS,
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.properties_path),
            "--ignore-formatted",
        ]
        logger.info("Formatting Kafka storage in %s (cluster id %s)", self.log_dir, cluster_id)
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
        if result.returncode != 0 or not self._storage_formatted():
            output = result.stdout.decode("utf-8", errors="replace")
            tail = "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
            raise BrokerError(
                f"formatting Kafka storage in {self.log_dir} failed "
                f"(exit code {result.returncode}):\n{tail}"
            )

    # Process management.

    def _launch(self, libs_dir: Path, detach: bool) -> None:
        command = [
            java_executable(),
            *BROKER_JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG_PATH}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            kafka_classpath(libs_dir),
            BROKER_MAIN_CLASS,
            str(self.properties_path),
        ]
        with open(self.log_path, "ab") as log_file:
            log_file.write(
                f"\n===== streamer: starting Kafka {self.version} on {self.bootstrap_servers} "
                f"at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} =====\n".encode()
            )
            self._log_offset = log_file.tell()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=detach,
            )
        self._pid = self._process.pid
        self._detached = detach
        if not detach:
            atexit.register(self._stop_at_exit)
        self._write_state_file(self._pid)

    def _wait_until_ready(self, deadline: float, timeout_s: float) -> None:
        if self._process is None:
            raise BrokerError("internal error: waiting for a broker that was not launched")
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise BrokerError(
                    f"Kafka broker exited with code {exit_code} during startup on "
                    f"{self.bootstrap_servers}; last lines of {self.log_path}:\n"
                    f"{self.log_tail(offset=self._log_offset)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"Kafka broker on {self.bootstrap_servers} did not serve metadata within "
                    f"{timeout_s:.0f} s and was killed; last lines of {self.log_path}:\n"
                    f"{self.log_tail(offset=self._log_offset)}"
                )
            # Another broker may already listen on the port (this one then fails to bind): only a response
            # with the cluster id formatted here counts.
            brokers, cluster_id = probe_broker(HOST, self._port or 0, min(2.0, remaining))
            if brokers > 0 and cluster_id == self._formatted_cluster_id():
                return
            time.sleep(0.2)

    def _wait_for_exit(self, timeout_s: float) -> bool:
        if self._process is not None:
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _kill(self) -> None:
        if self._pid is not None and self.is_running():
            _signal(self._pid, signal.SIGKILL)
            self._wait_for_exit(10.0)
        atexit.unregister(self._stop_at_exit)
        self._forget_process()

    def _forget_process(self) -> None:
        self._process = None
        self._pid = None
        if self._port is not None and self._controller_port is not None:
            self._write_state_file(None)

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except BrokerError:
            logger.exception("Failed to stop Kafka broker %s at exit", self.data_dir)

    def _owns_pid(self, pid: int) -> bool:
        """Return True when ``pid`` is a live broker JVM started with this data directory."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return BROKER_MAIN_CLASS.encode() in cmdline and str(self.properties_path).encode() in cmdline

    def _write_state_file(self, pid: int | None) -> None:
        state = {
            "pid": pid,
            "port": self._port,
            "controller_port": self._controller_port,
            "version": self.version,
            "bootstrap_servers": self.bootstrap_servers,
        }
        path = self.data_dir / STATE_FILE_NAME
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)


def probe_broker_count(host: str, port: int, timeout_s: float) -> int:
    """Send a Metadata v4 request and return the number of live brokers in the response.

    Returns 0 when the connection fails or the broker has not yet registered,
    since a KRaft broker lists itself only once the controller has unfenced it.
    Metadata v4 is supported by Kafka 1.0 through 4.x (Kafka 4.0 removed v0-v3).
    """
    return probe_broker(host, port, timeout_s)[0]


def probe_broker(host: str, port: int, timeout_s: float) -> tuple[int, str | None]:
    """Return the live broker count and the cluster id of a Metadata v4 response; (0, None) on no response."""
    correlation_id = 1
    client_id = b"streamer-probe"
    # Request header v1 (api key 3 = Metadata, version 4), then an empty topic
    # array (no topics) and allow_auto_topic_creation = false.
    body = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i?", 0, False)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _receive_exactly(connection, 4))
            response = _receive_exactly(connection, size)
    except (OSError, EOFError):
        return 0, None
    # Response: correlation id, throttle_time_ms, the broker array, then the cluster id.
    received_correlation_id, _throttle_ms, broker_count = struct.unpack_from(">iii", response)
    if received_correlation_id != correlation_id or broker_count <= 0:
        return 0, None
    position = 12
    for _ in range(broker_count):
        # node_id int32, host string, port int32, rack nullable string
        (host_length,) = struct.unpack_from(">h", response, position + 4)
        position += 4 + 2 + host_length + 4
        (rack_length,) = struct.unpack_from(">h", response, position)
        position += 2 + max(rack_length, 0)
    (cluster_length,) = struct.unpack_from(">h", response, position)
    if cluster_length < 0:
        return broker_count, None
    return broker_count, response[position + 2:position + 2 + cluster_length].decode("utf-8")


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise EOFError("connection closed by the broker")
        chunks += chunk
    return bytes(chunks)


def tool_jvm_options() -> list[str]:
    """Return the JVM options of Kafka's short-lived command-line tools: small heap, quick start, WARN logs."""
    return [
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J2_CONFIG_PATH}",
        "-Dstreamer.kafka.log.level=WARN",
    ]


def _random_kafka_uuid() -> str:
    """Return a cluster id in Kafka's format: 16 random bytes, URL-safe base64 without padding.

    An id that starts with "-" is drawn again, as Kafka's own ``Uuid.randomUuid`` does: the storage tool's
    argument parser reads ``--cluster-id -abc...`` as a missing value followed by an unknown option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _free_port(exclude: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port not in exclude:
            return port
    raise BrokerError(f"no free TCP port found on {HOST}")


def _port_is_free(port: int) -> bool:
    """Return whether a server can listen on ``port``.

    The probe sets SO_REUSEADDR as the JVM does for server sockets on Linux, so connections of clients left in
    TIME-WAIT after a broker crash do not make the broker's recorded port look taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _signal(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


# Command line.


def start_detached(
    data_dir: Path | None = None,
    port: int | None = None,
    version: str = DEFAULT_KAFKA_VERSION,
    timeout_s: float = 60.0,
) -> str:
    """Start a broker that outlives this process, or find the running one, and return its bootstrap address."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if read_state_file(data_dir) is not None:
        running = LocalKafka.from_state_file(data_dir)
        if running.is_running():
            if port is not None and port != running.port:
                raise BrokerError(
                    f"a broker already runs with {data_dir} on port {running.port}, "
                    f"not {port}; stop it first"
                )
            return running.bootstrap_servers
    return LocalKafka(data_dir, port, version).start(timeout_s, detach=True)


def stop_detached(data_dir: Path | None = None, timeout_s: float = 30.0) -> bool:
    """Stop the broker recorded in ``data_dir``; return False when none was running."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if read_state_file(data_dir) is None:
        return False
    broker = LocalKafka.from_state_file(data_dir)
    if not broker.is_running():
        return False
    broker.stop(timeout_s)
    return True


def broker_status(data_dir: Path | None = None) -> BrokerState | None:
    """Return the state of the broker running with ``data_dir``, or None when none runs."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if read_state_file(data_dir) is None:
        return None
    broker = LocalKafka.from_state_file(data_dir)
    if not broker.is_running():
        return None
    return BrokerState(
        pid=broker.pid,
        port=broker.port or 0,
        controller_port=broker.controller_port or 0,
        version=broker.version,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamer.kafka.local_broker",
        description="Run a single-node Apache Kafka broker on 127.0.0.1 in the background.",
    )
    parser.add_argument(
        "command",
        choices=("start", "stop", "status"),
        help="start: start the broker (or find the running one) and print its bootstrap "
        "address; stop: stop it; status: print its state (exit code 3 when stopped)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="broker data directory (default: $STREAMER_KAFKA_DATA or "
        "~/.cache/streamer/kafka-data/default)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="PLAINTEXT listener port for start (default: the port of the previous run "
        "in the data directory when free, else a free port)",
    )
    parser.add_argument(
        "--kafka-version",
        default=DEFAULT_KAFKA_VERSION,
        help=f"Apache Kafka version for start (default: {DEFAULT_KAFKA_VERSION})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the broker to start or stop (default: 60)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    args = build_parser().parse_args(argv)
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        if args.command == "start":
            print(start_detached(data_dir, args.port, args.kafka_version, args.timeout))
            return 0
        if args.command == "stop":
            if stop_detached(data_dir, args.timeout):
                print(f"stopped Kafka broker in {data_dir}")
            else:
                print(f"no Kafka broker running in {data_dir}")
            return 0
        state = broker_status(data_dir)
        if state is None:
            print(f"stopped (data dir {data_dir})")
            return STATUS_NOT_RUNNING_EXIT_CODE
        print(
            f"running pid={state.pid} bootstrap={state.bootstrap_servers} "
            f"version={state.version} data_dir={data_dir}"
        )
        return 0
    except (BrokerError, KafkaJarsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
