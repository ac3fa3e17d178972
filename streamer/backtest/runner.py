"""The ``streamer backtest`` command for files: replay, then write the accuracy report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from streamer.backtest.file_replay import BacktestResult, run_file_backtest
from streamer.backtest.report import ReportPaths, format_summary, write_report
from streamer.io.files import read_outputs
from streamer.model import load_model

logger = logging.getLogger(__name__)


def backtest_file(model_path: Path, input_path: Path, output_path: Path, *, semantics: str = "stateful",
                  seq_len: int | None = None, batch_size: int = 4096, max_entities: int | None = None,
                  idle_expiry_ms: int | None = None, report_dir: Path | None = None, compare_window: bool = False,
                  title: str | None = None) -> tuple[BacktestResult, ReportPaths]:
    """Replay ``input_path`` and write outputs, dead letters and a report; optionally compare with window."""
    model = load_model(model_path, seq_len=seq_len)
    options = dict(batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms)
    result = run_file_backtest(model, input_path, output_path, semantics=semantics, **options)
    window_records = None
    if compare_window and semantics == "stateful":
        window_path = output_path.with_name(f"{output_path.stem}.window{output_path.suffix}")
        run_file_backtest(model, input_path, window_path, semantics="window", **options)
        window_records = read_outputs(window_path)
    report_dir = report_dir or output_path.with_name(f"{output_path.stem}-report")
    paths = write_report(read_outputs(output_path), report_dir,
                         title=title or f"Backtest of {input_path.name} ({semantics})",
                         divergence_against=window_records,
                         extra_summary={**result.as_dict(), "events_per_second": result.events_per_s,
                                        "semantics": semantics, "model": model.fingerprint})
    return result, paths


def backtest_file_command(*, model: Path, input_path: Path, output_path: Path, semantics: str,
                          seq_len: int | None, batch_size: int, max_entities: int | None,
                          idle_expiry_ms: int | None, report_dir: Path | None, compare_window: bool) -> None:
    result, paths = backtest_file(model, input_path, output_path, semantics=semantics, seq_len=seq_len,
                                  batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms,
                                  report_dir=report_dir, compare_window=compare_window)
    typer.echo(format_summary(json.loads(paths.summary.read_text())))
    typer.echo(f"outputs:      {result.output_path}")
    typer.echo(f"dead letters: {result.dead_letter_path} ({result.dead_letters})")
    typer.echo(f"report:       {paths.html}")
