"""The ``streamer`` command line: run | backtest | train | demo | generate | kafka."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from streamer.errors import ConfigError, StreamerError

# Help is plain text wrapped to the terminal (rich_markup_mode=None): the rich option tables crop long words
# such as STREAMER_BOOTSTRAP_SERVERS on an 80-column terminal.
HELP_SETTINGS = {"max_content_width": 120}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings=HELP_SETTINGS,
                  help="Streaming stateful inference for recurrent models over per-entity event streams.")
kafka_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=HELP_SETTINGS,
                        help="Run a local single-node Apache Kafka broker for tests and demos.")
app.add_typer(kafka_app, name="kafka")


def env_help(text: str, name: str, default: str | None = None) -> str:
    """Append the default and the environment variable that backs a flag to its help text."""
    if default is None:
        return f"{text} (env: STREAMER_{name.upper()})"
    return f"{text} (default: {default}; env: STREAMER_{name.upper()})"


def configure_logging(level: str = "INFO") -> None:
    from streamer.log_filters import GroupCoordinatorLevels, RepeatFilter

    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    # With the broker gone, aiokafka logs each failed connection, dozens of lines a second.
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, RepeatFilter) for existing in handler.filters):
            handler.addFilter(RepeatFilter("aiokafka", interval_s=10.0))
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if not any(isinstance(existing, GroupCoordinatorLevels) for existing in coordinator.filters):
        coordinator.addFilter(GroupCoordinatorLevels())


@app.command()
def backtest(
    model: Path = typer.Option(..., help="Model bundle, or a plain state_dict file "
                               "(torch.save(net.state_dict(), path))."),
    input: Optional[Path] = typer.Option(None, "--input", help="Events: JSON Lines (.jsonl, .ndjson, .json), "
                                         ".csv or .parquet, read in file order."),
    topic: Optional[list[str]] = typer.Option(None, "--topic", help="Replay this Kafka topic instead of a file "
                                              "(repeat for several topics)."),
    bootstrap_servers: Optional[str] = typer.Option(None, help="Kafka bootstrap servers (host:port,...) for --topic "
                                                    "(default: the local broker started with `streamer kafka "
                                                    "start`). TLS and SASL come from the STREAMER_SECURITY_PROTOCOL, "
                                                    "STREAMER_SASL_* and STREAMER_SSL_* variables, as for `run`."),
    from_: str = typer.Option("earliest", "--from", help="Range start for --topic: earliest, latest, epoch ms, "
                              "ISO-8601 (UTC when no zone), or offsets per partition such as 0:100,1:250. Times "
                              "compare with the Kafka record timestamps, not the events' ts fields; an offset "
                              "list replays only the partitions it names."),
    to: str = typer.Option("latest", "--to", help="Range end for --topic, exclusive, in the forms of --from; "
                           "latest is the end offset when the replay starts."),
    output: Optional[Path] = typer.Option(None, help="Outputs: .jsonl, .ndjson or .parquet, in a directory "
                                          "created if missing; dead letters go beside it."),
    output_topic: Optional[str] = typer.Option(None, help="With --topic: produce outputs to this topic instead of "
                                               "a file; it must not be an input topic and must be empty."),
    allow_existing_output: bool = typer.Option(False, help="Allow an --output-topic that already has records."),
    semantics: str = typer.Option("stateful", help="stateful (carry state) or window (last seq_len events)."),
    seq_len: Optional[int] = typer.Option(None, min=1,
                                          help="Window length for window semantics (overrides the bundle)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Events per engine batch (default 4096); with "
                                             "--topic, records per partition per engine batch (default 4096 "
                                             "divided by the number of partitions)."),
    max_entities: Optional[int] = typer.Option(None, min=1, help="State capacity; LRU entities are evicted."),
    idle_expiry_ms: Optional[int] = typer.Option(None, min=1, help="Expire entities idle this long in event time."),
    report_dir: Optional[Path] = typer.Option(None, help="Write the accuracy report here (default: beside output, "
                                              "or <output-topic>-report)."),
    compare_window: bool = typer.Option(False, help="Also run window semantics and report the divergence."),
    target: str = typer.Option("event", help="With --topic: event (the event's target field) or next-value:K "
                               "(feature K, index or name, of the entity's next event)."),
    initial_state: str = typer.Option("empty", help="With --topic: empty, changelog:GROUP (a live group's state now) or snapshot:GROUP:DIR."),
    request_timeout_ms: int = typer.Option(30_000, min=1, help="With --topic: timeout of each broker call, in ms."),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, help="With --topic: serve the replay's "
                                               "Prometheus metrics (mode=\"replay\") on this port while it runs "
                                               "(0 picks a free one)."),
    metrics_host: str = typer.Option("127.0.0.1", help="With --metrics-port: address of the metrics server."),
) -> None:
    """Replay a file or a range of Kafka topics through the engine and write one output per valid event.

    A topic replay reads with Fetch requests of its own and joins no consumer group.
    It commits no offsets, so a running service does not notice it.
    """
    from streamer.backtest.runner import backtest_file_command
    from streamer.errors import ConfigError

    configure_logging()
    if seq_len is not None and semantics == "stateful" and not compare_window:
        logging.getLogger(__name__).warning("--seq-len %d has no effect on predictions: stateful semantics uses no window; pass "
                                            "--semantics window or --compare-window to use it", seq_len)
    if compare_window and semantics != "stateful":
        raise ConfigError("--compare-window compares stateful outputs with window ones: use it with --semantics "
                          "stateful (the default)")
    if topic:
        _backtest_topic(model=model, input=input, topics=topic, bootstrap_servers=bootstrap_servers, start=from_,
                        end=to, output=output, output_topic=output_topic,
                        allow_existing_output=allow_existing_output, semantics=semantics, seq_len=seq_len,
                        batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms,
                        report_dir=report_dir, compare_window=compare_window, target=target,
                        initial_state=initial_state, request_timeout_ms=request_timeout_ms,
                        metrics_port=metrics_port, metrics_host=metrics_host)
        return
    if input is None:
        raise ConfigError("Missing input: pass --input FILE, or --topic TOPIC")
    if output_topic is not None:
        raise ConfigError("Invalid --output-topic for a file backtest: pass --output FILE, or replay --topic")
    topic_only = {"--from": (from_, "earliest"), "--to": (to, "latest"), "--target": (target, "event"),
                  "--initial-state": (initial_state, "empty"), "--bootstrap-servers": (bootstrap_servers, None),
                  "--metrics-port": (metrics_port, None)}
    topic_flags = [flag for flag, (value, default) in topic_only.items() if value != default]
    if topic_flags:
        raise ConfigError(f"Invalid {', '.join(topic_flags)} for a file backtest: "
                          "these options apply to --topic replays")
    if output is None:
        raise ConfigError("Missing --output: a file backtest writes its outputs to a .jsonl or .parquet file")
    backtest_file_command(model=model, input_path=input, output_path=output, semantics=semantics,
                          seq_len=seq_len, batch_size=4096 if batch_size is None else batch_size,
                          max_entities=max_entities,
                          idle_expiry_ms=idle_expiry_ms, report_dir=report_dir, compare_window=compare_window)


def _backtest_topic(*, model: Path, input: Path | None, topics: list[str], bootstrap_servers: str | None, start: str,
                    end: str, output: Path | None, output_topic: str | None, allow_existing_output: bool,
                    semantics: str, seq_len: int | None, batch_size: int | None, max_entities: int | None,
                    idle_expiry_ms: int | None, report_dir: Path | None, compare_window: bool, target: str,
                    initial_state: str, request_timeout_ms: int, metrics_port: int | None = None,
                    metrics_host: str = "127.0.0.1") -> None:
    """Check the flags of a topic backtest and run it."""
    from streamer.backtest.runner import backtest_topic_command
    from streamer.backtest.topic_replay import TopicReplaySpec, parse_range_bound
    from streamer.errors import ConfigError

    if input is not None:
        raise ConfigError("Expected --input or --topic, got both: a backtest replays a file or topics")
    bootstrap_servers = bootstrap_servers or _local_bootstrap_servers()
    spec = TopicReplaySpec(bootstrap_servers=bootstrap_servers, topics=tuple(topics),
                           start=parse_range_bound(start, "--from"), end=parse_range_bound(end, "--to"),
                           request_timeout_ms=request_timeout_ms, security=_security_from_environment())
    backtest_topic_command(model=model, spec=spec, output_path=output, output_topic=output_topic,
                           allow_existing_output=allow_existing_output, semantics=semantics, seq_len=seq_len,
                           batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms,
                           report_dir=report_dir, compare_window=compare_window, target=target,
                           initial_state=initial_state, metrics_port=metrics_port, metrics_host=metrics_host)


def _security_from_environment():
    """Return the TLS and SASL settings of the ``STREAMER_*`` variables, which `run` reads too."""
    from streamer.config import load_settings
    from streamer.kafka.security import KafkaSecurity

    return KafkaSecurity.from_settings(load_settings())


def _flag(default, name: str, text: str, default_text: str | None = None, **options):
    """Return a `run` option that falls back to the setting ``name``, with the setting's default in its help.

    ``default_text`` describes a default that has no value to show, such as no limit.
    """
    return typer.Option(default, help=env_help(text, name, default_text or _setting_default(name)),
                        show_default=False, **options)


def _setting_default(name: str) -> str | None:
    """Return the default of setting ``name`` as help text shows it, or None when it has none."""
    from streamer.config import Settings

    field = Settings.model_fields.get(name)
    value = None if field is None else field.get_default(call_default_factory=True)
    if value is None or value == "":
        return None
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="TOML settings file. A flag wins over its STREAMER_* variable, "
                                          "and both win over the file."),
    model: Optional[Path] = _flag(None, "model", "Model bundle, or a plain state_dict file "
                                  "(torch.save(net.state_dict(), path))."),
    semantics: Optional[str] = _flag(None, "semantics", "stateful or window."),
    seq_len: Optional[int] = _flag(None, "seq_len", "Window length for window semantics."),
    bootstrap_servers: Optional[str] = _flag(None, "bootstrap_servers", "Kafka bootstrap servers (host:port,...)."),
    input_topics: Optional[str] = _flag(None, "input_topics", "Comma-separated input topics."),
    output_topic: Optional[str] = _flag(None, "output_topic", "Output topic."),
    dead_letter_topic: Optional[str] = _flag(None, "dead_letter_topic", "Dead-letter topic."),
    security_protocol: Optional[str] = _flag(None, "security_protocol", "How clients connect to the brokers: "
                                             "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."),
    sasl_mechanism: Optional[str] = _flag(None, "sasl_mechanism", "SASL mechanism: PLAIN, SCRAM-SHA-256 or "
                                          "SCRAM-SHA-512. The password comes from STREAMER_SASL_PASSWORD or the "
                                          "settings file, never a flag."),
    sasl_username: Optional[str] = _flag(None, "sasl_username", "SASL user name."),
    ssl_cafile: Optional[Path] = _flag(None, "ssl_cafile", "PEM certificates the brokers' certificates must chain "
                                       "to (default: the system's trusted certificates)."),
    ssl_certfile: Optional[Path] = _flag(None, "ssl_certfile", "PEM client certificate, for brokers that require "
                                         "one."),
    ssl_keyfile: Optional[Path] = _flag(None, "ssl_keyfile", "Unencrypted PEM key of the client certificate."),
    ssl_check_hostname: Optional[bool] = typer.Option(
        None, "--ssl-check-hostname/--no-ssl-check-hostname", show_default=False,
        help=env_help("Check that each broker's certificate names its host.", "ssl_check_hostname", default="check")),
    group_id: Optional[str] = _flag(None, "group_id", "Consumer group id."),
    group_instance_id: Optional[str] = _flag(None, "group_instance_id", "Static membership id (group.instance.id).",
                                               default_text="dynamic membership"),
    client_id: Optional[str] = _flag(None, "client_id", "Client id of the consumer and producer (client.id), as "
                                     "broker logs, quotas and group descriptions show it."),
    auto_offset_reset: Optional[str] = _flag(None, "auto_offset_reset", "Where a partition without a valid "
                                             "committed offset starts: earliest or latest (auto.offset.reset)."),
    session_timeout_ms: Optional[int] = _flag(None, "session_timeout_ms", "Time without heartbeats after which "
                                              "the group reassigns this member's partitions, in ms. A static member "
                                              "(--group-instance-id) that stops keeps them this long."),
    topic_partitions: Optional[int] = _flag(None, "topic_partitions", "Partitions of topics created when missing."),
    replication_factor: Optional[int] = _flag(None, "replication_factor", "Replication factor of topics created "
                                              "when missing, the changelog included."),
    max_batch_events: Optional[int] = _flag(None, "max_batch_events", "Events fetched per batch at most."),
    fetch_max_wait_ms: Optional[int] = _flag(None, "fetch_max_wait_ms", "Longest wait for a batch to fill, in ms."),
    fetch_min_bytes: Optional[int] = _flag(None, "fetch_min_bytes", "Bytes a fetch waits for (fetch.min.bytes)."),
    linger_ms: Optional[int] = _flag(None, "linger_ms", "Producer wait for more outputs per request (linger.ms)."),
    compression_type: Optional[str] = _flag(None, "compression_type", "Compression of produced record batches: "
                                            "none, gzip, snappy, lz4 or zstd (compression.type)."),
    request_timeout_ms: Optional[int] = _flag(None, "request_timeout_ms", "Timeout of each broker call, in ms."),
    metadata_max_age_ms: Optional[int] = _flag(None, "metadata_max_age_ms", "Maximum age of the cluster metadata "
                                               "before a refresh, in ms (metadata.max.age.ms). Partitions added to "
                                               "an input topic are noticed at a refresh."),
    shutdown_timeout_s: Optional[float] = _flag(None, "shutdown_timeout_s", "Deadline for a clean stop, in s."),
    max_entities: Optional[int] = _flag(None, "max_entities", "State capacity; the least recently used entities "
                                        "are evicted.", default_text="no limit"),
    idle_expiry_ms: Optional[int] = _flag(None, "idle_expiry_ms", "Expire entities idle this long in event time.",
                                          default_text="never"),
    entity_field: Optional[str] = _flag(None, "entity_field", "Event field with the entity id, read when a record "
                                        "has no key."),
    max_record_bytes: Optional[int] = _flag(None, "max_record_bytes", "Larger records are dead-lettered "
                                            "(record_too_large)."),
    torch_threads: Optional[int] = _flag(None, "torch_threads", "torch intra-op threads."),
    device: Optional[str] = _flag(None, "device", "torch device for the model and state arena: cpu, cuda, cuda:1."),
    guarantee: Optional[str] = _flag(None, "guarantee", "at-least-once or exactly-once."),
    changelog: Optional[bool] = typer.Option(None, "--changelog/--no-changelog", show_default=False,
                                             help=env_help("Keep state durable in <group>-state-changelog.",
                                                           "changelog", default="off")),
    checkpoint_interval_ms: Optional[int] = _flag(None, "checkpoint_interval_ms", "Checkpoint at least this often."),
    checkpoint_events: Optional[int] = _flag(None, "checkpoint_events", "Checkpoint after this many events."),
    model_mismatch: Optional[str] = _flag(None, "model_mismatch", "State of another model: reset or fail."),
    snapshot_dir: Optional[Path] = _flag(None, "snapshot_dir", "Directory for local state snapshots.",
                                          default_text="no snapshots"),
    snapshot_interval_ms: Optional[int] = _flag(None, "snapshot_interval_ms", "Write snapshots at most this often."),
    metrics_host: Optional[str] = _flag(None, "metrics_host", "Address of the /metrics, /healthz, /readyz server."),
    metrics_port: Optional[int] = _flag(None, "metrics_port", "Port of the metrics server (0 picks a free one)."),
    log_level: Optional[str] = _flag(None, "log_level", "Logging level."),
) -> None:
    """Run as a member of a Kafka consumer group until SIGTERM or SIGINT."""
    flags = dict(locals())  # every parameter, before any other local exists
    import asyncio

    import os

    from streamer.config import load_settings, unknown_variables
    from streamer.kafka.service import run_service

    settings = load_settings(flags.pop("config"), **flags)
    configure_logging(settings.log_level)
    for problem in unknown_variables(os.environ):
        logging.getLogger("streamer.config").warning(problem)
    asyncio.run(run_service(settings))


@app.command()
def train(
    output: Optional[Path] = typer.Option(None, help="Where to write the model bundle (default: "
                                          "out/fertility-CELL.pt, for example out/fertility-lstm.pt)."),
    seq_len: int = typer.Option(8, min=1, help="Training window length (events)."),
    hidden_size: int = typer.Option(32, min=1, help="Hidden size of each recurrent layer."),
    layers: int = typer.Option(2, min=1, help="Stacked recurrent layers."),
    epochs: int = typer.Option(30, min=1, help="Training epochs."),
    cell: str = typer.Option("lstm", help="lstm, gru or rnn."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train the seed network on the World Bank fertility data set (shipped with statsmodels)."""
    from streamer.train import train_bundle

    configure_logging()
    output = output or Path(f"out/fertility-{cell}.pt")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = train_bundle(output, seq_len=seq_len, hidden_size=hidden_size, num_layers=layers, epochs=epochs,
                          cell=cell, seed=seed)
    typer.echo(f"bundle: {result.path}")
    typer.echo(f"holdout window MAE {result.holdout.mae:.4f}, last-value baseline {result.holdout.last_value_mae:.4f}")


