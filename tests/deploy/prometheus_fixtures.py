"""A real Prometheus server for tests, and checks that PromQL expressions return data from it.

``prometheus_factory`` is a pytest fixture that returns ``start(targets, ...)``.
Each call starts the ``prometheus`` binary on 127.0.0.1 on a free port with its own
data directory under ``tmp_path`` and a generated configuration that scrapes the
given ``host:port`` targets every second and loads the repository's rule files.
Every server is stopped at teardown. ``scripts/install-prometheus.sh`` installs
the binary.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.deploy.promql_expressions import RULE_FILES, Expression

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
# A start is retried when the free port found was taken by another process before Prometheus bound it.
START_ATTEMPTS = 3


def require_binary(name: str) -> str:
    """Return the path of ``name`` on PATH, or fail the test with the install command."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `bash scripts/install-prometheus.sh` first", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrometheusServer:
    """A running Prometheus process and its HTTP API."""

    port: int
    data_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen
    targets: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> dict:
        """Send a GET request to the HTTP API and return the ``data`` of a successful response."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")
            raise AssertionError(f"GET {url} returned {error.code}: {detail}") from error
        if body.get("status") != "success":
            raise AssertionError(f"GET {url} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Evaluate an instant query now and return its result series (``metric`` and ``value`` each)."""
        data = self.api_get("/api/v1/query", {"query": promql})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def active_targets(self) -> list[dict]:
        return self.api_get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for_targets_up(self, timeout: float = 30.0) -> None:
        """Wait until every configured target has been scraped successfully."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.active_targets()
            if targets and all(target["health"] == "up" for target in targets):
                return
            if time.monotonic() >= deadline:
                states = [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in targets]
                raise AssertionError(f"targets not up within {timeout:.0f} s: {states}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"last {lines} lines of {self.log_path}:\n{tail}"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


def write_config(
    path: Path,
    targets: Sequence[str],
    job: str,
    rule_files: Iterable[Path],
    scrape_interval: str,
) -> None:
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(Path(rule_file).resolve()) for rule_file in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def start_prometheus(
    work_dir: Path,
    targets: Sequence[str],
    job: str = "streamer",
    rule_files: Iterable[Path] = RULE_FILES,
    scrape_interval: str = "1s",
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> PrometheusServer:
    """Start Prometheus scraping ``targets`` (``host:port`` strings) and wait until it is ready.

    Rules are evaluated at the scrape interval. Fails the test with the server log
    tail when Prometheus does not become ready within ``startup_timeout`` seconds.
    """
    binary = require_binary("prometheus")
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "prometheus.yml"
    write_config(config_path, targets, job, rule_files, scrape_interval)

    last_server = None
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        data_dir = work_dir / f"data-{attempt}"
        log_path = work_dir / f"prometheus-{attempt}.log"
        command = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=info",
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = PrometheusServer(port, data_dir, config_path, log_path, process, list(targets))
        if _wait_until_ready(server, startup_timeout):
            return server
        server.stop()
        last_server = server
        if "address already in use" not in server.log_tail():
            break

    pytest.fail(
        f"prometheus did not become ready within {startup_timeout:.0f} s "
        f"(exit code {last_server.process.returncode}).\n{last_server.log_tail()}",
        pytrace=False,
    )


def _wait_until_ready(server: PrometheusServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    return False


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterable[Callable[..., PrometheusServer]]:
    """Return ``start(targets, **options)`` (see ``start_prometheus``). Servers stop at teardown."""
    servers: list[PrometheusServer] = []

    def start(targets: Sequence[str], **options) -> PrometheusServer:
        server = start_prometheus(tmp_path / f"prometheus-{len(servers)}", targets, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def assert_expressions_return_data(
    prometheus: PrometheusServer,
    expressions: Iterable[Expression | str],
    timeout: float = 60.0,
    poll_interval: float = 1.0,
) -> None:
    """Query every expression until each returns at least one series, or fail listing those that do not.

    Expressions are retried until ``timeout`` seconds pass, because rates need two
    scrapes and recorded series need a rule evaluation after that.
    """
    pending = {}
    for expression in expressions:
        if isinstance(expression, str):
            expression = Expression(expression, expression)
        pending[expression.expr] = expression.source
    errors: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for expr in list(pending):
            try:
                result = prometheus.query(expr)
            except AssertionError as error:
                errors[expr] = str(error)
                continue
            errors.pop(expr, None)
            if result:
                del pending[expr]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)

    if pending:
        lines = [f"{len(pending)} expressions returned no data within {timeout:.0f} s:"]
        for expr, source in pending.items():
            lines.append(f"- {source}: {expr}")
            if expr in errors:
                lines.append(f"  error: {errors[expr]}")
        raise AssertionError("\n".join(lines))
