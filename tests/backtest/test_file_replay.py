"""File backtests: the bad-input case, determinism, input and output formats."""

import base64
import json
import subprocess
import sys

import numpy as np
import orjson
import pytest
import torch

from streamer.backtest.file_replay import run_file_backtest
from streamer.engine import Engine
from streamer.errors import ConfigError
from streamer.io.events import EventDecoder, EventFormat
from streamer.io.files import read_outputs, read_records
from streamer.model import load_model
from tests.conftest import CASES_DIR


@pytest.fixture
def case(tmp_path):
    out = tmp_path / "case"
    subprocess.run([sys.executable, str(CASES_DIR / "make_bad_input_case.py"), str(out)], check=True)
    return out, json.loads((out / "expected.json").read_text())


@pytest.mark.parametrize("batch_size", [1, 4, 4096])
def test_bad_input_case_outcomes(case, tmp_path, batch_size):
    case_dir, expected = case
    result = run_file_backtest(load_model(case_dir / "net.pt"), case_dir / "events.jsonl", tmp_path / "out.jsonl",
                               batch_size=batch_size)
    outputs = {o["source"]["record"]: o for o in read_outputs(tmp_path / "out.jsonl")}
    dead = {d["source"]["record"]: d for d in map(orjson.loads, (tmp_path / "out.dead-letter.jsonl").read_bytes()
                                                  .splitlines())}
    for entry in expected:
        line = entry["line"]
        if entry["outcome"] == "output":
            assert line in outputs, f"line {line} has no output"
            assert np.abs(np.subtract(outputs[line]["prediction"], entry["prediction"])).max() < 1e-5
            assert outputs[line]["entity"] == entry["entity"]
        elif entry["outcome"] == "dead-letter":
            assert line in dead, f"line {line} was not dead-lettered"
            assert dead[line]["reason"] and dead[line]["message"]
        else:
            assert line not in outputs
            assert line not in dead
    assert result.outputs == sum(e["outcome"] == "output" for e in expected)
    assert result.dead_letters == sum(e["outcome"] == "dead-letter" for e in expected)


def test_bad_records_leave_state_untouched(case, tmp_path):
    case_dir, expected = case
    lines = (case_dir / "events.jsonl").read_bytes().split(b"\n")
    valid_only = tmp_path / "valid.jsonl"
    valid_only.write_bytes(b"\n".join(lines[e["line"]] for e in expected if e["outcome"] == "output") + b"\n")
    model = load_model(case_dir / "net.pt")
    states = []
    for path in (case_dir / "events.jsonl", valid_only):
        engine = Engine(model)
        decoder = EventDecoder(EventFormat(input_size=4))
        for chunk in read_records(path, 3):
            batch, _ = decoder.decode([None] * len(chunk.values), chunk.values, None, chunk.indices)
            engine.process(batch)
        slots = np.array([engine.arena.slot_of("a"), engine.arena.slot_of("b")])
        states.append((engine.arena.gather("h", slots), engine.arena.gather("c", slots),
                       engine.arena.steps[slots].tolist()))
    # Bad records change the batch composition, so the states are equal only within float rounding of the matmuls.
    assert torch.allclose(states[0][0], states[1][0], atol=1e-6)
    assert torch.allclose(states[0][1], states[1][1], atol=1e-6)
    assert states[0][2] == states[1][2]


def test_same_input_gives_identical_bytes(case, tmp_path):
    case_dir, _ = case
    model = load_model(case_dir / "net.pt")
    run_file_backtest(model, case_dir / "events.jsonl", tmp_path / "first.jsonl")
    run_file_backtest(load_model(case_dir / "net.pt"), case_dir / "events.jsonl", tmp_path / "second.jsonl")
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()
    assert (tmp_path / "first.dead-letter.jsonl").read_bytes() == (tmp_path / "second.dead-letter.jsonl").read_bytes()


