"""Command-line help: every `run` flag names its environment variable and, where one exists, its default."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from streamer.cli import app
from streamer.config import Settings


def raw_help(*args: str, columns: int = 240) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=columns)
    assert result.exit_code == 0, result.output
    return result.output


def help_text(*args: str) -> str:
    """Help with runs of whitespace made one space, so that wrapping does not matter."""
    return re.sub(r"\s+", " ", raw_help(*args))


def test_run_help_shows_setting_defaults():
    text = help_text("run")

    assert "Output topic. (default: predictions; env: STREAMER_OUTPUT_TOPIC)" in text
    assert "(default: events; env: STREAMER_INPUT_TOPICS)" in text
    assert f"(default: {Settings().dead_letter_topic}; env: STREAMER_DEAD_LETTER_TOPIC)" in text
    assert "(default: stateful; env: STREAMER_SEMANTICS)" in text


def test_run_help_without_default():
    text = help_text("run")

    assert ("Model bundle, or a plain state_dict file (torch.save(net.state_dict(), path)). "
            "(env: STREAMER_MODEL)") in text
    assert "(default: None" not in text


def test_run_help_names_valueless_defaults():
    text = help_text("run")

    assert "are evicted. (default: no limit; env: STREAMER_MAX_ENTITIES)" in text
    assert "<group>-state-changelog. (default: off; env: STREAMER_CHANGELOG)" in text
    assert "in event time. (default: never; env: STREAMER_IDLE_EXPIRY_MS)" in text


def test_kafka_produce_help():
    text = help_text("kafka", "produce")

    assert "keyed by entity" in text
    assert "--partitions" in text


def test_run_help_fits_an_80_column_terminal():
    output = raw_help("run", columns=80)
    joined = re.sub(r"\s+", "", output)

    variables = set(re.findall(r"STREAMER_[A-Z_]+", raw_help("run")))

    assert max(map(len, output.splitlines())) <= 80
    assert "…" not in output
    assert len(variables) > 20
    for variable in variables:
        assert variable in joined
