"""Settings the service rejects before it contacts a broker."""

from __future__ import annotations

import pytest
import torch

from streamer.config import Settings
from streamer.errors import ConfigError
from streamer.kafka.service import StreamerService
from streamer.model import SeedNet


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(SeedNet(2, 4, 5, 1, 1).state_dict(), path)
    return path


@pytest.mark.parametrize("overrides,message", [
    ({"output_topic": "events"}, "must differ from the input topics"),
    ({"dead_letter_topic": "predictions"}, "must differ from the output topic predictions"),
    ({"input_topics": []}, "No input topics"),
])
def test_conflicting_topics_rejected(model_path, overrides, message):
    settings = Settings(model=model_path, metrics_port=0, **overrides)

    with pytest.raises(ConfigError, match=message):
        StreamerService(settings)


def test_snapshot_dir_that_is_a_file_rejected(model_path, tmp_path):
    settings = Settings(model=model_path, metrics_port=0, changelog=True, snapshot_dir=model_path)

    with pytest.raises(ConfigError, match="is a file"):
        StreamerService(settings)


def test_valid_settings_accepted(model_path, tmp_path):
    service = StreamerService(Settings(model=model_path, metrics_port=0, changelog=True,
                                       snapshot_dir=tmp_path / "snapshots"))

    assert service.model.manifest.input_size == 2


def test_snapshot_dir_without_changelog_rejected(model_path, tmp_path):
    settings = Settings(model=model_path, metrics_port=0, snapshot_dir=tmp_path / "snapshots")

    with pytest.raises(ConfigError, match="--snapshot-dir needs --changelog"):
        StreamerService(settings)


def test_exactly_once_without_instance_id_warns(model_path, caplog):
    with caplog.at_level("WARNING", logger="streamer.kafka.service"):
        StreamerService(Settings(model=model_path, metrics_port=0, guarantee="exactly-once"))

    assert "cannot fence its predecessor" in caplog.text


def test_exactly_once_without_changelog_warns(model_path, caplog):
    with caplog.at_level("WARNING", logger="streamer.kafka.service"):
        StreamerService(Settings(model=model_path, metrics_port=0, guarantee="exactly-once",
                                 group_instance_id="member-0"))

    assert "Exactly-once without --changelog" in caplog.text


def test_exactly_once_with_changelog_and_instance_id_quiet(model_path, caplog):
    with caplog.at_level("WARNING", logger="streamer.kafka.service"):
        StreamerService(Settings(model=model_path, metrics_port=0, guarantee="exactly-once", changelog=True,
                                 group_instance_id="member-0"))

    assert caplog.text == ""
