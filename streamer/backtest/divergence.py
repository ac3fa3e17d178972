"""Divergence between two backtest runs over the same events, typically stateful versus window.

A stateful run carries each entity's recurrent state across every event since its last reset, while a
window run recomputes each prediction from zero state over the last ``seq_len`` events. The two agree
while an entity has seen fewer events than the window length and may drift apart afterwards. The
difference is therefore reported per entity and as a function of ``step``, the stateful record's count of
events since the entity's last reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson
import pandas as pd

from streamer.backtest.metrics import ScoredRecords, to_scored_records

logger = logging.getLogger(__name__)

JoinKey = Literal["auto", "source", "ts"]
# Steps below _EXACT_STEPS get a bucket each, and larger steps share power-of-two buckets [2**k, 2**(k+1)).
# When the largest step is below _EXACT_STEP_LIMIT, every step gets its own bucket.
_EXACT_STEPS = 16
_EXACT_STEP_LIMIT = 64


@dataclass(frozen=True)
class Divergence:
    """Per-record, per-step-bucket and per-entity absolute differences between two runs.

    ``records`` has columns entity, ts, step and abs_diff, where abs_diff is the largest absolute difference
    over the outputs of one joined record pair. ``by_step`` has step_min, step_max, n, mean_abs_diff,
    p95_abs_diff and max_abs_diff. ``by_entity`` has entity, n, mean_abs_diff, max_abs_diff and
    step_at_max. ``join_key`` is ``"source"`` or ``"ts"`` (entity, ts and step).
    """

    records: pd.DataFrame
    by_step: pd.DataFrame
    by_entity: pd.DataFrame
    join_key: str
    matched: int
    unmatched_left: int
    unmatched_right: int

    def summary(self) -> dict:
        """Return the counts, overall mean and max difference, and the per-step table as plain JSON values."""
        diffs = self.records["abs_diff"]
        return {
            "join_key": self.join_key,
            "matched": self.matched,
            "unmatched_left": self.unmatched_left,
            "unmatched_right": self.unmatched_right,
            "mean_abs_diff": float(diffs.mean()) if len(diffs) else None,
            "max_abs_diff": float(diffs.max()) if len(diffs) else None,
            "by_step": self.by_step.to_dict(orient="records"),
        }


def _source_keys(scored: ScoredRecords) -> list[str] | None:
    if "source_key" in scored.frame.columns:  # from read_scored_outputs
        return scored.frame["source_key"].tolist()
    if "source" not in scored.frame.columns:
        return None
    keys = []
    for source in scored.frame["source"]:
        if not isinstance(source, Mapping) or not source:
            return None
        keys.append(orjson.dumps(dict(source), option=orjson.OPT_SORT_KEYS).decode())
    return keys


def _keyed(scored: ScoredRecords, source_keys: list[str] | None, side: str) -> pd.DataFrame:
    """Return the run's entity, ts, step and row number, indexed by the join key."""
    frame = scored.frame[["entity", "ts", "step"]].copy()
    frame["row"] = np.arange(len(frame))
    if source_keys is not None:
        frame["key"] = source_keys
        key_columns = ["entity", "key"]
    else:
        key_columns = ["entity", "ts", "step"]
    duplicated = frame.duplicated(subset=key_columns)
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        join_key = "source" if source_keys is not None else "ts"
        raise ValueError(
            f"the {side} run has several records for entity {first['entity']!r} at ts {first['ts']} step "
            f"{first['step']} (join key {join_key!r}): expected one record per event; pass the records of one run"
        )
    return frame.set_index(key_columns)


def _join_keys(left: ScoredRecords, right: ScoredRecords, on: JoinKey) -> tuple[list[str] | None, list[str] | None]:
    """Return the source keys of both runs, or (None, None) to join on (entity, ts, step)."""
    if on not in ("auto", "source", "ts"):
        raise ValueError(f"invalid join key {on!r}: expected 'auto', 'source' or 'ts'")
    if on == "ts":
        return None, None
    left_keys = _source_keys(left)
    right_keys = _source_keys(right) if left_keys is not None else None
    if left_keys is None or right_keys is None:
        if on == "source":
            raise ValueError("join on 'source' requested, but some records have no source: pass on='ts' instead")
        return None, None
    return left_keys, right_keys