@app.command()
def bundle(
    model: Path = typer.Option(..., help="Plain state_dict file (torch.save(net.state_dict(), path)) or a bundle."),
    output: Path = typer.Option(..., help="Where to write the bundle."),
    feature_names: Optional[str] = typer.Option(None, help="Comma-separated input field names, in input order: "
                                                "events may then carry these fields instead of a features list."),
    input_mean: Optional[str] = typer.Option(None, help="Comma-separated means: inputs are scaled as "
                                             "(x - mean) / std before the model."),
    input_std: Optional[str] = typer.Option(None, help="Comma-separated standard deviations of the inputs."),
    output_mean: Optional[str] = typer.Option(None, help="Comma-separated means: outputs are mapped back as "
                                              "y * std + mean."),
    output_std: Optional[str] = typer.Option(None, help="Comma-separated standard deviations of the outputs."),
    seq_len: Optional[int] = typer.Option(None, min=1, help="Training window length, for window semantics."),
    nonlinearity: Optional[str] = typer.Option(None, help="tanh or relu, for an RNN cell (PyTorch's nn.RNN "
                                               "nonlinearity); the weights do not show which."),
) -> None:
    """Write a bundle: your model's weights with feature names, scaling, window length and a fingerprint."""
    from streamer.model.bundle import write_bundle

    configure_logging()
    manifest, fingerprint = write_bundle(model, output, feature_names=_split_text(feature_names),
                                         input_mean=_split_numbers(input_mean, "--input-mean"),
                                         input_std=_split_numbers(input_std, "--input-std"),
                                         output_mean=_split_numbers(output_mean, "--output-mean"),
                                         output_std=_split_numbers(output_std, "--output-std"), seq_len=seq_len,
                                         nonlinearity=nonlinearity)
    typer.echo(f"bundle: {output}")
    typer.echo(f"model: {manifest.describe()}; fingerprint {fingerprint}")


