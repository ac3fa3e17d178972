"""User mistakes give one `error:` line and an exit code instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from streamer.config import load_settings
from streamer.errors import ConfigError
from streamer.io.files import read_records
from streamer.model import SeedNet
from streamer.model.network import resolve_device


def streamer(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_settings_file_syntax_error(tmp_path):
    (tmp_path / "bad.toml").write_text("model = \n")

    with pytest.raises(ConfigError, match="Invalid settings file"):
        load_settings(tmp_path / "bad.toml")


def test_settings_file_keys_with_hyphens(tmp_path):
    (tmp_path / "service.toml").write_text('output-topic = "out"\ngroup_id = "g"\n')

    settings = load_settings(tmp_path / "service.toml")

    assert settings.output_topic == "out"
    assert settings.group_id == "g"


@pytest.mark.parametrize("overrides,message", [
    ({"group_id": ""}, ("group_id (--group-id", "expected a non-empty group id")),
    ({"group_id": "  "}, ("group_id (--group-id", "expected a non-empty group id")),
    ({"input_topics": "a,b,a"}, ("input_topics (--input-topics", "topic a given more than once")),
])
def test_invalid_group_id_and_topics_rejected(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(**overrides)

    for part in message:
        assert part in str(raised.value)


def test_settings_file_unknown_key(tmp_path):
    (tmp_path / "service.toml").write_text('output_topik = "out"\n')

    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path / "service.toml")

    assert "unknown setting 'output_topik'" in str(raised.value)
    assert "STREAMER_" not in str(raised.value)


def test_settings_file_key_in_both_spellings(tmp_path):
    (tmp_path / "service.toml").write_text('output_topic = "a"\noutput-topic = "b"\n')

    with pytest.raises(ConfigError, match="output_topic is set twice"):
        load_settings(tmp_path / "service.toml")


def test_settings_file_wrong_type_names_flag_and_file(tmp_path):
    (tmp_path / "service.toml").write_text('metrics_port = "abc"\n')

    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path / "service.toml")

    assert "metrics_port (--metrics-port, STREAMER_METRICS_PORT or the settings file)" in str(raised.value)


def test_unknown_log_level(monkeypatch):
    monkeypatch.setenv("STREAMER_LOG_LEVEL", "LOUD")

    with pytest.raises(ConfigError, match="unknown level 'LOUD'"):
        load_settings()


def test_log_level_any_case(monkeypatch):
    monkeypatch.setenv("STREAMER_LOG_LEVEL", "debug")

    assert load_settings().log_level == "DEBUG"


def test_invalid_and_missing_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(ConfigError, match="Invalid device 'quantum'"):
        resolve_device("quantum")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_file_that_is_not_parquet(tmp_path):
    (tmp_path / "in.parquet").write_text("text")

    with pytest.raises(ConfigError, match="Cannot read Parquet file"):
        list(read_records(tmp_path / "in.parquet"))


@pytest.mark.parametrize("output,report_dir,message", [
    ("afile/out.jsonl", None, "Cannot create the report directory {tmp}/afile/out-report"),
    ("adir.jsonl", None, "Cannot write {tmp}/adir.jsonl: it is a directory"),
    ("out.jsonl", "afile", "Cannot create the report directory {tmp}/afile (--report-dir"),
])
def test_unwritable_output_is_one_error_line(tmp_path, output, report_dir, message):
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.jsonl").mkdir()
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    options = [] if report_dir is None else ["--report-dir", str(tmp_path / report_dir)]

    completed = streamer("backtest", "--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.jsonl"),
                         "--output", str(tmp_path / output), *options)

    assert completed.returncode == 2
    assert completed.stderr.startswith("error: " + message.format(tmp=tmp_path))
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert not list(tmp_path.glob("*-report"))


def test_rejected_backtest_leaves_no_report_dir(tmp_path):
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")

    completed = streamer("backtest", "--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "missing.jsonl"),
                         "--output", str(tmp_path / "runs" / "first" / "out.jsonl"))

    assert completed.returncode == 2
    assert "missing.jsonl" in completed.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["kafka", "produce", "EVENTS", "--topic", "t"],
                                     ["backtest", "--model", "NET", "--topic", "t", "--output", "OUT"],
                                     ["kafka", "consume", "t", "--timeout-ms", "100"]])
def test_unreachable_broker_exits_with_one(tmp_path, command):
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    paths = {"EVENTS": str(tmp_path / "in.jsonl"), "NET": str(tmp_path / "net.pt"),
             "OUT": str(tmp_path / "out.jsonl")}

    completed = streamer(*[paths.get(part, part) for part in command], "--bootstrap-servers", "127.0.0.1:1")

    assert completed.returncode == 1, completed.stderr
    assert "127.0.0.1:1" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_generate_rejects_zero_zipf_exponent(tmp_path):
    completed = streamer("generate", "--output", str(tmp_path / "g.jsonl"), "--events", "10", "--zipf", "0")

    assert completed.returncode == 2
    assert "Invalid --zipf 0.0: expected a finite number > 0" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_generate_flag_errors_and_start_ts(tmp_path):
    completed = streamer("generate", "--output", str(tmp_path / "g.csv"), "--events", "10")
    assert completed.returncode == 2
    assert "Unsupported --output" in completed.stderr

    completed = streamer("generate", "--output", str(tmp_path / "g.jsonl"), "--events", "3", "--start-ts", "1000")
    assert completed.returncode == 0, completed.stderr
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(line)["ts"] for line in lines] == [1000, 1001, 1002]


def test_compare_window_needs_stateful_semantics(tmp_path):
    completed = streamer("backtest", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in.jsonl"),
                         "--output", str(tmp_path / "out.jsonl"), "--semantics", "window", "--compare-window")
    assert completed.returncode == 2
    assert "--compare-window compares stateful outputs with window ones" in completed.stderr


def test_train_creates_the_output_directory(tmp_path):
    completed = streamer("train", "--epochs", "1", "--hidden-size", "4", "--layers", "1", cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "out" / "fertility-lstm.pt").is_file()


def test_file_backtest_rejects_topic_options(tmp_path):
    from typer.testing import CliRunner

    from streamer.cli import app

    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')
    arguments = ["backtest", "--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")]

    result = CliRunner().invoke(app, [*arguments, "--from", "0:5", "--initial-state", "changelog:g"])

    assert isinstance(result.exception, ConfigError)
    assert "Invalid --from, --initial-state for a file backtest" in str(result.exception)
    assert not (tmp_path / "out.jsonl").exists()


def test_compare_window_without_seq_len_fails_first(tmp_path):
    from streamer.backtest.runner import backtest_file

    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')

    with pytest.raises(ConfigError, match="--compare-window needs seq_len"):
        backtest_file(tmp_path / "net.pt", tmp_path / "in.jsonl", tmp_path / "out.jsonl", compare_window=True)

    assert not (tmp_path / "out.jsonl").exists()


def test_kafka_status_names_the_data_directory(tmp_path):
    from typer.testing import CliRunner

    from streamer.cli import app

    result = CliRunner().invoke(app, ["kafka", "status", "--data-dir", str(tmp_path)])
    stopped = CliRunner().invoke(app, ["kafka", "stop", "--data-dir", str(tmp_path)])

    assert result.exit_code == 3
    assert f"not running (no broker started with {tmp_path})" in result.output
    assert stopped.exit_code == 0
    assert f"not running (no broker started with {tmp_path})" in stopped.output


def test_unused_seq_len_is_reported(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    common = ["backtest", "--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.jsonl"),
              "--output", str(tmp_path / "out.jsonl"), "--seq-len", "5"]

    unused = streamer(*common)
    used = streamer(*common, "--semantics", "window")

    assert unused.returncode == 0, unused.stderr
    assert "--seq-len 5 has no effect" in unused.stderr
    assert used.returncode == 0, used.stderr
    assert "has no effect" not in used.stderr


def test_seq_len_other_than_bundle_is_reported(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"entity": "a", "features": [1.0, 2.0]}\n')
    model = tmp_path / "net.pt"
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), model)
    subprocess.run([sys.executable, "-m", "streamer", "bundle", "--model", str(model), "--output",
                    str(tmp_path / "net.bundle.pt"), "--seq-len", "8"], check=True, capture_output=True, timeout=120)
    common = ["backtest", "--model", str(tmp_path / "net.bundle.pt"), "--input", str(tmp_path / "in.jsonl"),
              "--semantics", "window"]

    other = streamer(*common, "--output", str(tmp_path / "other.jsonl"), "--seq-len", "30")
    same = streamer(*common, "--output", str(tmp_path / "same.jsonl"), "--seq-len", "8")

    assert other.returncode == 0, other.stderr
    assert "Window length 30 (--seq-len) replaces the seq_len 8 of the bundle" in other.stderr
    assert same.returncode == 0, same.stderr
    assert "replaces" not in same.stderr


def test_run_with_metrics_port_in_use_exits_2(tmp_path):
    import socket

    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), tmp_path / "net.pt")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        completed = streamer("run", "--model", str(tmp_path / "net.pt"), "--metrics-port", str(port),
                             "--bootstrap-servers", "127.0.0.1:9")

    assert completed.returncode == 2, completed.stderr
    assert "choose another --metrics-port" in completed.stderr


def test_misspelled_variable_named_with_the_likely_setting():
    from streamer.config import unknown_variables

    problems = unknown_variables({"STREAMER_OUTPUT_TOPCI": "x", "STREAMER_OUTPUT_TOPIC": "y",
                                  "STREAMER_KAFKA_DATA": "d", "HOME": "/root", "STREAMER_NOTHING_LIKE_IT": "z"})

    assert problems == ["STREAMER_NOTHING_LIKE_IT is not a setting and is ignored",
                        "STREAMER_OUTPUT_TOPCI is not a setting and is ignored; did you mean STREAMER_OUTPUT_TOPIC?"]


def test_flag_wins_over_variable_and_variable_over_file(tmp_path, monkeypatch):
    (tmp_path / "service.toml").write_text('output_topic = "from-file"\ngroup_id = "group-from-file"\n'
                                           'dead_letter_topic = "letters-from-file"\n')
    monkeypatch.setenv("STREAMER_OUTPUT_TOPIC", "from-variable")
    monkeypatch.setenv("STREAMER_GROUP_ID", "group-from-variable")

    settings = load_settings(tmp_path / "service.toml", output_topic="from-flag")

    assert settings.output_topic == "from-flag"
    assert settings.group_id == "group-from-variable"
    assert settings.dead_letter_topic == "letters-from-file"
