"""Backtest reports: accuracy metrics, tables, PNG plots and one self-contained HTML page.

:func:`write_report` writes into an output directory:

- ``summary.json``: counts, overall metrics, error distribution, worst entities, divergence summary and the
  caller's ``extra_summary`` under ``"run"``.
- ``per_entity.csv``: entity, records, n, mae, rmse, mape_percent, bias, first_ts, last_ts.
- ``over_time.csv``: start_ts, end_ts, n, mae, rmse, mape_percent, bias.
- ``mae_over_time.png``, ``error_histogram.png`` and ``entity_worst_<k>.png`` / ``entity_typical_<k>.png``.
- With ``divergence_against``: ``divergence.jsonl`` (entity, ts, step, abs_diff per joined record),
  ``divergence_by_step.csv``, ``divergence_by_entity.csv`` and ``divergence.png``.
- ``report.html`` with every plot embedded as a base64 PNG, so the page needs no other file.

Metric definitions are in :mod:`streamer.backtest.metrics`.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from streamer.backtest import plots
from streamer.backtest.divergence import Divergence, divergence
from streamer.backtest.metrics import (
    ScoredRecords,
    error_distribution,
    error_metrics,
    known_ts,
    over_time_metrics,
    per_entity_metrics,
    to_scored_records,
    typical_entities,
    worst_entities,
)
from streamer.state.arena import NO_TIME

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

logger = logging.getLogger(__name__)

Records = Iterable[Mapping] | pd.DataFrame


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`. ``plots`` maps a plot name to its PNG file."""

    out_dir: Path
    summary: Path
    per_entity: Path
    over_time: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    divergence: Path | None = None
    divergence_by_step: Path | None = None
    divergence_by_entity: Path | None = None


@dataclass(frozen=True)
class Analysis:
    """Everything a report shows, computed from one run's records."""

    scored: ScoredRecords
    summary: dict
    per_entity: pd.DataFrame
    over_time: pd.DataFrame
    worst: pd.DataFrame
    typical: pd.DataFrame


def _json_value(value: object) -> object:
    """Convert NaN and infinity to None and numpy scalars to Python numbers, recursively."""
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analyze(records: Records, *, title: str = "Backtest", time_buckets: int = 100, worst: int = 10,
            typical: int = 3) -> Analysis:
    """Compute the metrics, tables and summary of one run's output records."""
    scored = to_scored_records(records)
    mask = scored.scored
    errors = scored.errors[mask]
    targets = scored.targets[mask]
    per_entity = per_entity_metrics(scored)
    worst_table = worst_entities(per_entity, worst)
    typical_table = typical_entities(per_entity, typical, exclude=worst_table["entity"].head(typical))
    ts = known_ts(scored.frame["ts"]).dropna()
    summary = {
        "title": title,
        "records": len(scored.frame),
        "scored_records": int(mask.any(axis=1).sum()),
        "entities": int(scored.frame["entity"].nunique()),
        "outputs": int(scored.predictions.shape[1]),
        "first_ts": int(ts.min()) if len(ts) else None,
        "last_ts": int(ts.max()) if len(ts) else None,
        "metrics": error_metrics(errors, targets),
        "errors": error_distribution(errors),
        "worst_entities": worst_table[["entity", "n", "mae", "rmse"]].to_dict(orient="records"),
    }
    return Analysis(
        scored=scored,
        summary=summary,
        per_entity=per_entity,
        over_time=over_time_metrics(scored, time_buckets),
        worst=worst_table,
        typical=typical_table,
    )


def _entity_plots(analysis: Analysis, out_dir: Path, count: int) -> dict[str, tuple[Path, str]]:
    """Draw the worst and the typical entities; return {plot name: (path, caption)}."""
    frame = analysis.scored.frame
    drawn: dict[str, tuple[Path, str]] = {}
    groups = (("worst", analysis.worst.head(count)), ("typical", analysis.typical))
    for kind, table in groups:
        for rank, row in enumerate(table.itertuples(index=False), start=1):
            rows = np.flatnonzero(frame["entity"].to_numpy() == row.entity)
            ts = frame["ts"].to_numpy()[rows]
            # Without timestamps the entity is drawn against its step.
            timed = bool((ts != NO_TIME).all())
            rows = rows[np.argsort(ts if timed else frame["step"].to_numpy()[rows], kind="stable")]
            caption = f"{kind} #{rank}, MAE {row.mae:.4g}"
            name = f"entity_{kind}_{rank}"
            path = plots.plot_entity(
                out_dir / f"{name}.png",
                str(row.entity),
                frame["ts"].to_numpy()[rows] if timed else None,
                analysis.scored.predictions[rows, 0],
                analysis.scored.targets[rows, 0],
                caption,
                steps=frame["step"].to_numpy()[rows],
            )
            drawn[name] = (path, f"{row.entity}: {caption}")
    return drawn


