"""The fertility events: coverage, ordering, features, targets, resets and the entity split."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import orjson
import pandas as pd
import pytest

from streamer.data import FEATURE_NAMES, build_fertility_events, load_fertility_events, write_events
from streamer.data.fertility import load_fertility_table, year_to_epoch_ms


@pytest.fixture(scope="module")
def all_events() -> list[dict]:
    return load_fertility_events("all")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_fertility_table()


def test_fertility_has_enough_entities(all_events):
    entities = {event["entity"] for event in all_events}

    assert len(entities) >= 100


def test_events_in_time_order(all_events):
    keys = [(event["ts"], event["entity"]) for event in all_events]

    assert keys == sorted(keys)


def test_entities_interleaved_by_year(all_events):
    years = [event["ts"] for event in all_events]
    first_1961 = years.index(year_to_epoch_ms(1961))

    assert all(ts == year_to_epoch_ms(1960) for ts in years[:first_1961])
    assert len({event["entity"] for event in all_events[:first_1961]}) == first_1961
    assert first_1961 >= 100


def test_year_to_epoch_ms():
    assert year_to_epoch_ms(1970) == 0
    assert year_to_epoch_ms(2000) == 946_684_800_000
    assert year_to_epoch_ms(1960) == -315_619_200_000


def test_features_finite_and_named(all_events):
    for event in all_events:
        assert len(event["features"]) == len(FEATURE_NAMES)
        assert all(math.isfinite(value) for value in event["features"])


def test_targets_are_next_year_rate(all_events, table):
    year_of_ts = {year_to_epoch_ms(year): year for year in table.columns}
    checked = 0
    for event in all_events:
        year = year_of_ts[event["ts"]]
        rate = table.loc[event["entity"], year]
        assert event["features"][0] == rate
        next_rate = table.loc[event["entity"], year + 1] if year + 1 in table.columns else math.nan
        if math.isnan(next_rate):
            assert "target" not in event
        else:
            assert event["target"] == next_rate
            checked += 1

    assert checked > 9000


def test_change_feature_and_last_year_without_target(all_events):
    by_entity = defaultdict(list)
    for event in all_events:
        by_entity[event["entity"]].append(event)

    for events in by_entity.values():
        assert "target" not in events[-1]
        assert events[0]["features"][1] == 0.0
        assert events[0]["reset"] is False
        for previous, current in zip(events, events[1:]):
            if current["reset"]:
                assert current["features"][1] == 0.0
            else:
                expected = round(current["features"][0] - previous["features"][0], 6)
                assert current["features"][1] == expected
                assert previous["target"] == current["features"][0]


def test_gap_starts_segment_with_reset():
    years = list(range(2000, 2026))
    values = np.arange(len(years), dtype="float64") + 1.0
    values[10] = math.nan
    table = pd.DataFrame([values], index=pd.Index(["GAP"], name="entity"), columns=years)

    events = build_fertility_events(table, min_observed_years=20)

    assert len(events) == 25
    assert [event["reset"] for event in events].count(True) == 1
    assert events[10]["reset"] is True
    assert events[10]["features"] == [12.0, 0.0]
    assert "target" not in events[9]
    assert events[9]["features"][0] == 10.0
    assert events[10]["target"] == 13.0


def test_entities_with_few_years_dropped():
    years = list(range(2000, 2030))
    short = np.full(len(years), math.nan)
    short[:5] = 1.0
    table = pd.DataFrame([np.ones(len(years)), short], index=pd.Index(["LONG", "SHORT"], name="entity"),
                         columns=years)

    entities = {event["entity"] for event in build_fertility_events(table, min_observed_years=20)}

    assert entities == {"LONG"}


def test_split_disjoint_and_complete(all_events):
    train = load_fertility_events("train")
    holdout = load_fertility_events("holdout")
    train_entities = {event["entity"] for event in train}
    holdout_entities = {event["entity"] for event in holdout}

    assert not train_entities & holdout_entities
    assert train_entities | holdout_entities == {event["entity"] for event in all_events}
    assert len(train) + len(holdout) == len(all_events)
    assert 0.1 < len(holdout_entities) / len(train_entities | holdout_entities) < 0.3


def test_split_deterministic():
    first = [event["entity"] for event in load_fertility_events("holdout")]
    second = [event["entity"] for event in load_fertility_events("holdout")]
    other_seed = {event["entity"] for event in load_fertility_events("holdout", seed=1)}

    assert first == second
    assert other_seed != set(first)


def test_invalid_split_rejected():
    with pytest.raises(ValueError, match="invalid split"):
        load_fertility_events("test")


def test_write_jsonl_roundtrip(tmp_path, all_events):
    events = all_events[:300]
    path = write_events(events, tmp_path / "events.jsonl")

    lines = path.read_bytes().splitlines()

    assert [orjson.loads(line) for line in lines] == events


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_table_columns(tmp_path, all_events, suffix):
    events = [event for event in all_events if event["entity"] == "DEU"]
    path = write_events(events, tmp_path / f"events{suffix}", feature_names=FEATURE_NAMES)

    frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)

    assert list(frame.columns) == ["entity", "ts", "reset", "target", *FEATURE_NAMES]
    assert frame["ts"].tolist() == [event["ts"] for event in events]
    assert frame["fertility_rate"].tolist() == [event["features"][0] for event in events]
    assert frame["target"].iloc[:-1].tolist() == [event["target"] for event in events[:-1]]
    assert math.isnan(frame["target"].iloc[-1])
    assert frame["reset"].tolist() == [False] * len(events)


def test_write_default_feature_columns(tmp_path):
    events = [{"entity": "a", "ts": 1, "features": [1.0, 2.0, 3.0], "reset": True}]

    frame = pd.read_csv(write_events(events, tmp_path / "events.csv"))

    assert list(frame.columns) == ["entity", "ts", "reset", "target", "f0", "f1", "f2"]


def test_write_unknown_suffix_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected .jsonl, .csv or .parquet"):
        write_events([], tmp_path / "events.txt")