def test_csv_and_parquet_inputs_match_jsonl(seed_net_factory, tmp_path):
    import pandas as pd

    _, path = seed_net_factory(input_dim=2)
    rng = np.random.default_rng(0)
    rows = [{"entity": f"e{i % 3}", "ts": 1000 + i, "f0": float(rng.normal()), "f1": float(rng.normal()),
             "target": float(i)} for i in range(30)]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.assign(features=[[r["f0"], r["f1"]] for r in rows]).drop(columns=["f0", "f1"]).to_parquet(
        tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(
        orjson.dumps({"entity": r["entity"], "ts": r["ts"], "features": [r["f0"], r["f1"]], "target": r["target"]})
        for r in rows))
    model = load_model(path)
    predictions = {}
    for suffix in ("jsonl", "csv", "parquet"):
        result = run_file_backtest(model, tmp_path / f"in.{suffix}", tmp_path / f"out-{suffix}.parquet")
        assert result.dead_letters == 0, suffix
        outputs = read_outputs(tmp_path / f"out-{suffix}.parquet")
        predictions[suffix] = np.array([o["prediction"] for o in outputs])
        assert [o["target"] for o in outputs] == [[float(i)] for i in range(30)]
    assert np.abs(predictions["jsonl"] - predictions["csv"]).max() < 1e-6
    assert np.abs(predictions["jsonl"] - predictions["parquet"]).max() < 1e-6


