"""World Bank fertility rates as per-entity event streams.

The source is the World Bank indicator "Fertility rate, total (births per woman)" that statsmodels ships
(``statsmodels.api.datasets.fertility``), so loading it needs no network. The table has one row per country
(219 rows) and one column per year, 1960 to 2013; the 2012 and 2013 columns contain no values in the
statsmodels 0.14 and 0.15 copies.

Each observed (country, year) value becomes one event:

- ``entity``: the ISO 3166-1 alpha-3 country code, for example ``"DEU"``.
- ``ts``: epoch milliseconds (UTC) of January 1 of the year. Years before 1970 give negative values.
- ``features``: ``[fertility_rate, fertility_change]``, in births per woman. The change is the rate minus the
  previous year's rate, rounded to 6 decimals, and 0.0 on the first event of a segment, where no previous
  value exists.
- ``reset``: true on the first event after a gap of one or more missing years, so a stateful consumer starts
  that segment from zero state. The first event of a country is not marked, because a new entity already
  starts from zero state.
- ``target``: the next year's rate (one-step-ahead forecast). The key is absent when the next year is missing,
  which is the case for each country's last observed year and for the year before a gap. Those events are
  kept because they still advance the recurrent state.

Countries with fewer than ``MIN_OBSERVED_YEARS`` observed years are dropped. Events are ordered by year and,
within a year, by country code, so all countries' 1960 events come first, then 1961, and so on.

The train/holdout split is by entity: a country goes to the holdout split when a seeded BLAKE2b hash of its
code falls into the holdout fraction. Splitting by entity lets a backtest replay complete histories from
1960 for countries the model never saw, which is what a stateful engine serving new entities faces. A split
by time would start every holdout stream in the middle of its history.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
import pandas as pd

logger = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = ("fertility_rate", "fertility_change")
MIN_OBSERVED_YEARS = 20
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0

Split = Literal["train", "holdout", "all"]
_SPLITS = ("train", "holdout", "all")


def year_to_epoch_ms(year: int) -> int:
    """Return the epoch milliseconds of January 1, 00:00 UTC, of ``year``."""
    start = dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc)
    return int(start.timestamp()) * 1000


def load_fertility_table() -> pd.DataFrame:
    """Load the statsmodels copy as a frame indexed by country code with one float column per year.

    Year columns that contain no value at all are dropped.
    """
    # Imported here because statsmodels takes about a second to import and only this loader needs it.
    from statsmodels.datasets import fertility

    raw = fertility.load_pandas().data
    year_columns = [column for column in raw.columns if str(column).isdigit()]
    table = raw.set_index("Country Code")[year_columns].astype("float64")
    table.columns = [int(column) for column in year_columns]
    table = table.dropna(axis="columns", how="all")
    table.index = table.index.astype(str)
    table.index.name = "entity"
    return table


def is_holdout_entity(entity: str, *, holdout_fraction: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED) -> bool:
    """Return whether ``entity`` belongs to the holdout split.

    The decision depends only on the code, the fraction and the seed, so it is the same in every process
    and on every platform (unlike Python's salted ``hash``).
    """
    digest = hashlib.blake2b(f"{seed}:{entity}".encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    return position < holdout_fraction


def _country_events(entity: str, years: Sequence[int], values: np.ndarray) -> list[dict]:
    events: list[dict] = []
    previous_value: float | None = None
    for index, year in enumerate(years):
        value = float(values[index])
        if math.isnan(value):
            previous_value = None
            continue
        segment_start = previous_value is None
        # Rounded so that float subtraction noise (4.655 - 4.82 = -0.16500000000000004) stays out of the data.
        change = 0.0 if segment_start else round(value - previous_value, 6)
        event: dict = {
            "entity": entity,
            "ts": year_to_epoch_ms(year),
            "features": [value, change],
            "reset": segment_start and bool(events),
        }
        next_index = index + 1
        if next_index < len(years) and not math.isnan(values[next_index]):
            event["target"] = float(values[next_index])
        events.append(event)
        previous_value = value
    return events


def build_fertility_events(
    table: pd.DataFrame, *, min_observed_years: int = MIN_OBSERVED_YEARS
) -> list[dict]:
    """Turn a country-by-year table into events in year order, countries interleaved within each year.

    ``table`` is indexed by entity, with integer year columns in increasing, consecutive order.
    Rows with fewer than ``min_observed_years`` non-missing values are dropped.
    """
    years = [int(year) for year in table.columns]
    if years and years != list(range(years[0], years[0] + len(years))):
        raise ValueError(
            f"invalid year columns {years}: expected consecutive increasing years; "
            "add missing years as columns of NaN"
        )

    observed = table.notna().sum(axis="columns")
    eligible = table[observed >= min_observed_years].sort_index()
    dropped = len(table) - len(eligible)
    if dropped:
        logger.debug("dropped %d entities with fewer than %d observed years", dropped, min_observed_years)

    events: list[dict] = []
    for entity, row in eligible.iterrows():
        events.extend(_country_events(str(entity), years, row.to_numpy(dtype="float64")))
    # (ts, entity) is unique, so this puts all countries of a year together, in code order.
    events.sort(key=lambda event: (event["ts"], event["entity"]))
    return events


def load_fertility_events(
    split: Split = "all",
    *,
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = SPLIT_SEED,
    min_observed_years: int = MIN_OBSERVED_YEARS,
) -> list[dict]:
    """Load the fertility events of one split (``"train"``, ``"holdout"`` or ``"all"``).

    See the module docstring for the event fields, the ordering and how the split is chosen.
    """
    if split not in _SPLITS:
        raise ValueError(f"invalid split {split!r}: expected one of {', '.join(_SPLITS)}")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"invalid holdout_fraction {holdout_fraction!r}: expected a number in [0, 1]")

    events = build_fertility_events(load_fertility_table(), min_observed_years=min_observed_years)
    if split == "all":
        return events
    want_holdout = split == "holdout"
    return [
        event
        for event in events
        if is_holdout_entity(event["entity"], holdout_fraction=holdout_fraction, seed=seed) == want_holdout
    ]


def _feature_columns(events: Sequence[dict], feature_names: Sequence[str] | None) -> list[str]:
    width = len(events[0]["features"]) if events else len(feature_names or ())
    if feature_names is None:
        return [f"f{index}" for index in range(width)]
    if len(feature_names) != width:
        raise ValueError(
            f"feature_names has {len(feature_names)} names but the events have {width} features; "
            "pass one name per feature"
        )
    return list(feature_names)


def events_to_frame(events: Sequence[dict], *, feature_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Return events as a frame with columns entity, ts, reset, target and one column per feature.

    Feature columns are named by ``feature_names``, or ``f0``, ``f1``, ... when it is None. A missing target
    becomes NaN. Only scalar targets (a number or a one-element list) fit the ``target`` column.
    """
    columns = _feature_columns(events, feature_names)
    features = np.array([event["features"] for event in events], dtype="float64").reshape(len(events), len(columns))
    targets = np.full(len(events), np.nan)
    for index, event in enumerate(events):
        target = event.get("target")
        if target is None:
            continue
        if isinstance(target, list):
            if len(target) != 1:
                raise ValueError(
                    f"event {index} of entity {event['entity']!r} has a target with {len(target)} values; "
                    "CSV and Parquet output supports scalar targets only, so write JSON Lines instead"
                )
            target = target[0]
        targets[index] = float(target)

    frame = pd.DataFrame(
        {
            "entity": pd.Series([event["entity"] for event in events], dtype="string"),
            "ts": pd.Series([event["ts"] for event in events], dtype="int64"),
            "reset": pd.Series([bool(event.get("reset", False)) for event in events], dtype="bool"),
            "target": targets,
        }
    )
    for position, name in enumerate(columns):
        frame[name] = features[:, position]
    return frame


def write_events(
    events: Iterable[dict], path: str | Path, *, feature_names: Sequence[str] | None = None
) -> Path:
    """Write events to ``path`` as JSON Lines, CSV or Parquet, chosen by the suffix.

    ``.jsonl`` (or ``.ndjson``) writes one JSON object per line, exactly as the events are. ``.csv`` and
    ``.parquet`` write the columns entity, ts, reset, target and one float column per feature, named by
    ``feature_names`` (``f0``, ``f1``, ... when None). An empty ``target`` cell means the event has no target.
    Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    events = list(events)
    if suffix in (".jsonl", ".ndjson"):
        with path.open("wb") as handle:
            for event in events:
                handle.write(orjson.dumps(event))
                handle.write(b"\n")
    elif suffix == ".csv":
        events_to_frame(events, feature_names=feature_names).to_csv(path, index=False)
    elif suffix == ".parquet":
        events_to_frame(events, feature_names=feature_names).to_parquet(path, index=False)
    else:
        raise ValueError(f"unsupported event file suffix {path.suffix!r} in {path}: expected .jsonl, .csv or .parquet")
    logger.debug("wrote %d events to %s", len(events), path)
    return path
