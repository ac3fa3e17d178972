"""Per-event aiokafka consumer loops: the approaches a user writes without a streaming engine.

``--mode naive``: keep each entity's last 30 feature rows and, per event, run the seed ``SeedNet`` over them
from zero state at batch 1 (the call the model was trained with, streamer's ``window`` semantics with
``seq_len`` 30). ``--mode stateful``: keep each entity's ``(h, c)`` in a dict and advance it by one
``nn.LSTM`` step per event at batch 1 (streamer's ``stateful`` semantics).

Both consume one record at a time (``async for``) and hand each output to ``AIOKafkaProducer.send``. At
most once a second, after a record, they flush the producer and then commit the consumed offsets, so
outputs are acknowledged before their inputs are committed (at-least-once).
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import orjson
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from common import COMMIT_INTERVAL_S, WINDOW, argument_parser, configure_logging, load_net, step, zero_state


async def serve(mode: str, args) -> None:
    net = load_net(args.model)
    consumer = AIOKafkaConsumer(args.input_topic, bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap_servers, acks="all", enable_idempotence=True,
                                linger_ms=2)
    # SIGTERM cancels the loop wherever it waits; the finally block still flushes and commits.
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)

    windows: dict[bytes, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))
    states: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
    await producer.start()
    await consumer.start()
    last_commit = time.monotonic()
    try:
        with torch.inference_mode():
            async for message in consumer:
                features = orjson.loads(message.value)["features"]
                if mode == "naive":
                    window = windows[message.key]
                    window.append(features)
                    prediction = net(torch.tensor([list(window)], dtype=torch.float32))[0].tolist()
                else:
                    h, c = states.get(message.key) or zero_state()
                    prediction, h, c = step(net, features, h, c)
                    states[message.key] = (h, c)
                value = orjson.dumps({"entity": message.key.decode(), "prediction": prediction})
                await producer.send(args.output_topic, key=message.key, value=value)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    await producer.flush()
                    await consumer.commit()
                    last_commit = time.monotonic()
    except asyncio.CancelledError:
        pass
    finally:
        await producer.flush()
        await consumer.commit()
        await consumer.stop()
        await producer.stop()


def main() -> None:
    configure_logging()
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("naive", "stateful"), required=True,
                        help="naive: window of 30 from zero state per event; stateful: carry (h, c) per entity")
    args = parser.parse_args()
    asyncio.run(serve(args.mode, args))


if __name__ == "__main__":
    main()
