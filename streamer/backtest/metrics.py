"""Accuracy metrics of backtest output records against their targets.

An output record is a mapping (or a DataFrame row) with ``entity``, ``ts`` (epoch milliseconds), ``step``
and ``prediction`` (a list, or a number for one output). It may also have ``source`` and ``target``, a
number or a list of the same length as the prediction. Records without a target are counted but not
scored. Without a ``step`` field, a record's step is its position among the records of its entity, counted
from 0.

Metrics are computed over all scored values: a record with O outputs contributes O values. The error is
``prediction - target``. MAPE is ``100 * mean(|error| / |target|)`` in percent, and it skips values whose
target is exactly zero; ``mape_excluded`` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from streamer.state.arena import NO_TIME

ERROR_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 40


@dataclass(frozen=True)
class ScoredRecords:
    """Output records as arrays.

    ``frame`` has one row per record with columns entity, ts, step and, when the records have them, source.
    ``predictions`` and ``targets`` have shape (records, outputs); a record without a target has a row of
    NaN in ``targets``. ``scored`` marks values with a finite prediction and a finite target.
    """

    frame: pd.DataFrame
    predictions: np.ndarray
    targets: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        return np.isfinite(self.predictions) & np.isfinite(self.targets)

    @property
    def errors(self) -> np.ndarray:
        return self.predictions - self.targets


def _as_vector(value: object, field: str, index: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [math.nan if item is None else float(item) for item in value]
    raise ValueError(f"record {index} has an invalid {field} {value!r}: expected a number or a list of numbers")


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _prediction_array(column: pd.Series) -> np.ndarray:
    """Return predictions as a (records, outputs) float array, or raise ValueError naming the bad record."""
    values = column.tolist()
    if not values:
        return np.zeros((0, 1))
    try:
        array = np.asarray(values, dtype="float64")
    except (TypeError, ValueError):
        array = None
    if array is not None and array.ndim in (1, 2):
        return array.reshape(len(values), -1)

    # The slow path runs only for ragged or invalid input, and finds the record to name in the error.
    predictions = [_as_vector(value, "prediction", index) for index, value in enumerate(values)]
    missing = next((index for index, prediction in enumerate(predictions) if prediction is None), None)
    if missing is not None:
        raise ValueError(f"record {missing} has no prediction: expected a number or a list of numbers")
    widths = sorted({len(prediction) for prediction in predictions})
    if len(widths) > 1:
        raise ValueError(f"predictions have lengths {widths}: expected one output size for all records")
    return np.asarray(predictions, dtype="float64").reshape(len(values), widths[0])


def _target_array(frame: pd.DataFrame, width: int) -> np.ndarray:
    """Return targets as a (records, width) float array with NaN rows for records without a target."""
    targets = np.full((len(frame), width), np.nan)
    if "target" not in frame.columns:
        return targets
    column = frame["target"]
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype="float64", na_value=np.nan)
        if width == 1:
            return values.reshape(-1, 1)
        if np.isnan(values).all():
            return targets
    for index, value in enumerate(column):
        if _is_missing(value):
            continue
        target = _as_vector(value, "target", index)
        if len(target) != width:
            raise ValueError(
                f"record {index} of entity {frame['entity'].iloc[index]!r} has a target of length {len(target)} "
                f"but a prediction of length {width}: expected equal lengths"
            )
        targets[index] = target
    return targets


def to_scored_records(records: Iterable[Mapping] | pd.DataFrame | ScoredRecords) -> ScoredRecords:
    """Convert output records (an iterable of mappings or a DataFrame) to :class:`ScoredRecords`.

    A :class:`ScoredRecords` is returned unchanged. Raises ValueError when a record lacks ``entity``, ``ts``
    or ``prediction``, when predictions differ in length, or when a target's length differs from its
    prediction's.
    """
    if isinstance(records, ScoredRecords):
        return records
    frame = records.reset_index(drop=True) if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if len(frame) == 0:
        frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, "entity", "ts", "step", "prediction"])))
    missing = [column for column in ("entity", "ts", "prediction") if column not in frame.columns]
    if missing:
        raise ValueError(
            f"output records lack the fields {missing}: expected entity, ts, step, prediction and optionally target"
        )

    predictions = _prediction_array(frame["prediction"])
    targets = _target_array(frame, predictions.shape[1] if len(frame) else 1)

    entities = frame["entity"].astype(str)
    if "step" in frame.columns:
        steps = frame["step"].astype("int64")
    else:
        steps = entities.groupby(entities).cumcount()
    columns = {
        "entity": entities.to_numpy(),
        # An output without a timestamp (its event had none) gets NO_TIME: it counts in every metric but
        # stays out of the time axis.
        "ts": pd.to_numeric(frame["ts"]).fillna(NO_TIME).astype("int64").to_numpy(),
        "step": steps.to_numpy(dtype="int64"),
    }
    if "source" in frame.columns:
        columns["source"] = frame["source"].to_numpy()
    return ScoredRecords(pd.DataFrame(columns), predictions, targets)


def read_scored_outputs(path: str | Path) -> ScoredRecords:
    """Read an output file of ``OutputWriter`` into :class:`ScoredRecords`, column by column.

    Equal to ``to_scored_records(read_outputs(path))`` but without a dict per record, which took about
    1.5 KB per output: a report of millions of outputs needed several times the memory of the run. The
    ``source`` of each record is kept as its join key (its JSON text with sorted keys) in ``source_key``.
    """
    entities: list[str] = []
    ts: list[int] = []
    steps: list[int] = []
    predictions: list[list[float]] = []
    targets: list = []
    sources: list[str] = []
    for document in _output_documents(Path(path)):
        entities.append(str(document["entity"]))
        ts.append(NO_TIME if document.get("ts") is None else document["ts"])
        steps.append(document["step"])
        predictions.append(document["prediction"])
        targets.append(document.get("target"))
        source = document.get("source")
        # As text: each bytes object from orjson.dumps kept about 4 KB of memory, whatever its length.
        sources.append(orjson.dumps(source, option=orjson.OPT_SORT_KEYS).decode() if source else "")
    width = len(predictions[0]) if predictions else 1
    prediction_array = np.asarray(predictions, dtype="float64").reshape(len(predictions), width)
    del predictions
    target_array = np.full((len(targets), width), np.nan)
    for index, target in enumerate(targets):
        if target is not None:
            target_array[index] = target
    frame = pd.DataFrame({"entity": np.asarray(entities, dtype=object), "ts": np.asarray(ts, dtype="int64"),
                          "step": np.asarray(steps, dtype="int64")})
    if sources and all(sources):
        frame["source_key"] = np.asarray(sources, dtype=object)
    return ScoredRecords(frame, prediction_array, target_array)


def _output_documents(path: Path) -> Iterator[dict]:
    """Yield the output documents of a JSON Lines or Parquet output file one at a time."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            yield from batch.to_pylist()
        return
    with path.open("rb") as file:
        for line in file:
            if line.strip():
                yield orjson.loads(line)