def _write_divergence(result: Divergence, out_dir: Path, labels: tuple[str, str]) -> dict[str, Path]:
    jsonl = out_dir / "divergence.jsonl"
    with jsonl.open("wb") as handle:
        for entity, ts, step, abs_diff in result.records.itertuples(index=False):
            row = {"entity": entity, "ts": None if ts == NO_TIME else int(ts), "step": int(step),
                   "abs_diff": float(abs_diff)}
            handle.write(orjson.dumps(row))
            handle.write(b"\n")
    by_step = out_dir / "divergence_by_step.csv"
    result.by_step.to_csv(by_step, index=False)
    by_entity = out_dir / "divergence_by_entity.csv"
    result.by_entity.to_csv(by_entity, index=False)
    plot = plots.plot_divergence(out_dir / "divergence.png", result.by_step, labels)
    return {"jsonl": jsonl, "by_step": by_step, "by_entity": by_entity, "plot": plot}


def write_report(
    records: Records,
    out_dir: str | Path,
    *,
    title: str = "Backtest report",
    divergence_against: Records | None = None,
    divergence_labels: tuple[str, str] = ("stateful", "window"),
    extra_summary: Mapping | None = None,
    time_buckets: int = 100,
    worst: int = 10,
    entity_plots: int = 3,
) -> ReportPaths:
    """Write a backtest report of ``records`` into ``out_dir`` and return the paths written.

    ``divergence_against`` is a second run over the same events, for example the window run when
    ``records`` is the stateful run. Its difference to ``records`` gets its own files and HTML section.
    ``extra_summary`` (for example events, dead_letters, events_per_second, elapsed_s) is stored under
    ``"run"`` in ``summary.json`` and shown by :func:`format_summary`. ``time_buckets`` caps the number of
    time buckets, ``worst`` the length of the worst-entity table, and ``entity_plots`` the number of worst
    and of typical entities plotted.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_report(out)
    analysis = analyze(records, title=title, time_buckets=time_buckets, worst=worst, typical=entity_plots)
    summary = dict(analysis.summary)
    if extra_summary:
        summary["run"] = dict(extra_summary)

    per_entity_path = out / "per_entity.csv"
    analysis.per_entity.to_csv(per_entity_path, index=False)
    over_time_path = out / "over_time.csv"
    analysis.over_time.to_csv(over_time_path, index=False)

    histogram = analysis.summary["errors"]["histogram"]
    plot_paths = {
        "mae_over_time": plots.plot_mae_over_time(out / "mae_over_time.png", analysis.over_time),
        "error_histogram": plots.plot_error_histogram(out / "error_histogram.png", histogram["counts"],
                                                      histogram["edges"]),
    }
    entity_figures = _entity_plots(analysis, out, entity_plots)
    plot_paths.update({name: path for name, (path, _) in entity_figures.items()})

    divergence_result = None
    divergence_files: dict[str, Path] = {}
    if divergence_against is not None:
        divergence_result = divergence(analysis.scored, divergence_against)
        divergence_files = _write_divergence(divergence_result, out, divergence_labels)
        plot_paths["divergence"] = divergence_files["plot"]
        summary["divergence"] = {"labels": list(divergence_labels), **divergence_result.summary()}

    summary_path = out / "summary.json"
    summary_path.write_bytes(orjson.dumps(_json_value(summary), option=orjson.OPT_INDENT_2) + b"\n")

    html_path = out / "report.html"
    html_path.write_text(
        render_html(summary, analysis, plot_paths, entity_figures, divergence_result, divergence_labels),
        encoding="utf-8",
    )
    logger.info("wrote backtest report for %d records to %s", summary["records"], out)
    return ReportPaths(
        out_dir=out,
        summary=summary_path,
        per_entity=per_entity_path,
        over_time=over_time_path,
        html=html_path,
        plots=plot_paths,
        divergence=divergence_files.get("jsonl"),
        divergence_by_step=divergence_files.get("by_step"),
        divergence_by_entity=divergence_files.get("by_entity"),
    )


# The files a report writes. An earlier report in the same directory (a run with --compare-window, or with
# more entity plots) may have written some that this one does not, which would then look like its own.
REPORT_FILE_PATTERNS = ("summary.json", "per_entity.csv", "over_time.csv", "report.html", "mae_over_time.png",
                        "error_histogram.png", "entity_worst_*.png", "entity_typical_*.png", "divergence.jsonl",
                        "divergence_by_step.csv", "divergence_by_entity.csv", "divergence.png")


def _remove_previous_report(out: Path) -> None:
    """Delete the files of an earlier report in ``out``; other files stay."""
    for pattern in REPORT_FILE_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def _format_number(value: object, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_summary(summary: Mapping) -> str:
    """Return a few lines for the console: events, entities, dead letters, events/s, MAE, RMSE and MAPE.

    ``events``, ``dead_letters``, ``events_per_second`` and ``elapsed_s`` come from the ``"run"`` entry,
    which is the ``extra_summary`` of :func:`write_report`. A missing entry is left out, but events fall
    back to the number of output records.
    """
    run = summary.get("run") or {}
    metrics = summary.get("metrics") or {}
    counts = [f"events {run.get('events', summary.get('records'))}", f"entities {summary.get('entities')}"]
    if "dead_letters" in run:
        counts.append(f"dead letters {run['dead_letters']}")
    if run.get("duplicates"):
        counts.append(f"duplicates {run['duplicates']} (not applied: at or below their entity's last applied "
                      "offset, as in events the initial state already holds)")
    for name in ("evictions", "expirations"):
        if run.get(name):
            counts.append(f"{name} {run[name]}")
    if "events_per_second" in run:
        counts.append(f"{_format_number(float(run['events_per_second']), ',.0f')} events/s")
    if "elapsed_s" in run:
        counts.append(f"elapsed {_format_number(float(run['elapsed_s']), '.2f')} s")
    lines = [", ".join(counts)]
    mape = _format_number(metrics.get("mape_percent"), ".2f")
    scored, records = summary.get("scored_records"), summary.get("records")
    scope = (f"{scored} of {records} records (the others have no target or a non-finite prediction)"
             if isinstance(scored, int) and isinstance(records, int) and scored < records else f"{scored} records")
    accuracy = (
        f"scored {scope}: MAE {_format_number(metrics.get('mae'))}, "
        f"RMSE {_format_number(metrics.get('rmse'))}, MAPE {mape}{'' if mape == 'n/a' else ' %'}"
    )
    if metrics.get("mape_excluded"):
        accuracy += f" ({metrics['mape_excluded']} zero targets left out of MAPE)"
    if scored == 0:
        accuracy = f"accuracy: none of the {records} records has a target and a finite prediction"
    lines.append(accuracy)
    if run.get("accuracy_by_step"):
        lines.append(format_accuracy_by_step(run["accuracy_by_step"]))
    diverged = summary.get("divergence")
    if diverged:
        labels = diverged.get("labels", ["stateful", "window"])
        lines.append(
            f"{labels[0]} vs {labels[1]}: {diverged.get('matched')} matched records, mean |diff| "
            f"{_format_number(diverged.get('mean_abs_diff'))}, "
            f"max |diff| {_format_number(diverged.get('max_abs_diff'))}"
        )
    return "\n".join(lines)


def accuracy_by_step(runs: Mapping[str, Iterable[Mapping]], seq_len: int) -> dict:
    """Return each semantics' MAE and count over all scored outputs, an entity's first ``seq_len - 1``, and the rest.

    A model trained on windows of ``seq_len`` events from zero state is given partial windows at an entity's
    first ``seq_len - 1`` events. Up to step ``seq_len`` both semantics compute the same outputs, because the
    window still contains the entity's whole history. After it, window semantics repeats the training-time call
    while stateful semantics carries the state past the trained length.
    """
    table: dict = {"seq_len": seq_len, "runs": {}}
    for name, outputs in runs.items():
        scored = _step_errors(outputs)
        groups = {"all": [error for _, error in scored],
                  "partial_windows": [error for step, error in scored if step < seq_len],
                  "full_windows": [error for step, error in scored if step >= seq_len]}
        table["runs"][name] = {group: {"mae": sum(errors) / len(errors) if errors else None, "n": len(errors)}
                               for group, errors in groups.items()}
    return table


def format_accuracy_by_step(table: Mapping) -> str:
    """Return the lines of :func:`accuracy_by_step`'s table for the console."""
    seq_len = table["seq_len"]
    labels = {"all": "all"}
    note = ""
    if seq_len == 2:
        labels["partial_windows"], note = "step 1", "Step 1 has partial windows. "
    elif seq_len > 2:
        labels["partial_windows"], note = f"steps 1-{seq_len - 1}", f"Steps 1-{seq_len - 1} have partial windows. "
    labels["full_windows"] = f"steps {seq_len}+"
    lines = [f"  MAE by semantics (the model was trained on windows of {seq_len} events from zero state):"]
    for name, groups in table["runs"].items():
        parts = [f"{label} {_format_number(groups[group]['mae'], '.4f')} ({groups[group]['n']})"
                 for group, label in labels.items()]
        lines.append(f"    {name:<8} " + ", ".join(parts))
    lines.append(f"  {note}Both semantics give the same outputs up to step {seq_len}. From step {seq_len + 1} on, "
                 f"stateful carries state past the {seq_len} events the model was trained on.")
    return "\n".join(lines)


