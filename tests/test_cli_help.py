"""Command-line help: every `run` flag names its environment variable and, where one exists, its default."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from streamer.cli import app
from streamer.config import Settings


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│]+", " ", result.output)


def test_run_help_shows_setting_defaults():
    text = help_text("run")

    assert "Output topic. (default: predictions; env: STREAMER_OUTPUT_TOPIC)" in text
    assert "(default: events; env: STREAMER_INPUT_TOPICS)" in text
    assert f"(default: {Settings().dead_letter_topic}; env: STREAMER_DEAD_LETTER_TOPIC)" in text
    assert "(default: stateful; env: STREAMER_SEMANTICS)" in text


def test_run_help_without_default():
    text = help_text("run")

    assert "Model bundle or plain seed state_dict file. (env: STREAMER_MODEL)" in text
    assert "(default: None" not in text


def test_kafka_produce_help():
    text = help_text("kafka", "produce")

    assert "keyed by entity" in text
    assert "--partitions" in text
