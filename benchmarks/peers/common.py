"""Command line, model and output encoding shared by the peer implementations of benchmarks/compare.py.

Every peer runs the same job. It reads events ``{"features": [8 numbers], ...}`` keyed by entity from the
input topic and writes one record ``{"entity": key, "prediction": [...]}`` per event, keyed by the same
entity, to the output topic. Every peer loads the same ``state_dict`` into the seed ``SeedNet`` and runs it with one
torch thread. Peers run until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging

import torch

from streamer.model import SeedNet

INPUT, HIDDEN, LAYERS, OUTPUT, WINDOW = 8, 64, 2, 1, 30
# Seconds between offset commits in the aiokafka loops, as the service's default checkpoint interval.
COMMIT_INTERVAL_S = 1.0


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap address, host:port")
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True, help="consumer group (and application id)")
    parser.add_argument("--model", required=True, help="state_dict file of SeedNet(8, 64, 30, 1, 2)")
    parser.add_argument("--state-dir", help="directory for the library's local state (Quix Streams, faust)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the input topic")
    return parser


def load_net(path: str) -> SeedNet:
    """Load the seed LSTM for inference on one torch thread."""
    torch.set_num_threads(1)
    net = SeedNet(INPUT, HIDDEN, WINDOW, OUTPUT, LAYERS)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def zero_state() -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(h, c)`` of one entity, each of shape (layers, 1, hidden)."""
    return torch.zeros(LAYERS, 1, HIDDEN), torch.zeros(LAYERS, 1, HIDDEN)


def step(net: SeedNet, features: list[float], h: torch.Tensor, c: torch.Tensor
         ) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Advance one entity by one event at batch 1 and return its prediction and new ``(h, c)``."""
    x = torch.tensor(features, dtype=torch.float32).view(1, 1, INPUT)
    output, (h, c) = net.lstm(x, (h, c))
    return net.fc(output[:, -1])[0].tolist(), h, c


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
