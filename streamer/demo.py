"""``streamer demo``: train on real data, backtest it, then serve it through a local Kafka broker.

Steps:
1. Train the seed LSTM on the World Bank fertility train split (or reuse the bundle from an earlier run).
2. File backtest of the held-out countries in stateful and window semantics, with the report and plots.
3. Start a local Apache Kafka broker and the streamer service, stream the held-out events into the input
   topic in time order (countries interleaved year by year), and read every output back.
4. Print events/s and latency percentiles taken from the service's /metrics, write the same kind of report
   from the service's outputs, and stop everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from pathlib import Path

import orjson
import typer

from streamer.backtest.report import format_summary, write_report
from streamer.backtest.runner import backtest_file
from streamer.config import load_settings
from streamer.data import load_fertility_events, write_events
from streamer.kafka.local_broker import LocalKafka
from streamer.kafka.service import StreamerService

logger = logging.getLogger(__name__)


def histogram_quantile(metrics_text: str, name: str, quantile: float) -> float | None:
    """Estimate a quantile from Prometheus histogram buckets by linear interpolation, as PromQL does."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return None


def run_demo(work_dir: Path, epochs: int = 30) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    bundle = work_dir / "fertility-lstm.pt"
    # Step 1
    if not bundle.exists():
        from streamer.train import train_bundle

        typer.echo("Training the seed LSTM on the fertility train split ...")
        trained = train_bundle(bundle, epochs=epochs)
        typer.echo(f"  holdout window MAE {trained.holdout.mae:.4f} (last-value baseline "
                   f"{trained.holdout.last_value_mae:.4f})")
    holdout = load_fertility_events("holdout")
    events_path = write_events(holdout, work_dir / "holdout.jsonl")
    # Step 2
    _, paths = backtest_file(bundle, events_path, work_dir / "backtest" / "outputs.jsonl", compare_window=True,
                             title="File backtest: fertility holdout (stateful vs window)")
    typer.echo("\nFile backtest (stateful, with a window run to compare)")
    typer.echo(format_summary(json.loads(paths.summary.read_text())))
    typer.echo(f"  report: {paths.html}")
    # Steps 3 and 4
    asyncio.run(_serve_through_kafka(bundle, holdout, work_dir))


async def _serve_through_kafka(bundle: Path, events: list[dict], work_dir: Path) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    broker = LocalKafka(work_dir / "kafka")
    typer.echo("\nStarting a local Apache Kafka broker ...")
    bootstrap = await asyncio.to_thread(broker.start, 120)
    service = None
    try:
        suffix = time.strftime("%Y%m%d%H%M%S")
        settings = load_settings(model=bundle, bootstrap_servers=bootstrap, input_topics=[f"fertility-events-{suffix}"],
                                 output_topic=f"fertility-predictions-{suffix}",
                                 dead_letter_topic=f"fertility-dead-letter-{suffix}", group_id=f"demo-{suffix}",
                                 metrics_port=0, topic_partitions=4)
        service = StreamerService(settings)
        task = asyncio.create_task(service.run())
        while not service.readiness()[0]:
            if task.done():
                await task
            await asyncio.sleep(0.1)
        typer.echo(f"Service ready (metrics on {service.metrics_server.url}); streaming {len(events)} events ...")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        consumer = AIOKafkaConsumer(settings.output_topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await producer.start()
        await consumer.start()
        started = time.perf_counter()
        try:
            for event in events:
                await producer.send(settings.input_topics[0], key=event["entity"].encode(), value=orjson.dumps(event))
            await producer.flush()
            outputs = []
            deadline = time.monotonic() + 120
            while len(outputs) < len(events) and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    outputs.extend(orjson.loads(record.value) for record in records)
            elapsed = time.perf_counter() - started
        finally:
            await producer.stop()
            await consumer.stop()
        with urllib.request.urlopen(f"{service.metrics_server.url}/metrics", timeout=5) as response:
            metrics_text = response.read().decode()
        _print_service_figures(outputs, len(events), elapsed, metrics_text)
        paths = write_report(outputs, work_dir / "service-report", title="Kafka service: fertility holdout",
                             extra_summary={"events": len(events), "dead_letters": 0, "elapsed_s": elapsed,
                                            "events_per_second": len(outputs) / elapsed})
        typer.echo(f"  report: {paths.html}")
        service.request_stop()
        await task
    finally:
        if service is not None:
            service.request_stop()
        await asyncio.to_thread(broker.stop)
        typer.echo("Broker stopped.")


def _print_service_figures(outputs: list[dict], expected: int, elapsed: float, metrics_text: str) -> None:
    name = "streamer_end_to_end_latency_seconds"
    percentiles = {q: histogram_quantile(metrics_text, name, q) for q in (0.5, 0.95, 0.99)}
    typer.echo("\nKafka service")
    typer.echo(f"  outputs {len(outputs)}/{expected} in {elapsed:.2f} s ({len(outputs) / elapsed:,.0f} events/s "
               "including producing the input)")
    typer.echo("  end-to-end latency from /metrics: " + ", ".join(
        f"p{int(q * 100)} {value * 1000:.1f} ms" if value is not None else f"p{int(q * 100)} n/a"
        for q, value in percentiles.items()))
    typer.echo(f"  (all {expected:,} events are sent at once, so each waits behind the ones before it. "
               "make bench-kafka measures paced loads.)")
