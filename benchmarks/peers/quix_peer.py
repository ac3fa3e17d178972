"""The seed LSTM served with Quix Streams: ``sdf.apply(..., stateful=True)`` keeps each entity's ``(h, c)``.

It uses the public API of Quix Streams 3.x with default settings: at-least-once, RocksDB state backed by
changelog topics, and a commit every 5 s. The input topic is JSON keyed by entity. A per-message function
reads the state, advances one ``nn.LSTM`` step at batch 1 and stores the new state as lists of floats,
and ``to_topic`` writes the output. ``app.run()`` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import torch
from quixstreams import Application

from common import HIDDEN, LAYERS, argument_parser, configure_logging, load_net, step, zero_state


def main() -> None:
    configure_logging()
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    net = load_net(args.model)
    app = Application(broker_address=args.bootstrap_servers, consumer_group=args.group_id,
                      auto_offset_reset="earliest", state_dir=args.state_dir, loglevel="WARNING")
    events = app.topic(args.input_topic, key_deserializer="str", value_deserializer="json")
    predictions = app.topic(args.output_topic, key_serializer="str", value_serializer="json")

    @torch.inference_mode()
    def predict(value: dict, key: str, timestamp: int, headers, state) -> dict:
        stored = state.get("hc")
        if stored is None:
            h, c = zero_state()
        else:
            h = torch.tensor(stored[0], dtype=torch.float32).view(LAYERS, 1, HIDDEN)
            c = torch.tensor(stored[1], dtype=torch.float32).view(LAYERS, 1, HIDDEN)
        prediction, h, c = step(net, value["features"], h, c)
        state.set("hc", [h.flatten().tolist(), c.flatten().tolist()])
        return {"entity": key, "prediction": prediction}

    sdf = app.dataframe(events)
    sdf = sdf.apply(predict, stateful=True, metadata=True)
    sdf.to_topic(predictions)
    app.run()


if __name__ == "__main__":
    main()