def test_cli_backtest_writes_report(case, tmp_path):
    case_dir, _ = case
    completed = subprocess.run([sys.executable, "-m", "streamer", "backtest", "--model", str(case_dir / "net.pt"),
                                "--input", str(case_dir / "events.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "dead letters" in completed.stdout
    assert (tmp_path / "o-report" / "report.html").is_file()


def test_cli_all_dead_letters_warns(case, tmp_path):
    case_dir, _ = case
    (tmp_path / "wide.jsonl").write_text("".join(f'{{"entity": "e{i}", "features": [1, 2, 3, 4, 5, 6, 7]}}\n'
                                                 for i in range(3)))
    completed = subprocess.run([sys.executable, "-m", "streamer", "backtest", "--model", str(case_dir / "net.pt"),
                                "--input", str(tmp_path / "wide.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                               capture_output=True, text=True)

    assert completed.returncode == 0, completed.stderr
    assert "warning: all 3 events are dead letters, 3 of them for feature_count" in completed.stderr


def test_cli_rejects_bidirectional_model(tmp_path):
    lstm = torch.nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    state_dict = {**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
                  "fc.weight": torch.zeros(1, 8), "fc.bias": torch.zeros(1)}
    torch.save(state_dict, tmp_path / "bi.pt")
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1, 2, 3]}\n')
    completed = subprocess.run([sys.executable, "-m", "streamer", "backtest", "--model", str(tmp_path / "bi.pt"),
                                "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert "bidirectional" in completed.stderr


def csv_backtest(seed_net_factory, tmp_path, text: str, encoding: str = "utf-8"):
    _, path = seed_net_factory(input_dim=2)
    (tmp_path / "in.csv").write_text(text, encoding=encoding)
    result = run_file_backtest(load_model(path), tmp_path / "in.csv", tmp_path / "out.jsonl")
    outputs = read_outputs(tmp_path / "out.jsonl")
    letters = [orjson.loads(line) for line in result.dead_letter_path.read_bytes().splitlines()]
    return outputs, letters


def test_csv_entity_ids_stay_text(seed_net_factory, tmp_path):
    outputs, letters = csv_backtest(seed_net_factory, tmp_path,
                                    "entity,f0,f1\n00123,1,2\n123,1,2\n00123,1,2\n1e3,1,2\nNaN,1,2\n")

    assert letters == []
    assert [(o["entity"], o["step"]) for o in outputs] == [("00123", 1), ("123", 1), ("00123", 2), ("1e3", 1),
                                                           ("NaN", 1)]


def test_csv_integers_beyond_float_precision_kept(seed_net_factory, tmp_path):
    outputs, letters = csv_backtest(seed_net_factory, tmp_path,
                                    "entity,ts,f0,f1\na,99999999999999999,1,2\na,1.5e3,1,2\na,1e3,1.5,2\n")

    assert letters == []
    assert [o["ts"] for o in outputs] == [99999999999999999, 1500, 1000]


def test_csv_byte_order_mark_skipped(seed_net_factory, tmp_path):
    outputs, letters = csv_backtest(seed_net_factory, tmp_path, "entity,f0,f1\na,1,2\nb,3,4\n", "utf-8-sig")

    assert letters == []
    assert [o["entity"] for o in outputs] == ["a", "b"]


def test_csv_rows_of_wrong_width_dead_lettered(seed_net_factory, tmp_path):
    outputs, letters = csv_backtest(seed_net_factory, tmp_path, "entity,f0,f1\na,1,2\nb,1\nc,1,2,9,9\nd,3,4\n")

    assert [o["entity"] for o in outputs] == ["a", "d"]
    assert [letter["reason"] for letter in letters] == ["invalid_csv_row", "invalid_csv_row"]
    assert "2 cells, the header has 3" in letters[0]["message"]
    assert "5 cells, the header has 3" in letters[1]["message"]


@pytest.mark.parametrize("output_name", ["in.jsonl", "sub/../in.jsonl", "out.jsonl"])
def test_output_on_input_file_rejected(case, tmp_path, output_name):
    case_dir, _ = case
    events = tmp_path / "in.jsonl"
    events.write_bytes((case_dir / "events.jsonl").read_bytes())
    (tmp_path / "sub").mkdir()
    if output_name == "out.jsonl":
        # The dead-letter file of out.jsonl is out.dead-letter.jsonl: make that the input instead.
        events = events.rename(tmp_path / "out.dead-letter.jsonl")
    before = events.read_bytes()

    with pytest.raises(ConfigError, match="is the input file"):
        run_file_backtest(load_model(case_dir / "net.pt"), events, tmp_path / output_name)

    assert events.read_bytes() == before


def test_parquet_binary_entities_and_nan_features(seed_net_factory, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, path = seed_net_factory(input_dim=2)
    pq.write_table(pa.table({"entity": pa.array([b"ok", b"ab\xff", b"c"], pa.binary()),
                             "features": [[1.0, 2.0], [1.0, 2.0], [float("nan"), 1.0]]}), tmp_path / "in.parquet")

    result = run_file_backtest(load_model(path), tmp_path / "in.parquet", tmp_path / "out.jsonl")

    assert [o["entity"] for o in read_outputs(tmp_path / "out.jsonl")] == ["ok"]
    letters = [orjson.loads(line) for line in result.dead_letter_path.read_bytes().splitlines()]
    assert [letter["reason"] for letter in letters] == ["invalid_utf8", "non_finite_feature"]


def test_csv_non_finite_cells_named_by_field(seed_net_factory, tmp_path):
    outputs, letters = csv_backtest(seed_net_factory, tmp_path,
                                    "entity,f0,f1,target,note\na,NaN,2,1,x\nb,1,inf,1,x\nc,1,2,NaN,x\n"
                                    "d,1,2,1,NaN\n")

    assert [o["entity"] for o in outputs] == ["d"]
    assert [letter["reason"] for letter in letters] == ["non_finite_feature", "non_finite_feature",
                                                        "invalid_target"]
    assert "Invalid feature nan" in letters[0]["message"]
    # The dead letter keeps the value that was in the file.
    assert b'"features": [NaN, 2]' in base64.b64decode(letters[0]["value_base64"])


def test_json_lines_byte_order_mark_skipped(seed_net_factory, tmp_path):
    _, path = seed_net_factory(input_dim=2)
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"entity": "a", "features": [1, 2]}\n')

    result = run_file_backtest(load_model(path), tmp_path / "in.jsonl", tmp_path / "out.jsonl")

    assert result.dead_letters == 0
    assert [o["entity"] for o in read_outputs(tmp_path / "out.jsonl")] == ["a"]


def test_parquet_numbered_feature_columns(seed_net_factory, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, path = seed_net_factory(input_dim=2)
    pq.write_table(pa.table({"entity": ["a", "b"], "f1": [2.0, 4.0], "f0": [1.0, 3.0]}), tmp_path / "cols.parquet")
    pq.write_table(pa.table({"entity": ["a", "b"], "features": [[1.0, 2.0], [3.0, 4.0]]}), tmp_path / "list.parquet")
    model = load_model(path)

    result = run_file_backtest(model, tmp_path / "cols.parquet", tmp_path / "cols.jsonl")
    run_file_backtest(model, tmp_path / "list.parquet", tmp_path / "list.jsonl")

    assert result.dead_letters == 0
    columns, lists = read_outputs(tmp_path / "cols.jsonl"), read_outputs(tmp_path / "list.jsonl")
    assert [o["prediction"] for o in columns] == [o["prediction"] for o in lists]
    assert len(columns) == 2


@pytest.mark.parametrize("failure", ["missing input", "unsupported input", "error part way"])
def test_failed_run_leaves_earlier_outputs(case, tmp_path, monkeypatch, failure):
    case_dir, _ = case
    model = load_model(case_dir / "net.pt")
    output = tmp_path / "out.jsonl"
    first = run_file_backtest(model, case_dir / "events.jsonl", output)
    outputs, letters = output.read_bytes(), first.dead_letter_path.read_bytes()
    assert outputs and letters

    if failure == "error part way":
        calls = []

        def process_then_fail(self, batch):
            calls.append(len(batch))
            if len(calls) > 1:
                raise RuntimeError("interrupted")
            return original(self, batch)

        original = Engine.process
        monkeypatch.setattr(Engine, "process", process_then_fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            run_file_backtest(model, case_dir / "events.jsonl", output, batch_size=2)
    else:
        other = tmp_path / ("typo.jsonl" if failure == "missing input" else "events.txt")
        if failure == "unsupported input":
            other.write_bytes(b"x")
        with pytest.raises(ConfigError):
            run_file_backtest(model, other, output)

    assert output.read_bytes() == outputs
    assert first.dead_letter_path.read_bytes() == letters
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")) == []


@pytest.mark.parametrize("text", ['[{"entity": "a", "features": [1, 2]}]\n',
                                  '[\n  {"entity": "a", "features": [1, 2]}\n]\n'])
def test_json_array_file_rejected(seed_net_factory, tmp_path, text):
    _, path = seed_net_factory(input_dim=2)
    (tmp_path / "in.json").write_text(text)

    with pytest.raises(ConfigError, match="contains a JSON array; streamer reads JSON Lines"):
        run_file_backtest(load_model(path), tmp_path / "in.json", tmp_path / "out.jsonl")


def test_array_record_dead_lettered(seed_net_factory, tmp_path):
    _, path = seed_net_factory(input_dim=2)
    (tmp_path / "in.jsonl").write_text('[1, 2]\n{"entity": "a", "features": [1, 2]}\n')

    result = run_file_backtest(load_model(path), tmp_path / "in.jsonl", tmp_path / "out.jsonl")

    assert result.dead_letter_reasons == {"not_an_object": 1}
    assert result.outputs == 1


def test_progress_total_of_each_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamer.backtest.file_replay import _total_events

    pq.write_table(pa.table({"entity": ["a", "b", "a"], "f0": [1.0, 2.0, 3.0]}), tmp_path / "in.parquet")
    (tmp_path / "in.json").write_text('{"entity": "a"}\n{"entity": "b"}\n')
    (tmp_path / "in.csv").write_text('entity,f0\na,1\n\n"b\nc",2\n')

    assert _total_events(tmp_path / "in.parquet", True) == 3
    assert _total_events(tmp_path / "in.json", True) == 2
    assert _total_events(tmp_path / "in.csv", True) == 2
    assert _total_events(tmp_path / "in.parquet", False) is None
