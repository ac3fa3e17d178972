"""Settings: one typed, frozen object built from flags, ``STREAMER_*`` environment variables and a TOML file.

Precedence, highest first: command-line flags, environment variables, the settings file, defaults.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, TomlConfigSettingsSource

from streamer.errors import ConfigError

ENV_PREFIX = "STREAMER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Every setting of streamer; each field ``name`` is backed by the variable ``STREAMER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Model and engine
    model: Path | None = Field(None, description="model bundle, or a plain state_dict file saved with "
                               "torch.save(net.state_dict(), path)")
    semantics: Literal["stateful", "window"] = Field("stateful", description="stateful or window")
    seq_len: int | None = Field(None, ge=1, description="window length for window semantics")
    device: str = Field("cpu", description="torch device for the model and the state arena")
    torch_threads: int | None = Field(1, ge=1, description="torch intra-op threads; one per process, scale out "
                                      "with more processes")
    max_entities: int | None = Field(None, ge=1, description="state capacity; least recently used entities are evicted")
    idle_expiry_ms: int | None = Field(None, ge=1, description="expire entities idle this long in event time")
    max_record_bytes: int = Field(1_048_576, ge=1, description="larger records are dead-lettered")
    entity_field: str = Field("entity", description="event field with the entity id when the key is empty")

    # Kafka service
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    input_topics: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["events"], description="input topics")
    output_topic: str = Field("predictions", description="output topic")
    dead_letter_topic: str = Field("events-dead-letter", description="dead-letter topic")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients connect to the brokers (security.protocol)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism for the SASL_* protocols (sasl.mechanism)")
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password; from the environment or the "
                                            "settings file only, never a flag")
    ssl_cafile: Path | None = Field(None, description="PEM certificates the brokers' certificates must chain to "
                                    "(default: the system's trusted certificates)")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require one")
    ssl_keyfile: Path | None = Field(None, description="unencrypted PEM key of the client certificate")
    ssl_check_hostname: bool = Field(True, description="check that a broker's certificate names its host")
    group_id: str = Field("streamer", description="consumer group id")
    group_instance_id: str | None = Field(None, description="static membership id (group.instance.id)")
    client_id: str = Field("streamer", description="client id of the member's consumer and producer, as broker "
                           "logs, quotas and group descriptions show it (client.id)")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a partition without a valid committed offset starts (auto.offset.reset)")
    session_timeout_ms: int = Field(10_000, ge=1, description="time without heartbeats after which the group "
                                    "reassigns a member's partitions (session.timeout.ms)")
    topic_partitions: int = Field(4, ge=1, description="partitions of topics created when missing")
    replication_factor: int = Field(1, ge=1, description="replication factor of topics created when missing")
    max_batch_events: int = Field(4096, ge=1, description="events fetched per batch at most")
    fetch_max_wait_ms: int = Field(20, ge=0, description="maximum wait for a batch to fill, in ms")
    fetch_min_bytes: int = Field(1, ge=1, description="bytes a fetch waits for, up to the maximum wait")
    linger_ms: int = Field(0, ge=0, description="producer wait for more outputs per request (linger.ms)")
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="compression of the record batches the member produces (compression.type)")
    request_timeout_ms: int = Field(10_000, ge=100, description="timeout of each broker call")
    metadata_max_age_ms: int = Field(300_000, ge=100, description="maximum age of the cluster metadata before the "
                                     "clients refresh it, in ms (metadata.max.age.ms)")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="deadline for a clean stop after SIGTERM/SIGINT")
    guarantee: Literal["at-least-once", "exactly-once"] = Field("at-least-once", description="delivery guarantee")
    changelog: bool = Field(False, description="write state to the changelog topic and restore from it")
    checkpoint_interval_ms: int = Field(1000, ge=1, description="checkpoint at least this often")
    checkpoint_events: int = Field(50_000, ge=1, description="checkpoint after this many events")
    model_mismatch: Literal["reset", "fail"] = Field("reset", description="policy for state of another model")
    snapshot_dir: Path | None = Field(None, description="directory for local state snapshots (off when unset)")
    snapshot_interval_ms: int = Field(60_000, ge=1, description="write snapshots at most this often")

    # Monitoring
    metrics_host: str = Field("127.0.0.1", description="address of the metrics and health HTTP server")
    metrics_port: int = Field(9400, ge=0, le=65535, description="port of the metrics and health HTTP server")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown level {value!r}, expected one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("input_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [topic.strip() for topic in value.split(",") if topic.strip()]
        return value

    @field_validator("input_topics")
    @classmethod
    def _check_topics(cls, value: list[str]) -> list[str]:
        repeated = sorted({topic for topic in value if value.count(topic) > 1})
        if repeated:
            raise ValueError(f"topic {', '.join(repeated)} given more than once")
        return value

    @field_validator("group_id")
    @classmethod
    def _check_group_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a non-empty group id")
        return value

    def effective(self) -> dict[str, Any]:
        """Settings as a plain dict for the one-line startup log."""
        return {name: (str(value) if isinstance(value, (Path, SecretStr)) else value)
                for name, value in self.model_dump().items()}


def env_var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


# Variables with the prefix that are not settings: the local broker's data and jar caches, the Python
# environment cache, and the model directory of deploy/docker-compose.yml.
OTHER_VARIABLES = frozenset({"STREAMER_KAFKA_DATA", "STREAMER_KAFKA_CACHE", "STREAMER_CACHE", "STREAMER_MODEL_DIR"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Describe each ``STREAMER_*`` variable of ``environ`` that backs no setting, with a likely meant name."""
    known = {env_var(name) for name in Settings.model_fields}
    problems = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(upper[len(ENV_PREFIX):].lower(), sorted(Settings.model_fields), n=1)
        problems.append(f"{variable} is not a setting and is ignored"
                        + (f"; did you mean {env_var(close[0])}?" if close else ""))
    return problems


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from flags (``overrides``; None means not given), the environment and a TOML file."""
    given = {name: value for name, value in overrides.items() if value is not None}
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"Settings file not found: {config_file}")

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(_TomlSettings(settings_cls, toml_file=Path(config_file)))
            return tuple(sources)

    try:
        loaded = _FileSettings(**given)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"Invalid settings file {config_file}: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"Invalid settings: {'; '.join(map(_describe_problem, error.errors()))}") from None
    return Settings.model_construct(**loaded.model_dump())


class _TomlSettings(TomlConfigSettingsSource):
    """A TOML settings file whose top-level keys may also be written with hyphens, as the flags are."""

    def _read_file(self, file_path) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        for key, value in super()._read_file(file_path).items():
            name = str(key).replace("-", "_")
            if name in settings:
                raise ConfigError(f"Invalid settings file {file_path}: {name} is set twice (as {name} and "
                                  f"{name.replace('_', '-')})")
            settings[name] = value
        return settings


def _describe_problem(item: dict[str, Any]) -> str:
    name = str(item["loc"][0])
    if item["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (valid names are those of `streamer run --help`, without the leading --)"
    location = ".".join(str(part) for part in item["loc"])
    flag = "--" + name.replace("_", "-")
    return f"{location} ({flag}, {env_var(name)} or the settings file): {item['msg']}"
