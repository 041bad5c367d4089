"""Pub/sub benchmark: ``app.pub_sub_manager`` on kombu beside raw kombu, on Redis and RabbitMQ (``make bench``).

One publisher (this process) and four subscriber processes; 10,000 messages published as fast as possible on
one fanout exchange. Measured per run: publish rate (messages/s, publisher side), end-to-end latency p50/p99
(publish call to the subscriber's callback, same host clock), lost and duplicated deliveries (over the four
subscribers). Raw kombu uses the same exchange type, serializer (JSON), transient delivery and, on RabbitMQ, the
same publisher confirms, queue arguments, prefetch and batched acknowledgements, so the ratio shows what nocluster's
envelope, checks and dispatch cost.

Each mode runs three times, interleaved (raw, nocluster, raw, ...); each figure is the median of its runs (lost and
duplicated: the worst run), since a shared 2-core machine is noisy.

    .venv/bin/python benchmarks/pubsub.py [--messages 10000] [--subscribers 4] [--brokers redis,amqp]

URLs: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and ``AMQP_URL``
(default ``amqp://guest:guest@127.0.0.1:5672//``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Scripts here are named after what they measure (queue.py, ...); keep them from shadowing the standard library.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() != HERE]

URLS = {
    "redis": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "amqp": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
CHANNEL = "bench"


def configure_django() -> None:
    from django.conf import settings

    if not settings.configured:
        settings.configure(NOCLUSTER={})


def nocluster_app(name: str, url: str) -> Any:
    configure_django()
    from nocluster import Application

    backend = "nocluster.pubsub.backends.kombu.KombuPubSubBackend"
    return Application({"NAME": name, "PUBSUB": {"BACKEND": backend, "OPTIONS": {"url": url}}})


def raw_connection(url: str) -> Any:
    from kombu import Connection

    options = {} if url.startswith("redis") else {"confirm_publish": True}
    return Connection(url, transport_options=options)


# The raw baseline does on RabbitMQ what the project does (NOCLUSTER_PUBSUB_DURABLE, default on): durable exchange and
# queue, persistent messages; or all transient.
DURABLE = os.environ.get("NOCLUSTER_PUBSUB_DURABLE", "true").strip().lower() in ("1", "true", "yes", "on")
DELIVERY_MODE = 2 if DURABLE else 1


def raw_exchange(name: str) -> Any:
    from kombu import Exchange

    return Exchange(f"{name}.{CHANNEL}", type="fanout", durable=DURABLE, auto_delete=False, delivery_mode=DELIVERY_MODE)


# --- subscriber process ---------------------------------------------------------------------------------
def subscriber(mode: str, url: str, name: str, count: int) -> None:
    latencies: list[float] = []
    seen: dict[int, int] = {}
    done = threading.Event()
    last = [time.monotonic()]

    def on_message(message: dict[str, Any]) -> None:
        latencies.append(time.time() - message["t"])
        seen[message["n"]] = seen.get(message["n"], 0) + 1
        last[0] = time.monotonic()
        if len(seen) >= count:
            done.set()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    if mode == "nocluster":
        app = nocluster_app(name, url)
        app.pub_sub_manager.subscribe(CHANNEL, on_message)
        app.pub_sub_manager.start()
        print("ready", flush=True)
        wait_done(done, last)
        app.pub_sub_manager.stop()
    else:
        raw_subscriber(url, name, on_message, done, last)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    result = {"latencies": latencies, "unique": len(seen), "received": sum(seen.values()), "cpu": cpu}
    print(json.dumps(result), flush=True)


def raw_subscriber(url: str, name: str, on_message: Any, done: threading.Event, last: list[float]) -> None:
    """Plain kombu with the delivery settings nocluster uses: on RabbitMQ the same queue arguments, prefetch and
    batched acknowledgements; on Redis no acknowledgements (fanout is PUBLISH/PSUBSCRIBE)."""
    from kombu import Consumer, Queue

    is_redis = url.startswith("redis")
    unacked: list[Any] = []

    def callback(body: Any, message: Any) -> None:
        on_message(body)
        if not is_redis:
            unacked[:] = [message]
            if message.delivery_tag % 100 == 0:
                message.ack(multiple=True)
                unacked.clear()

    arguments = {} if is_redis else {"max_length": 100_000}
    queue = Queue(f"{name}.raw.{uuid.uuid4().hex}", exchange=raw_exchange(name), routing_key="",
                  durable=DURABLE and not is_redis, auto_delete=True, expires=60, **arguments)  # fmt: skip
    with raw_connection(url) as conn, Consumer(conn, queues=[queue], callbacks=[callback], accept=["json"],
                                               no_ack=is_redis, prefetch_count=None if is_redis else 1000):  # fmt: skip
        print("ready", flush=True)
        while not done.is_set() and time.monotonic() - last[0] < 10:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                if unacked:
                    unacked.pop().ack(multiple=True)


def wait_done(done: threading.Event, last: list[float]) -> None:
    while not done.wait(0.5):
        if time.monotonic() - last[0] > 10:
            return


# --- publisher and one run --------------------------------------------------------------------------------
def run(mode: str, broker: str, count: int, subscribers: int) -> dict[str, float]:
    url = URLS[broker]
    name = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--subscriber", mode, url, name, str(count)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(subscribers)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # let every subscription settle on the broker
    if mode == "nocluster":
        app = nocluster_app(name, url)
        publish = lambda n: app.pub_sub_manager.publish(CHANNEL, {"n": n, "t": time.time()})  # noqa: E731
        publish(-1)
        closer = lambda: app.pub_sub_manager.stop()  # noqa: E731
    else:
        from kombu import Producer

        conn = raw_connection(url)
        producer, exchange = Producer(conn), raw_exchange(name)
        publish = lambda n: producer.publish(  # noqa: E731
            {"n": n, "t": time.time()}, exchange=exchange, routing_key="", serializer="json", declare=[exchange],
            delivery_mode=DELIVERY_MODE, retry=True,
        )  # fmt: skip
        publish(-1)
        closer = conn.release
    started = time.perf_counter()
    for n in range(count - 1):
        publish(n)
    elapsed = time.perf_counter() - started
    closer()
    latencies: list[float] = []
    unique = received = 0
    cpu = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        latencies += result["latencies"]
        unique += result["unique"]
        received += result["received"]
        cpu += result["cpu"]
    delete_exchange(url, raw_exchange(name).name)
    latencies.sort()
    return {
        "rate": (count - 1) / elapsed,
        "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        "lost": count * subscribers - unique,
        "duplicated": received - unique,
        "cpu_us": cpu / max(received, 1) * 1e6,
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs (lost and duplicated: the worst run)."""
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    merged["lost"] = max(run["lost"] for run in runs)
    merged["duplicated"] = max(run["duplicated"] for run in runs)
    return merged


