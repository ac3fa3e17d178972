"""Backtest metrics, report files, the HTML page and stateful versus window divergence."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import orjson
import pandas as pd
import pytest
import torch

from streamer.backtest import divergence, format_summary, write_report
from streamer.backtest.report import accuracy_by_step, format_accuracy_by_step
from streamer.backtest.divergence import step_buckets
from streamer.backtest.metrics import (
    error_metrics,
    over_time_metrics,
    per_entity_metrics,
    to_scored_records,
    worst_entities,
)
from streamer.backtest.report import analyze


def _record(entity, ts, step, prediction, target=None, line=None):
    record = {"entity": entity, "ts": ts, "step": step, "prediction": prediction, "model": "abc"}
    if target is not None:
        record["target"] = target
    if line is not None:
        record["source"] = {"path": "events.jsonl", "line": line}
    return record


# Errors (prediction - target): A: -1, 0, unscored; B: 2 (target 0), 2.
SMALL = [
    _record("A", 0, 0, [1.0], 2.0),
    _record("A", 1000, 1, [3.0], 3.0),
    _record("A", 2000, 2, [5.0]),
    _record("B", 0, 0, [2.0], 0.0),
    _record("B", 1000, 1, [6.0], [4.0]),
]


def test_overall_metrics_by_hand():
    summary = analyze(SMALL).summary
    metrics = summary["metrics"]

    assert summary["records"] == 5
    assert summary["scored_records"] == 4
    assert summary["entities"] == 2
    assert metrics["n"] == 4
    assert metrics["mae"] == pytest.approx(1.25)
    assert metrics["rmse"] == pytest.approx(1.5)
    assert metrics["mape_percent"] == pytest.approx(100.0 / 3.0)
    assert metrics["mape_excluded"] == 1
    assert metrics["bias"] == pytest.approx(0.75)


def test_per_entity_metrics_by_hand():
    table = per_entity_metrics(to_scored_records(SMALL)).set_index("entity")

    assert table.loc["A", "records"] == 3
    assert table.loc["A", "n"] == 2
    assert table.loc["A", "mae"] == pytest.approx(0.5)
    assert table.loc["A", "rmse"] == pytest.approx(math.sqrt(0.5))
    assert table.loc["A", "mape_percent"] == pytest.approx(25.0)
    assert table.loc["A", "bias"] == pytest.approx(-0.5)
    assert table.loc["A", "last_ts"] == 2000
    assert table.loc["B", "mae"] == pytest.approx(2.0)
    assert table.loc["B", "mape_percent"] == pytest.approx(50.0)


def test_worst_entities_order():
    table = per_entity_metrics(to_scored_records(SMALL))

    assert worst_entities(table, 5)["entity"].tolist() == ["B", "A"]


def test_over_time_metrics_by_hand():
    table = over_time_metrics(to_scored_records(SMALL))

    assert table["start_ts"].tolist() == [0, 1000]
    assert table["n"].tolist() == [2, 2]
    assert table["mae"].tolist() == pytest.approx([1.5, 1.0])
    assert table["rmse"].tolist() == pytest.approx([math.sqrt(2.5), math.sqrt(2.0)])


def test_over_time_equal_width_buckets():
    records = [_record("A", ts, 0, [float(ts)], 0.0) for ts in range(100)]

    table = over_time_metrics(to_scored_records(records), max_buckets=10)

    assert len(table) == 10
    assert table["n"].tolist() == [10] * 10
    assert table["start_ts"].iloc[1] == 10


def test_error_metrics_empty_and_all_zero_targets():
    empty = error_metrics(np.array([]), np.array([]))
    zeros = error_metrics(np.array([1.0, -1.0]), np.array([0.0, 0.0]))

    assert empty["n"] == 0
    assert math.isnan(empty["mae"])
    assert zeros["mae"] == 1.0
    assert math.isnan(zeros["mape_percent"])
    assert zeros["mape_excluded"] == 2


def test_multi_output_records():
    records = [_record("A", 0, 0, [1.0, 10.0], [2.0, 12.0]), _record("A", 1, 1, [0.0, 0.0], [0.0, 1.0])]

    metrics = analyze(records).summary["metrics"]

    assert metrics["n"] == 4
    assert metrics["mae"] == pytest.approx((1 + 2 + 0 + 1) / 4)


def test_dataframe_input_matches_dicts():
    frame = pd.DataFrame(SMALL)

    assert analyze(frame).summary["metrics"] == analyze(SMALL).summary["metrics"]


def test_target_length_mismatch_rejected():
    with pytest.raises(ValueError, match="target of length 2"):
        to_scored_records([_record("A", 0, 0, [1.0], [1.0, 2.0])])


def test_missing_prediction_field_rejected():
    with pytest.raises(ValueError, match="lack the fields"):
        to_scored_records([{"entity": "A", "ts": 0}])


def test_missing_step_uses_entity_position():
    records = [{"entity": e, "ts": i, "prediction": [0.0]} for i, e in enumerate("ABAAB")]

    steps = to_scored_records(records).frame["step"].tolist()

    assert steps == [0, 0, 1, 2, 1]


def _fertility_like_records(entities: int = 8, steps: int = 30) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    line = 0
    for step in range(steps):
        for index in range(entities):
            target = 2.0 + np.sin(step / 5 + index)
            prediction = target + rng.normal(0, 0.05 * (index + 1))
            records.append(_record(f"C{index}", step * 1000, step, [prediction], target, line=line))
            line += 1
    return records


def test_report_files_written(tmp_path):
    records = _fertility_like_records()

    paths = write_report(records, tmp_path / "report", title="Test run", extra_summary={"events": 240,
                         "dead_letters": 3, "events_per_second": 1000.0})

    for path in (paths.summary, paths.per_entity, paths.over_time, paths.html, *paths.plots.values()):
        assert path.is_file()
        assert path.stat().st_size > 0
    assert paths.divergence is None
    assert {"mae_over_time", "error_histogram", "entity_worst_1", "entity_typical_1"} <= set(paths.plots)
    summary = json.loads(paths.summary.read_text())
    assert summary["run"]["dead_letters"] == 3
    assert summary["worst_entities"][0]["entity"] == "C7"
    assert sum(summary["errors"]["histogram"]["counts"]) == 240
    per_entity = pd.read_csv(paths.per_entity)
    assert list(per_entity.columns) == ["entity", "records", "n", "mae", "rmse", "mape_percent", "bias",
                                        "first_ts", "last_ts"]
    assert len(per_entity) == 8


@pytest.mark.parametrize("ts", [253_402_300_799_000, -62_135_596_800_000, 10**16, 2**62 - 1])
def test_report_with_times_beyond_dates(tmp_path, ts):
    """Events may carry any time below 2**62 ms, 9999-12-31 and 0001-01-01 included: the report plots and
    prints what pandas' timestamps cannot hold as epoch milliseconds."""
    records = [_record("A", ts - 2000 * step, step, [float(step)], 1.0) for step in range(3)]
    records += [_record("B", ts - 1000, 1, [0.5], 1.0), _record("B", 0, 2, [0.5], 1.0)]

    paths = write_report(records, tmp_path / "report", title="Far times")

    summary = json.loads(paths.summary.read_text())
    assert summary["first_ts"] == min(record["ts"] for record in records)
    assert summary["last_ts"] == max(record["ts"] for record in records)
    assert {"mae_over_time", "entity_worst_1"} <= set(paths.plots)
    text = paths.html.read_text()
    if ts == 253_402_300_799_000:
        assert "9999-12-31T23:59:59+00:00" in text
    if ts == 2**62 - 1:
        assert f"{ts} (epoch ms)" in text