def _split_text(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",")]


def _split_numbers(value: str | None, flag: str) -> list[float] | None:
    from streamer.errors import ConfigError

    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise ConfigError(f"Invalid {flag} {value!r}: expected comma-separated numbers") from None


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("out/demo"), help="Directory for the bundle, outputs, reports and broker."),
    epochs: int = typer.Option(30, min=1, help="Training epochs when no bundle exists yet."),
) -> None:
    """Train, backtest and serve the fertility model through a local Kafka broker, then print the figures."""
    from streamer.demo import run_demo

    configure_logging("WARNING")
    # The first group join always logs a transient "coordinator not available" error; it is not a fault.
    logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.CRITICAL)
    run_demo(work_dir, epochs=epochs)


@app.command()
def generate(
    output: Path = typer.Option(..., help="JSON Lines file to write."),
    events: int = typer.Option(1_000_000, min=1, help="Number of events."),
    entities: int = typer.Option(10_000, min=1, help="Size of the entity pool: each event draws its entity from "
                                 "e-0 to e-(N-1), so fewer than N appear when events are few."),
    input_size: int = typer.Option(8, min=1, help="Features per event."),
    seed: int = typer.Option(0, min=0, help="Random seed."),
    zipf: Optional[float] = typer.Option(None, help="Zipf exponent for skewed entity popularity: entity k is "
                                         "drawn with weight 1/(k+1)^ZIPF (a finite number > 0)."),
    start_ts: Optional[int] = typer.Option(None, help="ts of the first event in epoch ms (default "
                                           "1733300000000, 2024-12-04T08:13:20Z); each next event's is 1 ms later."),
) -> None:
    """Write a synthetic event stream for scale tests."""
    from streamer.data.synthetic import DEFAULT_START_TS, write_synthetic
    from streamer.io.events import MAX_ABS_TIMESTAMP_MS

    start_ts = DEFAULT_START_TS if start_ts is None else start_ts
    if output.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ConfigError(f"Unsupported --output {output}: generate writes JSON Lines (.jsonl)")
    if zipf is not None and not 0 < zipf < float("inf"):
        raise ConfigError(f"Invalid --zipf {zipf}: expected a finite number > 0")
    if abs(start_ts) + events >= MAX_ABS_TIMESTAMP_MS:
        raise ConfigError(f"Invalid --start-ts {start_ts}: the events' timestamps must stay within "
                          f"+/-{MAX_ABS_TIMESTAMP_MS} ms")
    output.parent.mkdir(parents=True, exist_ok=True)
    count = write_synthetic(output, events, entities, input_size, seed=seed, zipf_exponent=zipf, start_ts=start_ts)
    typer.echo(f"wrote {count} events to {output}")


