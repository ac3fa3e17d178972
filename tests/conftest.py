"""Shared fixtures: model factories, the bad-input case files, and the real Kafka broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamer.model import SeedNet
from tests.kafka_fixtures import kafka_bootstrap, kafka_broker, topic_factory, unique_topic  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
# Generators of the input cases users send, each writing its files and the outcome every record must get.
CASES_DIR = REPO_ROOT / "tests" / "cases"


@pytest.fixture
def seed_net_factory(tmp_path: Path):
    """Return ``make(cell, input_dim, hidden_dim, layers, output_dim, seed) -> (net, path)`` saving a state_dict."""

    def make(cell: str = "lstm", input_dim: int = 4, hidden_dim: int = 16, layers: int = 2, output_dim: int = 1,
             seed: int = 0, seq_len: int = 5) -> tuple[SeedNet, Path]:
        torch.manual_seed(seed)
        net = SeedNet(input_dim, hidden_dim, seq_len, output_dim, layers, cell=cell).eval()
        path = tmp_path / f"{cell}-{input_dim}-{hidden_dim}-{layers}-{output_dim}-{seed}.pt"
        torch.save(net.state_dict(), path)
        return net, path

    return make