def test_report_removes_files_of_an_earlier_report(tmp_path):
    records = _fertility_like_records()
    first = write_report(records, tmp_path / "report", divergence_against=records)
    (tmp_path / "report" / "notes.txt").write_text("mine")
    assert first.divergence.is_file()

    second = write_report(records, tmp_path / "report", entity_plots=1)

    assert second.divergence is None
    assert not (tmp_path / "report" / "divergence.jsonl").exists()
    assert not (tmp_path / "report" / "divergence.png").exists()
    assert sorted(path.name for path in (tmp_path / "report").glob("entity_*.png")) == [
        "entity_typical_1.png", "entity_worst_1.png"]
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine"


def test_report_overview_renders_run_tables(tmp_path):
    records = _fertility_like_records()
    table = accuracy_by_step({"stateful": records, "window": records}, 5)

    paths = write_report(records, tmp_path / "report", extra_summary={
        "events": 240, "dead_letter_reasons": {"invalid_json": 2, "feature_count": 1}, "accuracy_by_step": table})

    text = paths.html.read_text()
    assert "invalid_json: 2, feature_count: 1" in text
    assert "MAE by semantics" in text
    assert "{&#x27;" not in text
    assert "{'" not in text


def test_report_html_self_contained(tmp_path):
    records = _fertility_like_records()
    window = [dict(record, prediction=[record["prediction"][0] + 0.01 * record["step"]]) for record in records]

    paths = write_report(records, tmp_path, title="A <b> title", divergence_against=window)

    page = paths.html.read_text()
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == len(paths.plots)
    assert all(source.startswith("data:image/png;base64,") for source in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page
    assert "A &lt;b&gt; title" in page
    assert "divergence" in page


def test_report_deterministic(tmp_path):
    records = _fertility_like_records()

    first = write_report(records, tmp_path / "one")
    second = write_report(records, tmp_path / "two")

    assert first.html.read_bytes() == second.html.read_bytes()
    assert first.summary.read_bytes() == second.summary.read_bytes()


def test_format_summary_lines(tmp_path):
    paths = write_report(SMALL, tmp_path, extra_summary={"events": 7, "dead_letters": 2,
                                                         "events_per_second": 12345.6})

    text = format_summary(json.loads(paths.summary.read_text()))

    assert "events 7" in text
    assert "entities 2" in text
    assert "dead letters 2" in text
    assert "12,346 events/s" in text
    assert "MAE 1.25" in text
    assert "RMSE 1.5" in text
    assert "MAPE 33.33 %" in text
    assert "1 zero targets left out of MAPE" in text


def test_format_summary_duplicates(tmp_path):
    with_duplicates = write_report(SMALL, tmp_path / "one", extra_summary={"events": 7, "duplicates": 3})
    without = write_report(SMALL, tmp_path / "two", extra_summary={"events": 7, "duplicates": 0})

    assert "duplicates 3 (not applied" in format_summary(json.loads(with_duplicates.summary.read_text()))
    assert "duplicates" not in format_summary(json.loads(without.summary.read_text()))


def test_format_summary_without_mape():
    summary = {"records": 3, "entities": 1, "scored_records": 3,
               "metrics": {"mae": 0.5, "rmse": 0.5, "mape_percent": None}}

    text = format_summary(summary)

    assert "scored 3 records:" in text
    assert "MAPE n/a" in text
    assert "n/a %" not in text


def test_format_summary_counts_records_without_target():
    summary = {"records": 5, "entities": 1, "scored_records": 3, "metrics": {"mae": 0.5, "rmse": 0.5}}

    text = format_summary(summary)

    assert "scored 3 of 5 records (the others have no target or a non-finite prediction):" in text


def test_format_summary_without_any_target():
    summary = {"records": 7, "entities": 2, "scored_records": 0, "metrics": {"mae": None, "rmse": None}}

    text = format_summary(summary)

    assert "accuracy: none of the 7 records has a target and a finite prediction" in text
    assert "MAE" not in text


def _divergence_runs():
    stateful = [
        _record("A", 0, 0, [1.0], line=0),
        _record("B", 0, 0, [5.0], line=1),
        _record("A", 1, 1, [2.0], line=2),
        _record("B", 1, 1, [5.0], line=3),
        _record("A", 2, 2, [3.0], line=4),
        _record("A", 3, 0, [4.0], line=5),
    ]
    window = [
        _record("A", 0, 0, [1.0], line=0),
        _record("B", 0, 0, [5.5], line=1),
        _record("A", 1, 1, [2.5], line=2),
        _record("B", 1, 1, [4.0], line=3),
        _record("A", 2, 2, [1.0], line=4),
        _record("C", 9, 0, [0.0], line=6),
    ]
    return stateful, window


def test_divergence_by_step_by_hand():
    stateful, window = _divergence_runs()

    result = divergence(stateful, window)

    by_step = result.by_step.set_index("step_min")
    assert result.join_key == "source"
    assert result.matched == 5
    assert result.unmatched_left == 1
    assert result.unmatched_right == 1
    assert by_step.loc[0, "n"] == 2
    assert by_step.loc[0, "mean_abs_diff"] == pytest.approx(0.25)
    assert by_step.loc[0, "max_abs_diff"] == pytest.approx(0.5)
    assert by_step.loc[1, "mean_abs_diff"] == pytest.approx(0.75)
    assert by_step.loc[1, "max_abs_diff"] == pytest.approx(1.0)
    assert by_step.loc[2, "mean_abs_diff"] == pytest.approx(2.0)


def test_divergence_by_entity_by_hand():
    stateful, window = _divergence_runs()

    by_entity = divergence(stateful, window).by_entity.set_index("entity")

    assert by_entity.loc["A", "n"] == 3
    assert by_entity.loc["A", "mean_abs_diff"] == pytest.approx(2.5 / 3)
    assert by_entity.loc["A", "max_abs_diff"] == pytest.approx(2.0)
    assert by_entity.loc["A", "step_at_max"] == 2
    assert by_entity.loc["B", "max_abs_diff"] == pytest.approx(1.0)


def test_divergence_join_without_source():
    stateful, window = _divergence_runs()
    for record in stateful + window:
        del record["source"]

    result = divergence(stateful, window)

    assert result.join_key == "ts"
    assert result.matched == 5
    assert result.records["abs_diff"].sum() == pytest.approx(0.5 + 0.5 + 1.0 + 2.0)


def test_divergence_duplicate_keys_rejected():
    stateful, window = _divergence_runs()

    with pytest.raises(ValueError, match="several records"):
        divergence(stateful + stateful[:1], window)


def test_divergence_files(tmp_path):
    stateful, window = _divergence_runs()

    paths = write_report(stateful, tmp_path, divergence_against=window)

    rows = [json.loads(line) for line in paths.divergence.read_text().splitlines()]
    assert len(rows) == 5
    assert set(rows[0]) == {"entity", "ts", "step", "abs_diff"}
    assert list(pd.read_csv(paths.divergence_by_step).columns) == [
        "step_min", "step_max", "n", "mean_abs_diff", "p95_abs_diff", "max_abs_diff"]
    summary = json.loads(paths.summary.read_text())
    assert summary["divergence"]["matched"] == 5
    assert summary["divergence"]["max_abs_diff"] == pytest.approx(2.0)


def test_step_buckets_exact_then_powers_of_two():
    assert step_buckets(3) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    buckets = step_buckets(100)
    assert buckets[15] == (15, 15)
    assert buckets[16:] == [(16, 31), (32, 63), (64, 127)]


def test_null_prediction_value_not_scored():
    scored = to_scored_records([_record("A", 0, 0, [None], 1.0), _record("A", 1, 1, [2.0], 1.0)])

    assert scored.predictions.shape == (2, 1)
    assert scored.scored[:, 0].tolist() == [False, True]


def test_ragged_predictions_rejected():
    with pytest.raises(ValueError, match="lengths"):
        to_scored_records([_record("A", 0, 0, [1.0]), _record("A", 1, 1, [1.0, 2.0])])


def test_empty_records_report(tmp_path):
    paths = write_report([], tmp_path)

    summary = json.loads(paths.summary.read_text())
    assert summary["records"] == 0
    assert summary["metrics"]["mae"] is None


def test_report_of_outputs_without_ts(tmp_path):
    # Events without a timestamp give outputs with "ts": null. B has none at all, A one of two.
    records = [
        _record("A", None, 1, [1.0], 2.0, line=0),
        _record("A", 5000, 2, [3.0], 3.0, line=1),
        _record("B", None, 1, [2.0], 0.0, line=2),
        _record("B", None, 2, [6.0], 4.0, line=3),
    ]

    paths = write_report(records, tmp_path, divergence_against=records)

    summary = json.loads(paths.summary.read_text())
    per_entity = pd.read_csv(paths.per_entity)
    over_time = pd.read_csv(paths.over_time)
    divergence_rows = [json.loads(line) for line in (tmp_path / "divergence.jsonl").read_text().splitlines()]
    assert summary["scored_records"] == 4
    assert summary["metrics"]["mae"] == pytest.approx(1.25)
    assert summary["first_ts"] == 5000
    assert summary["last_ts"] == 5000
    assert per_entity.set_index("entity").loc["A", "first_ts"] == 5000
    assert pd.isna(per_entity.set_index("entity").loc["B", "first_ts"])
    assert over_time["n"].sum() == 1
    assert [row["ts"] for row in divergence_rows] == [None, 5000, None, None]
    assert paths.html.is_file()


def _output(step: int, prediction: float, target: float | None) -> dict:
    return {"entity": "a", "step": step, "prediction": [prediction], "target": target}


def test_accuracy_split_at_window_length():
    window = [_output(1, 1.0, 2.0), _output(2, 1.0, 1.5), _output(3, 1.0, 1.1), _output(4, 1.0, None)]
    stateful = [_output(1, 1.0, 2.0), _output(2, 1.0, 1.5), _output(3, 1.0, 1.3), _output(4, 1.0, None)]

    table = accuracy_by_step({"window": window, "stateful": stateful}, seq_len=3)
    text = format_accuracy_by_step(table)

    assert table["runs"]["window"]["full_windows"] == {"mae": pytest.approx(0.1), "n": 1}
    assert table["runs"]["stateful"]["partial_windows"] == {"mae": pytest.approx(0.75), "n": 2}
    assert "windows of 3 events" in text
    assert "window   all 0.5333 (3), steps 1-2 0.7500 (2), steps 3+ 0.1000 (1)" in text
    assert "stateful all 0.6000 (3), steps 1-2 0.7500 (2), steps 3+ 0.3000 (1)" in text
    assert "same outputs up to step 3. From step 4 on" in text


def test_accuracy_without_targets_is_not_available():
    table = accuracy_by_step({"window": [_output(1, 1.0, None)]}, seq_len=2)

    assert table["runs"]["window"]["all"] == {"mae": None, "n": 0}
    assert "all n/a (0)" in format_accuracy_by_step(table)


@pytest.mark.parametrize(("seq_len", "expected"), [
    (1, "window   all 1.0000 (2), steps 1+ 1.0000 (2)\n  Both semantics give the same outputs up to step 1."),
    (2, "window   all 1.0000 (2), step 1 1.0000 (1), steps 2+ 1.0000 (1)\n  Step 1 has partial windows."),
])
def test_accuracy_labels_for_short_windows(seq_len, expected):
    table = accuracy_by_step({"window": [_output(1, 1.0, 2.0), _output(2, 1.0, 2.0)]}, seq_len=seq_len)

    assert expected in format_accuracy_by_step(table)


def test_summary_prints_accuracy_by_step():
    table = accuracy_by_step({"window": [_output(1, 1.0, 2.0)]}, seq_len=2)
    summary = {"records": 1, "entities": 1, "scored_records": 1, "metrics": {"mae": 1.0, "rmse": 1.0},
               "run": {"accuracy_by_step": table}}

    assert "MAE by semantics" in format_summary(summary)


def test_accuracy_by_step_counts_every_output():
    outputs = [{"entity": "a", "step": 1, "prediction": [1.0, 10.0], "target": [2.0, 14.0]},
               {"entity": "a", "step": 2, "prediction": [1.0, 10.0], "target": [1.0, 10.0]}]

    table = accuracy_by_step({"stateful": outputs}, seq_len=2)

    # (|1 - 2| + |10 - 14|) / 2 for the first event, 0 for the second: the same MAE as over all values.
    assert table["runs"]["stateful"]["all"] == {"mae": pytest.approx(1.25), "n": 2}
    assert table["runs"]["stateful"]["partial_windows"] == {"mae": pytest.approx(2.5), "n": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_scored_outputs_read_by_column_equal_the_records(tmp_path, suffix):
    from streamer.backtest.divergence import divergence
    from streamer.backtest.metrics import read_scored_outputs, to_scored_records
    from streamer.io.files import OutputWriter, read_outputs

    rows = [{"entity": "a", "ts": 1000 + i, "step": i + 1, "prediction": [0.5 * i, 2.0 - i],
             "model": "m", "source": {"file": "f.jsonl", "record": i}} for i in range(5)]
    rows[1]["ts"] = None
    rows[2]["target"] = [1.0, 2.0]
    rows[4]["target"] = [3, 4]
    path = tmp_path / f"out{suffix}"
    with OutputWriter(path) as writer:
        writer.write([orjson.dumps(row) for row in rows])

    by_column = read_scored_outputs(path)
    by_record = to_scored_records(read_outputs(path))

    np.testing.assert_array_equal(by_column.predictions, by_record.predictions)
    np.testing.assert_array_equal(by_column.targets, by_record.targets)
    for column in ("entity", "ts", "step"):
        assert by_column.frame[column].tolist() == by_record.frame[column].tolist()
    shifted = [{**row, "prediction": [value + 0.25 for value in row["prediction"]]} for row in rows]
    assert divergence(by_column, shifted).matched == 5
    assert divergence(by_column, shifted).join_key == "source"


def test_summary_counts_evictions(tmp_path):
    from streamer.backtest.runner import backtest_file
    from streamer.model import SeedNet

    torch.manual_seed(0)
    torch.save(SeedNet(2, 4, 3, 1, 1).state_dict(), tmp_path / "net.pt")
    lines = [orjson.dumps({"entity": f"e{i % 5}", "ts": i, "features": [0.1 * i, 1.0]}) for i in range(20)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    _, paths = backtest_file(tmp_path / "net.pt", tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_entities=3,
                             batch_size=2)
    summary = json.loads(paths.summary.read_text())

    assert summary["entities"] == 5
    assert summary["run"]["entities_in_state"] == 3
    assert summary["run"]["evictions"] > 0
    assert f"evictions {summary['run']['evictions']}" in format_summary(summary)
