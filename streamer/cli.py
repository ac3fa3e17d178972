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
    return f"{text} [env: STREAMER_{name.upper()}]"


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


def main() -> None:
    try:
        app()
    except StreamerError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
