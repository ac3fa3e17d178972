"""The ``streamer backtest`` command for files and Kafka topics: replay, then write the accuracy report."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import orjson
import typer

from streamer.backtest.file_replay import BacktestResult, run_file_backtest
from streamer.backtest.metrics import read_scored_outputs
from streamer.backtest.report import ReportPaths, accuracy_by_step, format_summary, write_report
from streamer.backtest.topic_replay import TopicBacktestResult, TopicReplaySpec, parse_target, run_topic_backtest
from streamer import __version__
from streamer.errors import ConfigError
from streamer.metrics import MetricsServer, StreamerMetrics
from streamer.model import RecurrentModel, load_model

logger = logging.getLogger(__name__)


def _check_compare_window(model: RecurrentModel, compare_window: bool) -> None:
    """Reject ``compare_window`` for a model without ``seq_len`` before the first run starts."""
    if compare_window and not model.manifest.seq_len:
        raise ConfigError("--compare-window needs seq_len, the training window length: pass --seq-len N (a plain "
                          "state_dict carries none) or use a bundle whose manifest sets it")


def window_output_path(output_path: Path) -> Path:
    """Return where the window-semantics run of ``--compare-window`` writes its outputs, beside ``output_path``."""
    return output_path.with_name(f"{output_path.stem}.window{output_path.suffix}")


def backtest_file(model_path: Path, input_path: Path, output_path: Path, *, semantics: str = "stateful",
                  seq_len: int | None = None, batch_size: int = 4096, max_entities: int | None = None,
                  idle_expiry_ms: int | None = None, report_dir: Path | None = None, compare_window: bool = False,
                  title: str | None = None) -> tuple[BacktestResult, ReportPaths]:
    """Replay ``input_path`` and write outputs, dead letters and a report; optionally compare with window."""
    model = load_model(model_path, seq_len=seq_len)
    _check_compare_window(model, compare_window)
    report_dir = report_dir or output_path.with_name(f"{output_path.stem}-report")
    options = dict(batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms)
    window_records = None
    with report_dir_for_run(report_dir):
        result = run_file_backtest(model, input_path, output_path, semantics=semantics, **options)
        if compare_window and semantics == "stateful":
            window_path = window_output_path(output_path)
            run_file_backtest(model, input_path, window_path, semantics="window", **options)
            window_records = read_scored_outputs(window_path)
    records = read_scored_outputs(output_path)
    run_summary = {**result.as_dict(), "semantics": semantics,
                   "model": model.fingerprint}
    if window_records is not None:
        run_summary["accuracy_by_step"] = accuracy_by_step({"window": window_records, "stateful": records},
                                                           model.manifest.seq_len)
    paths = write_report(records, report_dir, title=title or f"Backtest of {input_path.name} ({semantics})",
                         divergence_against=window_records, extra_summary=run_summary)
    return result, paths


@contextmanager
def report_dir_for_run(report_dir: Path) -> Iterator[None]:
    """Create the report directory before the runs inside the block, so that a bad path fails first.

    When the block fails, the directories it created are removed again, the deepest first, up to the first
    one that is not empty.
    """
    created = [path for path in (report_dir, *report_dir.parents) if not path.exists()]
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"Cannot create the report directory {report_dir} (--report-dir, by default beside the "
                          f"output): {error.strerror}") from None
    try:
        yield
    except BaseException:
        for directory in created:
            try:
                directory.rmdir()
            except OSError:  # not empty, because the run wrote there, or not removable
                break
        raise


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
    warn_if_all_dead(result)


def warn_if_all_dead(result: BacktestResult) -> None:
    """Print a warning when every event went to the dead letters, which usually means a wrong model or file."""
    if not result.events or result.dead_letters < result.events:
        return
    reason, count = max(result.dead_letter_reasons.items(), key=lambda item: item[1])
    typer.echo(f"warning: all {result.events} events are dead letters, {count} of them for {reason}; check that "
               "the model's inputs match the events (feature count and names)", err=True)


def backtest_topic(model_path: Path, spec: TopicReplaySpec, *, output_path: Path | None = None,
                   output_topic: str | None = None, allow_existing_output: bool = False, semantics: str = "stateful",
                   seq_len: int | None = None, batch_size: int | None = None, max_entities: int | None = None,
                   idle_expiry_ms: int | None = None, report_dir: Path | None = None, compare_window: bool = False,
                   target: str = "event", initial_state: str = "empty", title: str | None = None,
                   progress: bool | None = None, metrics: StreamerMetrics | None = None
                   ) -> tuple[TopicBacktestResult, ReportPaths]:
    """Replay a range of Kafka topics, write outputs, dead letters and a report; optionally compare with window.

    The report goes to ``report_dir``, by default beside the output file, or ``<output topic>-report`` in the
    working directory for an output topic. With an output topic, dead letters go to ``dead-letter.jsonl`` in
    the report directory, and the window run of ``compare_window`` always goes to ``window.jsonl`` there.
    """
    model = load_model(model_path, seq_len=seq_len)
    _check_compare_window(model, compare_window)
    target_feature = parse_target(target, model)
    if report_dir is None:
        report_dir = (output_path.with_name(f"{output_path.stem}-report") if output_path is not None
                      else Path(f"{output_topic}-report"))
    dead_letter_path = report_dir / "dead-letter.jsonl" if output_topic is not None else None
    options = dict(batch_size=batch_size, max_entities=max_entities, idle_expiry_ms=idle_expiry_ms,
                   initial_state=initial_state, target_feature=target_feature, progress=progress, metrics=metrics)
    if metrics is not None:
        metrics.set_build_info(__version__, model.fingerprint, semantics, "replay")
    window_records = None
    with report_dir_for_run(report_dir):
        result = run_topic_backtest(model, spec, output_path=output_path, output_topic=output_topic,
                                    dead_letter_path=dead_letter_path, allow_existing_output=allow_existing_output,
                                    keep_topic_outputs=True, semantics=semantics, **options)
        if compare_window and semantics == "stateful":
            window_path = (window_output_path(output_path) if output_path is not None
                           else report_dir / "window.jsonl")
            run_topic_backtest(model, spec, output_path=window_path, semantics="window", **options)
            window_records = read_scored_outputs(window_path)
    if output_path is not None:
        records = read_scored_outputs(output_path)
    else:
        records = [orjson.loads(value) for value in result.output_values or ()]
    topics = ", ".join(spec.topics)
    run_summary = {**result.as_dict(), "model": model.fingerprint,
                   "target": target, "initial_state": initial_state, "from": spec.start.describe(),
                   "to": spec.end.describe()}
    # Steps count from an entity's first event only when the replay starts from empty state.
    if window_records is not None and initial_state == "empty":
        run_summary["accuracy_by_step"] = accuracy_by_step({"window": window_records, "stateful": records},
                                                           model.manifest.seq_len)
    paths = write_report(records, report_dir, title=title or f"Backtest of topic {topics} ({semantics})",
                         divergence_against=window_records, extra_summary=run_summary)
    return result, paths


def backtest_topic_command(*, model: Path, spec: TopicReplaySpec, output_path: Path | None,
                           output_topic: str | None, allow_existing_output: bool, semantics: str,
                           seq_len: int | None, batch_size: int | None, max_entities: int | None,
                           idle_expiry_ms: int | None, report_dir: Path | None, compare_window: bool, target: str,
                           initial_state: str, metrics_port: int | None = None,
                           metrics_host: str = "127.0.0.1") -> None:
    metrics = server = None
    if metrics_port is not None:
        metrics = StreamerMetrics()
        server = MetricsServer(metrics, metrics_host, metrics_port)
        try:
            server.start()
        except OSError as error:
            raise ConfigError(f"{error.strerror}; choose another --metrics-port, or 0 for any free port") from error
        typer.echo(f"metrics: http://{metrics_host}:{server.port}/metrics")
    try:
        result, paths = backtest_topic(model, spec, output_path=output_path, output_topic=output_topic,
                                       allow_existing_output=allow_existing_output, semantics=semantics,
                                       seq_len=seq_len, batch_size=batch_size, max_entities=max_entities,
                                       idle_expiry_ms=idle_expiry_ms, report_dir=report_dir,
                                       compare_window=compare_window, target=target, initial_state=initial_state,
                                       metrics=metrics)
    finally:
        if server is not None:
            server.stop()
    typer.echo(format_summary(json.loads(paths.summary.read_text())))
    for r in result.ranges:
        typer.echo(f"range:        {r.topic}[{r.partition}] offsets {r.start} to {r.end} (exclusive)")
    typer.echo(f"outputs:      {result.output_path or 'topic ' + result.output_topic}")
    typer.echo(f"dead letters: {result.dead_letter_path} ({result.dead_letters})")
    typer.echo(f"report:       {paths.html}")
    warn_if_all_dead(result)
    if not result.events:
        typer.echo("warning: the range holds no records; --from and --to times are compared with the records' "
                   "Kafka timestamps (the time of producing), not with the events' ts", err=True)