DATA_DIR_HELP = ("Broker data directory: topics, records and committed offsets are kept there between runs "
                 "(default: $STREAMER_KAFKA_DATA, else ~/.cache/streamer/kafka-data/default).")


@kafka_app.command("start")
def kafka_start(data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
                port: Optional[int] = typer.Option(None, min=1, max=65535,
                                                   help="Listener port (default: a free one).")) -> None:
    """Start a detached local broker and print its bootstrap address."""
    from streamer.kafka.local_broker import start_detached

    configure_logging()
    typer.echo(start_detached(data_dir=data_dir, port=port))


@kafka_app.command("stop")
def kafka_stop(data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP)) -> None:
    """Stop the local broker started with `streamer kafka start`."""
    from streamer.kafka.local_broker import default_data_dir, stop_detached

    configure_logging()
    directory = data_dir or default_data_dir()
    typer.echo("stopped" if stop_detached(data_dir=directory) else f"not running (no broker started with {directory})")


@kafka_app.command("produce")
def kafka_produce(
    input: Path = typer.Argument(..., help="Events to produce: a JSON Lines (.jsonl, .ndjson, "
                                ".json), .csv or .parquet file, in file order."),
    topic: str = typer.Option(..., help="Topic to produce to; created with --partitions partitions if missing."),
    bootstrap_servers: Optional[str] = typer.Option(None, help="Broker address (default: the local broker "
                                                    "started with `streamer kafka start`)."),
    partitions: int = typer.Option(4, min=1, help="Partitions of a topic this command creates."),
    model: Optional[Path] = typer.Option(None, help="Model bundle whose feature names map a CSV's columns to "
                                         "features."),
) -> None:
    """Produce the events of a file to a topic, keyed by entity, to try `run` and `backtest --topic`.

    Records whose entity cannot be read are produced without a key, so the service dead-letters them.
    """
    import asyncio

    from streamer.kafka.file_producer import produce_file

    configure_logging()
    bootstrap_servers = bootstrap_servers or _local_bootstrap_servers()
    feature_names = None
    if model is not None:
        from streamer.model import load_model

        feature_names = load_model(model).manifest.feature_names
    count = asyncio.run(produce_file(input, topic, bootstrap_servers, partitions=partitions,
                                     feature_names=feature_names))
    typer.echo(f"produced {count} record{'' if count == 1 else 's'} to {topic} on {bootstrap_servers}")