def step_buckets(max_step: int) -> list[tuple[int, int]]:
    """Return inclusive (step_min, step_max) buckets covering steps 0 to ``max_step``."""
    if max_step < _EXACT_STEP_LIMIT:
        return [(step, step) for step in range(max_step + 1)]
    buckets = [(step, step) for step in range(_EXACT_STEPS)]
    low = _EXACT_STEPS
    while low <= max_step:
        buckets.append((low, 2 * low - 1))
        low *= 2
    return buckets


def _by_step(records: pd.DataFrame) -> pd.DataFrame:
    columns = ["step_min", "step_max", "n", "mean_abs_diff", "p95_abs_diff", "max_abs_diff"]
    if records.empty:
        return pd.DataFrame(columns=columns)
    steps = records["step"].to_numpy()
    rows = []
    for low, high in step_buckets(int(steps.max())):
        diffs = records["abs_diff"].to_numpy()[(steps >= low) & (steps <= high)]
        if diffs.size == 0:
            continue
        rows.append((low, high, int(diffs.size), float(diffs.mean()), float(np.quantile(diffs, 0.95)),
                     float(diffs.max())))
    return pd.DataFrame(rows, columns=columns)


def _by_entity(records: pd.DataFrame) -> pd.DataFrame:
    columns = ["entity", "n", "mean_abs_diff", "max_abs_diff", "step_at_max"]
    if records.empty:
        return pd.DataFrame(columns=columns)
    grouped = records.groupby("entity", sort=True)
    table = grouped.agg(n=("abs_diff", "size"), mean_abs_diff=("abs_diff", "mean"), max_abs_diff=("abs_diff", "max"))
    table["step_at_max"] = records.loc[grouped["abs_diff"].idxmax(), ["entity", "step"]].set_index("entity")["step"]
    return table.reset_index()[columns]


def divergence(
    stateful_records: Iterable[Mapping] | pd.DataFrame | ScoredRecords,
    window_records: Iterable[Mapping] | pd.DataFrame | ScoredRecords,
    *,
    on: JoinKey = "auto",
) -> Divergence:
    """Join two runs' output records and measure how far their predictions differ.

    Records are joined on (entity, source) when every record of both runs has a non-empty ``source``
    mapping, and on (entity, ts, step) otherwise. ``on="source"`` or ``on="ts"`` forces one of the two.
    Each run must contain at most one record per join key, or ValueError is raised. Steps are taken from the
    stateful run. Records present in only one run are counted in ``unmatched_left`` (stateful) or
    ``unmatched_right`` (window) and otherwise ignored.
    """
    left = to_scored_records(stateful_records)
    right = to_scored_records(window_records)
    if left.predictions.shape[1] != right.predictions.shape[1] and len(left.frame) and len(right.frame):
        raise ValueError(
            f"the runs predict {left.predictions.shape[1]} and {right.predictions.shape[1]} outputs: "
            "expected the same model output size in both runs"
        )
    left_keys, right_keys = _join_keys(left, right, on)
    join_key = "source" if left_keys is not None else "ts"
    window_rows = _keyed(right, right_keys, "window")[["row"]].rename(columns={"row": "row_window"})
    joined = _keyed(left, left_keys, "stateful").join(window_rows, how="inner")
    joined = joined.sort_values("row")

    left_rows = joined["row"].to_numpy()
    right_rows = joined["row_window"].to_numpy()
    differences = np.abs(left.predictions[left_rows] - right.predictions[right_rows])
    abs_diff = differences.max(axis=1) if differences.size else np.zeros(len(joined))
    records = pd.DataFrame(
        {
            "entity": left.frame["entity"].to_numpy()[left_rows],
            "ts": left.frame["ts"].to_numpy()[left_rows],
            "step": left.frame["step"].to_numpy()[left_rows],
            "abs_diff": abs_diff,
        }
    )
    result = Divergence(
        records=records,
        by_step=_by_step(records),
        by_entity=_by_entity(records),
        join_key=join_key,
        matched=len(records),
        unmatched_left=len(left.frame) - len(records),
        unmatched_right=len(right.frame) - len(records),
    )
    if result.unmatched_left or result.unmatched_right:
        logger.warning(
            "divergence join on %s left %d stateful and %d window records unmatched",
            join_key, result.unmatched_left, result.unmatched_right,
        )
    return result