def error_metrics(errors: np.ndarray, targets: np.ndarray) -> dict[str, float | int]:
    """Return n, MAE, RMSE, MAPE (percent), the MAPE zero-target exclusions and the mean error (bias).

    ``errors`` and ``targets`` are 1-D arrays of scored values. With no values every metric is NaN.
    """
    count = int(errors.size)
    nonzero = targets != 0
    excluded = int(count - np.count_nonzero(nonzero))
    if count == 0:
        return {"n": 0, "mae": math.nan, "rmse": math.nan, "mape_percent": math.nan, "mape_excluded": 0,
                "bias": math.nan}
    absolute = np.abs(errors)
    mape = float(100.0 * np.mean(absolute[nonzero] / np.abs(targets[nonzero]))) if excluded < count else math.nan
    return {
        "n": count,
        "mae": float(absolute.mean()),
        "rmse": math.sqrt(float(np.mean(errors**2))),
        "mape_percent": mape,
        "mape_excluded": excluded,
        "bias": float(errors.mean()),
    }


def _metrics_frame(groups: pd.Series, errors: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """Return MAE, RMSE, MAPE and bias per group label, from one scored value per row."""
    frame = pd.DataFrame(
        {
            "group": groups.to_numpy(),
            "abs_error": np.abs(errors),
            "squared_error": errors**2,
            "error": errors,
            "ape": np.where(targets != 0, np.abs(errors) / np.where(targets != 0, np.abs(targets), 1.0), np.nan),
        }
    )
    grouped = frame.groupby("group", sort=True)
    result = pd.DataFrame(
        {
            "n": grouped.size(),
            "mae": grouped["abs_error"].mean(),
            "rmse": np.sqrt(grouped["squared_error"].mean()),
            "mape_percent": 100.0 * grouped["ape"].mean(),
            "bias": grouped["error"].mean(),
        }
    )
    return result


def _scored_values(scored: ScoredRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (record index, error, target) of every scored value, flattened in record order."""
    mask = scored.scored
    rows, _ = np.nonzero(mask)
    return rows, scored.errors[mask], scored.targets[mask]


def known_ts(ts: pd.Series) -> pd.Series:
    """Return ``ts`` as nullable integers, with NA where an output has no timestamp."""
    return ts.where(ts != NO_TIME).astype("Int64")


def per_entity_metrics(scored: ScoredRecords) -> pd.DataFrame:
    """Return one row per entity: entity, records, n, mae, rmse, mape_percent, bias, first_ts, last_ts.

    ``records`` counts all of the entity's records and ``n`` its scored values. Entities without a scored
    value have NaN metrics. Rows are sorted by entity.
    """
    frame = scored.frame.assign(ts=known_ts(scored.frame["ts"]))
    base = frame.groupby("entity", sort=True).agg(
        records=("ts", "size"), first_ts=("ts", "min"), last_ts=("ts", "max")
    )
    rows, errors, targets = _scored_values(scored)
    metrics = _metrics_frame(frame["entity"].iloc[rows], errors, targets)
    table = base.join(metrics, how="left")
    table["n"] = table["n"].fillna(0).astype("int64")
    table = table.reset_index().rename(columns={"index": "entity"})
    return table[["entity", "records", "n", "mae", "rmse", "mape_percent", "bias", "first_ts", "last_ts"]]


def time_bucket_edges(ts: np.ndarray, max_buckets: int) -> np.ndarray:
    """Return bucket start timestamps: every distinct ts when there are at most ``max_buckets``, else equal widths."""
    distinct = np.unique(ts)
    if len(distinct) <= max_buckets:
        return distinct
    # The buckets split [min, max + 1) so that integer timestamps spread evenly over them.
    return np.floor(np.linspace(distinct[0], distinct[-1] + 1, max_buckets + 1)[:-1]).astype("int64")


def over_time_metrics(scored: ScoredRecords, max_buckets: int = 100) -> pd.DataFrame:
    """Return metrics per ts bucket: start_ts, end_ts, n, mae, rmse, mape_percent, bias.

    A bucket covers ``[start_ts, end_ts)``; the last one also includes the largest ts. Buckets are one per
    distinct ts when there are at most ``max_buckets`` of them, and equal-width otherwise.
    """
    columns = ["start_ts", "end_ts", "n", "mae", "rmse", "mape_percent", "bias"]
    rows, errors, targets = _scored_values(scored)
    timed = scored.frame["ts"].to_numpy()[rows] != NO_TIME
    rows, errors, targets = rows[timed], errors[timed], targets[timed]
    if len(rows) == 0:
        return pd.DataFrame(columns=columns)
    ts = scored.frame["ts"].to_numpy()[rows]
    starts = time_bucket_edges(ts, max_buckets)
    ends = np.append(starts[1:], ts.max() + 1)
    bucket = np.searchsorted(starts, ts, side="right") - 1
    table = _metrics_frame(pd.Series(bucket), errors, targets).reindex(range(len(starts)))
    table.insert(0, "start_ts", starts)
    table.insert(1, "end_ts", ends)
    table["n"] = table["n"].fillna(0).astype("int64")
    return table[columns].reset_index(drop=True)


def error_distribution(errors: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """Return a histogram of signed errors and quantiles of the signed and absolute errors."""
    if errors.size == 0:
        return {"histogram": {"counts": [], "edges": []}, "quantiles": {}, "abs_quantiles": {}}
    counts, edges = np.histogram(errors, bins=bins)
    absolute = np.abs(errors)
    return {
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "quantiles": {str(q): float(np.quantile(errors, q)) for q in ERROR_QUANTILES},
        "abs_quantiles": {str(q): float(np.quantile(absolute, q)) for q in (0.5, 0.9, 0.95, 0.99, 1.0)},
    }


def worst_entities(per_entity: pd.DataFrame, count: int) -> pd.DataFrame:
    """Return the ``count`` entities with the highest MAE; ties are broken by entity name."""
    ranked = per_entity.dropna(subset=["mae"]).sort_values(["mae", "entity"], ascending=[False, True])
    return ranked.head(count).reset_index(drop=True)


def typical_entities(per_entity: pd.DataFrame, count: int, exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Return the ``count`` entities whose MAE is closest to the median entity MAE, skipping ``exclude``."""
    candidates = per_entity.dropna(subset=["mae"])
    candidates = candidates[~candidates["entity"].isin(list(exclude))]
    if candidates.empty:
        return candidates
    distance = (candidates["mae"] - candidates["mae"].median()).abs()
    ordered = candidates.assign(distance=distance).sort_values(["distance", "entity"])
    return ordered.drop(columns="distance").head(count).reset_index(drop=True)