def _step_errors(outputs: Iterable[Mapping] | ScoredRecords) -> list[tuple[int, float]]:
    """Return (step, mean absolute error over the output's values) of every output with a target."""
    if isinstance(outputs, ScoredRecords):
        with_target = ~np.isnan(outputs.targets).all(axis=1)
        errors = np.abs(outputs.predictions - outputs.targets)[with_target].mean(axis=1)
        return list(zip(outputs.frame["step"].to_numpy()[with_target].tolist(), errors.tolist()))
    return [(output["step"], _mean_abs_error(output["prediction"], output["target"]))
            for output in outputs if output.get("target") is not None]


def _mean_abs_error(prediction: list[float], target: float | list[float]) -> float:
    """Return the mean absolute error over an output's values, as the overall MAE counts each value."""
    targets = target if isinstance(target, list) else [target]
    return sum(abs(p - t) for p, t in zip(prediction, targets)) / len(targets)


# ---------------------------------------------------------------------------------------------------------
# HTML

# The page lists at most this many entities so that it stays small with millions of them.
_MAX_ENTITY_ROWS = 200

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1, h2 { font-weight: 600; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; flex: 1 1 30em; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _image(path: Path, caption: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    selected = frame if columns is None else frame[columns]
    return selected.to_html(index=False, escape=True, na_rep="n/a", float_format=lambda value: f"{value:.4g}",
                         border=0)


def _key_values(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(_format_number(value))}</td></tr>" for name, value in pairs
    )
    return f"<table>{rows}</table>"


def _iso(ts: int | None) -> str | None:
    """Format epoch milliseconds as ISO-8601 in UTC, or as epoch milliseconds outside the years 1 to 9999."""
    if ts is None:
        return None
    try:
        return (EPOCH + timedelta(milliseconds=ts)).isoformat()
    except OverflowError:
        return f"{ts} (epoch ms)"


def _overview_section(summary: dict) -> str:
    metrics = summary["metrics"]
    pairs: list[tuple[str, object]] = [
        ("records", summary["records"]),
        ("scored records", summary["scored_records"]),
        ("entities", summary["entities"]),
        ("outputs per record", summary["outputs"]),
        ("first ts (UTC)", _iso(summary["first_ts"])),
        ("last ts (UTC)", _iso(summary["last_ts"])),
        ("scored values", metrics["n"]),
        ("MAE", metrics["mae"]),
        ("RMSE", metrics["rmse"]),
        ("MAPE (%)", metrics["mape_percent"]),
        ("values left out of MAPE (target 0)", metrics["mape_excluded"]),
        ("bias (mean prediction - target)", metrics["bias"]),
    ]
    run = summary.get("run") or {}
    for name, value in run.items():
        if name == "accuracy_by_step":
            continue  # a table of its own below
        if isinstance(value, Mapping):
            value = ", ".join(f"{key}: {_format_number(item)}" for key, item in value.items()) or "none"
        pairs.append((f"run: {name}", value))
    html_text = f"<h2>Overview</h2>{_key_values(pairs)}"
    if run.get("accuracy_by_step"):
        html_text += f"<pre>{html.escape(format_accuracy_by_step(run['accuracy_by_step']))}</pre>"
    return html_text


def _distribution_section(summary: dict, plot_paths: dict[str, Path]) -> str:
    errors = summary["errors"]
    quantiles = pd.DataFrame(
        {"quantile": list(errors["quantiles"]), "error": list(errors["quantiles"].values())}
    )
    abs_quantiles = pd.DataFrame(
        {"quantile": list(errors["abs_quantiles"]), "absolute error": list(errors["abs_quantiles"].values())}
    )
    return (
        "<h2>Error distribution</h2><p>Errors are prediction minus target.</p>"
        f'<div class="plots">{_image(plot_paths["error_histogram"], "histogram of errors")}</div>'
        f"{_table(quantiles)}{_table(abs_quantiles)}"
    )


def _divergence_section(result: Divergence, plot: Path, labels: tuple[str, str]) -> str:
    worst = result.by_entity.sort_values(["max_abs_diff", "entity"], ascending=[False, True]).head(20)
    counts = _key_values([
        ("join key", result.join_key),
        ("matched records", result.matched),
        (f"{labels[0]} records without a match", result.unmatched_left),
        (f"{labels[1]} records without a match", result.unmatched_right),
        ("mean |difference|", float(result.records["abs_diff"].mean()) if result.matched else None),
        ("max |difference|", float(result.records["abs_diff"].max()) if result.matched else None),
    ])
    return (
        f"<h2>{html.escape(labels[0].capitalize())} versus {html.escape(labels[1])} divergence</h2>"
        "<p>Absolute difference between the two runs' predictions for the same event (the largest over "
        "outputs), by steps since the entity's last reset.</p>"
        f'{counts}<div class="plots">{_image(plot, "divergence by step")}</div>'
        f"<h3>By step</h3>{_table(result.by_step)}"
        f"<h3>Entities with the largest difference</h3>{_table(worst)}"
    )


def render_html(
    summary: dict,
    analysis: Analysis,
    plot_paths: dict[str, Path],
    entity_figures: dict[str, tuple[Path, str]],
    divergence_result: Divergence | None,
    divergence_labels: tuple[str, str],
) -> str:
    """Return the report page with every plot inlined as a base64 PNG data URI."""
    over_time = analysis.over_time.assign(start=[_iso(int(ts)) for ts in analysis.over_time["start_ts"]])
    entity_images = "".join(_image(path, caption) for path, caption in entity_figures.values())
    per_entity = analysis.per_entity.sort_values(["mae", "entity"], ascending=[False, True], na_position="last")
    sections = [
        _overview_section(summary),
        "<h2>MAE over time</h2>"
        f'<div class="plots">{_image(plot_paths["mae_over_time"], "MAE per time bucket")}</div>'
        f'{_table(over_time, ["start", "n", "mae", "rmse", "mape_percent", "bias"])}',
        _distribution_section(summary, plot_paths),
        f"<h2>Worst entities by MAE</h2>{_table(analysis.worst)}",
        "<h2>Predictions and targets of selected entities</h2>"
        "<p>The first output of the worst entities and of entities with a median MAE.</p>"
        f'<div class="plots">{entity_images}</div>',
    ]
    if divergence_result is not None:
        sections.append(_divergence_section(divergence_result, plot_paths["divergence"], divergence_labels))
    listed = per_entity.head(_MAX_ENTITY_ROWS)
    note = ""
    if len(per_entity) > len(listed):
        note = (f"<p>The {len(listed)} entities with the highest MAE, of {len(per_entity)}. "
                "per_entity.csv lists all of them.</p>")
    sections.append(f"<h2>Entities by MAE</h2>{note}{_table(listed)}")
    title = html.escape(str(summary["title"]))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{title}</h1>{''.join(sections)}</body></html>\n"
    )
