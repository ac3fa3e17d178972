"""The seed LSTM served with faust-streaming: an agent over the input topic and a Table of ``(h, c)``.

It uses the public API of faust-streaming with default settings (at-least-once, the ``memory://`` store).
A ``Table`` keyed by entity contains ``(h, c)`` as lists of floats and is backed by its changelog topic.
An agent iterates ``stream.items()``, advances one ``nn.LSTM`` step at batch 1 per event and sends the
output with ``topic.send``. The table has as many partitions as the input topic, because faust requires
co-partitioning. The worker stops cleanly on SIGTERM.
"""

from __future__ import annotations

import sys

import faust
import torch

from common import HIDDEN, LAYERS, argument_parser, configure_logging, load_net, step, zero_state


def build_app(args) -> faust.App:
    net = load_net(args.model)
    app = faust.App(args.group_id, broker=f"kafka://{args.bootstrap_servers}", datadir=args.state_dir,
                    topic_partitions=args.partitions, topic_replication_factor=1, web_enabled=False)
    events = app.topic(args.input_topic, key_serializer="raw", value_serializer="json")
    predictions = app.topic(args.output_topic, key_serializer="raw", value_serializer="json")
    states = app.Table("lstm-state", partitions=args.partitions)

    @app.agent(events)
    async def predict(stream):
        async for key, value in stream.items():
            entity = key.decode()
            stored = states.get(entity)
            if stored is None:
                h, c = zero_state()
            else:
                h = torch.tensor(stored[0], dtype=torch.float32).view(LAYERS, 1, HIDDEN)
                c = torch.tensor(stored[1], dtype=torch.float32).view(LAYERS, 1, HIDDEN)
            with torch.inference_mode():
                prediction, h, c = step(net, value["features"], h, c)
            states[entity] = [h.flatten().tolist(), c.flatten().tolist()]
            await predictions.send(key=key, value={"entity": entity, "prediction": prediction})

    return app


def main() -> None:
    configure_logging()
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    app = build_app(args)
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