@kafka_app.command("consume")
def kafka_consume(
    topic: str = typer.Argument(..., help="Topic to read, for example the output or dead-letter topic of `run`."),
    bootstrap_servers: Optional[str] = typer.Option(None, help="Broker address (default: the local broker "
                                                    "started with `streamer kafka start`)."),
    from_beginning: bool = typer.Option(False, "--from-beginning",
                                        help="Start at the earliest record instead of the next new one."),
    max_messages: Optional[int] = typer.Option(None, min=1, help="Exit after this many records."),
    timeout_ms: Optional[int] = typer.Option(None, min=1, help="Exit when no record arrives for this many ms."),
    print_key: bool = typer.Option(False, "--print-key", help="Print each record's key before its value."),
    print_headers: bool = typer.Option(False, "--print-headers",
                                       help="Print each record's headers first as name:value pairs joined by "
                                       "commas (dead letters carry their reason in them). Values are printed as "
                                       "they are, so a value can itself contain commas and colons."),
    isolation_level: str = typer.Option("read_committed", help="read_committed skips the records of aborted "
                                        "transactions, which an exactly-once service leaves behind when it fails; "
                                        "read_uncommitted prints them too."),
) -> None:
    """Print a topic's records, one per line, without joining a consumer group (Ctrl-C stops)."""
    import asyncio

    from streamer.kafka.topic_printer import print_topic

    configure_logging()
    bootstrap_servers = bootstrap_servers or _local_bootstrap_servers()
    try:
        asyncio.run(print_topic(topic, bootstrap_servers, from_beginning=from_beginning, max_messages=max_messages,
                                timeout_ms=timeout_ms, with_key=print_key, with_headers=print_headers,
                                write=typer.echo, isolation_level=isolation_level))
    except KeyboardInterrupt:
        pass