def delete_exchange(url: str, exchange: str) -> None:
    """The run's exchange (durable on RabbitMQ: it would outlive the run); on Redis, the run's members of kombu's
    shared sorted set of expiring bindings."""
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        prefix = exchange.split(".", 1)[0]
        members = [m for m, _ in client.zscan_iter("_kombu.binding_deadlines", match=f"{prefix}.*", count=500)]
        if members:
            client.zrem("_kombu.binding_deadlines", *members)
        return
    with raw_connection(url) as conn:
        conn.default_channel.exchange_delete(exchange)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode, interleaved; medians are shown")
    parser.add_argument("--subscriber", nargs=4, metavar=("MODE", "URL", "NAME", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        mode, url, name, count = args.subscriber
        subscriber(mode, url, name, int(count))
        return 0
    print(f"pub/sub: 1 publisher, {args.subscribers} subscriber processes, {args.messages} messages per run")
    header = (
        f"{'broker':<6} {'mode':<10} {'publish/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} {'dup':>5} "
        f"{'sub CPU µs/msg':>15}"
    )
    print(header)
    failed = False
    for broker in args.brokers.split(","):
        runs: dict[str, list[dict[str, float]]] = {"raw": [], "nocluster": []}
        for _ in range(args.repeat):
            for mode in ("raw", "nocluster"):
                runs[mode].append(run(mode, broker, args.messages, args.subscribers))
        best = {mode: median_run(results) for mode, results in runs.items()}
        for mode, result in best.items():
            print(f"{broker:<6} {mode:<10} {result['rate']:>10.0f} {result['p50']:>8.2f} {result['p99']:>8.2f} "
                  f"{result['lost']:>6.0f} {result['duplicated']:>5.0f} {result['cpu_us']:>15.0f}")  # fmt: skip
        raw, ours = best["raw"], best["nocluster"]
        rate_ratio, p50_ratio = ours["rate"] / raw["rate"], raw["p50"] / ours["p50"]
        print(
            f"{broker:<6} ratio      publish rate {rate_ratio:.2f}, p50 latency {p50_ratio:.2f} (raw/ours), "
            f"p99 latency {raw['p99'] / ours['p99']:.2f} (target >= 0.9 on rate and p50; lost must be 0)"
        )
        failed = failed or ours["lost"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
