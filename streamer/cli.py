"""The ``streamer`` command line: run | backtest | train | demo | generate | kafka."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from streamer.errors import StreamerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Streaming stateful inference for recurrent models over per-entity event streams.")
kafka_app = typer.Typer(no_args_is_help=True, help="Run a local single-node Apache Kafka broker for tests and demos.")
app.add_typer(kafka_app, name="kafka")


def env_help(text: str, name: str) -> str:
    """Append the environment variable that backs a flag to its help text."""
    return f"{text} (env: STREAMER_{name.upper()})"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def backtest(
    model: Path = typer.Option(..., help="Model bundle or plain seed state_dict file."),
    input: Path = typer.Option(..., "--input", help="Events: .jsonl, .csv or .parquet, read in file order."),
    output: Path = typer.Option(..., help="Outputs: .jsonl or .parquet; dead letters go beside it."),
    semantics: str = typer.Option("stateful", help="stateful (carry state) or window (last seq_len events)."),
    seq_len: Optional[int] = typer.Option(None, help="Window length for window semantics (overrides the bundle)."),
    batch_size: int = typer.Option(4096, min=1, help="Events per engine batch."),
    max_entities: Optional[int] = typer.Option(None, min=1, help="State capacity; LRU entities are evicted."),
    idle_expiry_ms: Optional[int] = typer.Option(None, min=1, help="Expire entities idle this long in event time."),
    report_dir: Optional[Path] = typer.Option(None, help="Write the accuracy report here (default: beside output)."),
    compare_window: bool = typer.Option(False, help="Also run window semantics and report the divergence."),
) -> None:
    """Replay a file through the engine and write one output per valid event."""
    from streamer.backtest.runner import backtest_file_command

    configure_logging()
    backtest_file_command(model=model, input_path=input, output_path=output, semantics=semantics,
                          seq_len=seq_len, batch_size=batch_size, max_entities=max_entities,
                          idle_expiry_ms=idle_expiry_ms, report_dir=report_dir, compare_window=compare_window)


def _flag(default, name: str, text: str, **options):
    return typer.Option(default, help=env_help(text, name), show_default=False, **options)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="TOML settings file; flags and STREAMER_* variables win over it."),
    model: Optional[Path] = _flag(None, "model", "Model bundle or plain seed state_dict file."),
    semantics: Optional[str] = _flag(None, "semantics", "stateful (default) or window."),
    seq_len: Optional[int] = _flag(None, "seq_len", "Window length for window semantics."),
    bootstrap_servers: Optional[str] = _flag(None, "bootstrap_servers", "Kafka bootstrap servers (host:port,...)."),
    input_topics: Optional[str] = _flag(None, "input_topics", "Comma-separated input topics."),
    output_topic: Optional[str] = _flag(None, "output_topic", "Output topic."),
    dead_letter_topic: Optional[str] = _flag(None, "dead_letter_topic", "Dead-letter topic."),
    group_id: Optional[str] = _flag(None, "group_id", "Consumer group id."),
    group_instance_id: Optional[str] = _flag(None, "group_instance_id", "Static membership id (group.instance.id)."),
    topic_partitions: Optional[int] = _flag(None, "topic_partitions", "Partitions of topics created when missing."),
    max_batch_events: Optional[int] = _flag(None, "max_batch_events", "Events fetched per batch at most."),
    fetch_max_wait_ms: Optional[int] = _flag(None, "fetch_max_wait_ms", "Longest wait for a batch to fill, in ms."),
    request_timeout_ms: Optional[int] = _flag(None, "request_timeout_ms", "Timeout of each broker call, in ms."),
    shutdown_timeout_s: Optional[float] = _flag(None, "shutdown_timeout_s", "Deadline for a clean stop, in s."),
    max_entities: Optional[int] = _flag(None, "max_entities", "State capacity; LRU entities are evicted."),
    idle_expiry_ms: Optional[int] = _flag(None, "idle_expiry_ms", "Expire entities idle this long in event time."),
    torch_threads: Optional[int] = _flag(None, "torch_threads", "torch intra-op threads."),
    metrics_host: Optional[str] = _flag(None, "metrics_host", "Address of the /metrics, /healthz, /readyz server."),
    metrics_port: Optional[int] = _flag(None, "metrics_port", "Port of the metrics server (0 picks a free one)."),
    log_level: Optional[str] = _flag(None, "log_level", "Logging level."),
) -> None:
    """Run as a member of a Kafka consumer group until SIGTERM or SIGINT."""
    flags = dict(locals())  # every parameter, before any other local exists
    import asyncio

    from streamer.config import load_settings
    from streamer.kafka.service import run_service

    settings = load_settings(flags.pop("config"), **flags)
    configure_logging(settings.log_level)
    asyncio.run(run_service(settings))


def main() -> None:
    try:
        app()
    except StreamerError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