def _local_bootstrap_servers() -> str:
    from streamer.kafka.local_broker import broker_status, default_data_dir

    state = broker_status()
    if state is None:
        raise ConfigError(f"Missing --bootstrap-servers: no local broker is running with {default_data_dir()}; "
                          "start one with `streamer kafka start` or pass the broker's address")
    return state.bootstrap_servers


@kafka_app.command("status")
def kafka_status(data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP)) -> None:
    """Print the local broker's address, or exit with 3 when it is not running."""
    from streamer.kafka.local_broker import STATUS_NOT_RUNNING_EXIT_CODE, broker_status, default_data_dir

    directory = data_dir or default_data_dir()
    state = broker_status(data_dir=directory)
    if state is None:
        typer.echo(f"not running (no broker started with {directory})")
        raise typer.Exit(STATUS_NOT_RUNNING_EXIT_CODE)
    typer.echo(state.bootstrap_servers)


def main() -> None:
    """Run the command line; expected failures print one ``error:`` line instead of a traceback.

    Exit codes: 2 for invalid input, settings or models and for local broker failures, 1 for file system
    errors and failed Kafka requests (an unreachable broker included).
    """
    from aiokafka.errors import (KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError,
                                 RequestTimedOutError)

    from streamer.errors import BrokerError
    from streamer.kafka.local_broker import BrokerError as LocalBrokerError

    try:
        app()
    except BrokerError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    except (StreamerError, LocalBrokerError) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
    except MemoryError:
        typer.echo("error: not enough memory for the requested sizes", err=True)
        raise SystemExit(1) from None
    except OSError as error:
        logging.getLogger(__name__).debug("File system error", exc_info=True)
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    except KafkaError as error:
        logging.getLogger(__name__).debug("Kafka request failed", exc_info=True)
        hint = "; check --bootstrap-servers and that the broker runs" if isinstance(
            error, (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)) else ""
        typer.echo(f"error: Kafka request failed: {error!r}{hint}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
