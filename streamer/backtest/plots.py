"""PNG plots of a backtest, drawn with matplotlib's object API and the Agg renderer.

The functions build ``matplotlib.figure.Figure`` objects directly instead of using pyplot, so they neither
need a display nor touch pyplot's global figure list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

_DPI = 100
# Without a Software entry the PNG bytes do not depend on the matplotlib version.
_PNG_METADATA = {"Software": None}


def _new_figure(width: float = 8.0, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


# Epoch milliseconds of about 1678 to 2261, the range of pandas' nanosecond timestamps. Events may carry any
# time below 2**62 ms, and an axis with times outside this range shows epoch milliseconds instead of dates.
MAX_DATE_MS = 9_200_000_000_000


def _time_axis(axes: Axes, ts: np.ndarray | pd.Series, label: str) -> pd.DatetimeIndex | np.ndarray:
    """Return the x positions of ``ts`` (epoch ms) and label the axis: dates, or epoch ms out of their range."""
    values = np.asarray(ts, dtype="int64")
    if values.size and np.abs(values).max() >= MAX_DATE_MS:
        axes.set_xlabel(f"{label} (epoch ms)")
        return values
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_xlabel(f"{label} (UTC)")
    return pd.to_datetime(values, unit="ms", utc=True)


def plot_entity(
    path: Path, entity: str, ts: np.ndarray | None, predictions: np.ndarray, targets: np.ndarray, label: str,
    steps: np.ndarray | None = None,
) -> Path:
    """Plot the first output's prediction and target of one entity over time, or over ``steps`` without ``ts``.

    ``predictions`` and ``targets`` are 1-D arrays aligned with ``ts``; NaN targets are left out of the line.
    """
    if ts is None and steps is None:
        raise ValueError("Missing x axis for plot_entity: pass ts or steps")
    figure = _new_figure()
    axes = figure.add_subplot()
    if ts is not None:
        positions = _time_axis(axes, ts, "time")
    else:
        positions = np.asarray(steps)
        axes.set_xlabel("step")
    axes.plot(positions, predictions, label="prediction", color="tab:blue", linewidth=1.5)
    has_target = np.isfinite(targets)
    axes.plot(positions[has_target], targets[has_target], label="target", color="tab:orange", linewidth=1.5,
              linestyle="--")
    axes.set_title(f"{entity} ({label})")
    axes.set_ylabel("value")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_error_histogram(path: Path, counts: list[int], edges: list[float]) -> Path:
    """Plot a histogram of signed errors (prediction minus target) from precomputed bin counts."""
    figure = _new_figure()
    axes = figure.add_subplot()
    if counts:
        edges_array = np.asarray(edges)
        axes.bar(edges_array[:-1], counts, width=np.diff(edges_array), align="edge", color="tab:blue",
                 edgecolor="white")
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_title("Error distribution")
    axes.set_xlabel("prediction - target")
    axes.set_ylabel("values")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_mae_over_time(path: Path, over_time: pd.DataFrame) -> Path:
    """Plot MAE per time bucket, placed at each bucket's start."""
    figure = _new_figure()
    axes = figure.add_subplot()
    if not over_time.empty:
        axes.plot(_time_axis(axes, over_time["start_ts"], "bucket start"), over_time["mae"], marker="o",
                  markersize=3, color="tab:red")
    else:
        axes.set_xlabel("bucket start")
    axes.set_title("MAE over time")
    axes.set_ylabel("MAE")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_divergence(path: Path, by_step: pd.DataFrame, labels: tuple[str, str]) -> Path:
    """Plot mean, 95th percentile and max absolute prediction difference per step bucket."""
    figure = _new_figure()
    axes = figure.add_subplot()
    if not by_step.empty:
        steps = by_step["step_min"].to_numpy()
        axes.plot(steps, by_step["mean_abs_diff"], marker="o", markersize=3, label="mean")
        axes.plot(steps, by_step["p95_abs_diff"], marker="^", markersize=3, label="95th percentile")
        axes.plot(steps, by_step["max_abs_diff"], marker="s", markersize=3, label="max")
        axes.legend(loc="best")
    axes.set_title(f"|{labels[0]} - {labels[1]}| by steps since reset")
    axes.set_xlabel("steps since reset (bucket start)")
    axes.set_ylabel("absolute prediction difference")
    axes.grid(alpha=0.3)
    return _save(figure, path)
