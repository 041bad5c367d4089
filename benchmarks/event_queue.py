"""Event queue (celery backend) against raw Celery, on Redis and on RabbitMQ, in one run (``make bench``).

For each broker: one worker (``celery -A nocluster.celery worker``, prefork, 2 processes) consumes a raw Celery
task and the event queue channel, with the same worker settings (late ack, prefetch 1, ...). N trivial messages
(``BENCH_QUEUE_MESSAGES``, default 10,000) go through each path, in two rounds of mirrored order:

- ``raw``: ``task.apply_async`` with nothing else;
- ``raw_limits``: the same with the soft/hard time limits the event queue sets for a 15 s timeout (the
  worker's main process pays for a timer per task with limits: that is the price of stopping work that
  ignores its timeout, not of the event queue);
- ``event_queue``: ``app.event_queue.publish``;
- ``eq_many``: ``app.event_queue.publish_many`` in batches of 100 (``BENCH_QUEUE_BATCH``).

Printed per broker and path: enqueue rate, throughput from the first enqueue to the last start,
enqueue-to-start p50, lost and duplicated (rates averaged over the rounds), then the event queue's ratios
against both raw paths (>= 0.9 is the target; 1.0 means as fast).

Needs Redis (``REDIS_URL``) and RabbitMQ (``AMQP_URL``); a broker that is down is reported and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where this "queue" would shadow the standard
# library's (which redis-py imports): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project (settings, nocluster)

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("BENCH_QUEUE_MESSAGES", "10000"))
KINDS = ("raw", "raw_limits", "event_queue", "eq_many")
BATCH = int(os.environ.get("BENCH_QUEUE_BATCH", "100"))
# Channels the worker consumes (one carries the messages, the others stay idle), to see what more queues cost.
CHANNELS = int(os.environ.get("BENCH_QUEUE_CHANNELS", "1"))
# Pool processes of the benchmark's worker.
PROCESSES = int(os.environ.get("BENCH_QUEUE_PROCESSES", "2"))
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
BROKERS = {"redis": REDIS_URL, "amqp": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")}
BROKERS = {name: url for name, url in BROKERS.items() if name in os.environ.get("BENCH_QUEUE_BROKERS", "redis,amqp")}


# --- the work, the same two ways (imported by the worker with ``-I benchmarks.event_queue``) -----------------------
# Each run records ``[index, start time]`` on one Redis list per path.
_client: Any = None


def client() -> Any:
    global _client
    if _client is None:
        import redis

        _client = redis.Redis.from_url(REDIS_URL)
    return _client


def done_key(kind: str) -> str:
    from nocluster import app

    return f"{app.name}:bench:{kind}"


def noop(payload: Any, context: Any) -> None:
    client().rpush(done_key(payload.get("kind", "event_queue")), json.dumps([payload["i"], time.time()]))


def raw_noop(i: int, kind: str = "raw") -> None:
    client().rpush(done_key(kind), json.dumps([i, time.time()]))


def register() -> Any:
    """Subscribe channel ``bench`` and register the raw task ``bench.raw_noop``; return the raw task."""
    from nocluster import app
    from nocluster.celery import app as celery_app

    app.event_queue.subscribe("bench", noop, concurrency=64)
    for extra in range(1, CHANNELS):  # idle channels the worker consumes too (BENCH_QUEUE_CHANNELS)
        app.event_queue.subscribe(f"idle{extra}", noop)
    return celery_app.task(name="bench.raw_noop", ignore_result=True)(raw_noop)


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


def child_env(name: str, broker_url: str) -> dict[str, str]:
    database = Path(tempfile.gettempdir()) / f"nocluster-bench-{name}.sqlite3"
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "settings",
        "DJANGO_ENV": "",
        "NOCLUSTER_NAME": name,
        "BROKER_URL": broker_url,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": f"sqlite:///{database}",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        "BENCH_QUEUE_ROLE": "worker",
    }


def start_worker(
    name: str, broker_url: str, env: dict[str, str] | None = None, include: str = "benchmarks.event_queue"
) -> subprocess.Popen[bytes]:
    log = Path(tempfile.gettempdir()) / f"nocluster-bench-{name}.log"
    command = [
        sys.executable, "-m", "celery", "-A", "nocluster.celery", "worker", "-P", "prefork", "-c", str(PROCESSES),
        "-n", f"bench-{name}@%h", "-I", include, "-Q", f"{name}.raw",
        "--without-gossip", "--without-mingle", "-l", "WARNING",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env or child_env(name, broker_url), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown of a worker started by :func:`start_worker`; kill -9 of its group after 30 s."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)


def measure(name: str, broker_url: str) -> dict[str, dict[str, float]]:
    """Run the publishing side in a child process (its own Django settings), return its figures."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.event_queue", "--publish", name],
        cwd=ROOT,
        env=child_env(name, broker_url),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the publishing side (runs with the project's settings for this broker) --------------------------------
def publish_and_wait() -> None:
    import django

    django.setup()
    from nocluster import app

    raw_task = register()
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    wait_for_worker()
    # Two rounds in mirrored order, so no path always runs first or last.
    for kind in (*KINDS, *reversed(KINDS)):
        client().delete(done_key(kind))
        started = time.time()
        if kind == "event_queue":
            sent = {i: (time.time(), app.event_queue.publish("bench", {"i": i}, timeout=15))[0] for i in range(N)}
        elif kind == "eq_many":
            sent = {}
            for start in range(0, N, BATCH):
                batch = [{"i": i, "kind": kind} for i in range(start, min(N, start + BATCH))]
                at = time.time()
                app.event_queue.publish_many("bench", batch, timeout=15)
                sent.update((payload["i"], at) for payload in batch)
        else:
            # raw_limits: the time limits the event queue sets for timeout=15 (soft 15 + grace, hard 15 + 2 grace)
            limits = {"soft_time_limit": 20, "time_limit": 25} if kind == "raw_limits" else {}
            queue = f"{app.name}.raw"
            sent = {i: (time.time(), raw_task.apply_async((i, kind), queue=queue, **limits))[0] for i in range(N)}
        enqueued = time.time()
        runs[kind].append(collect(kind, sent, started, enqueued))
    print(json.dumps({kind: combine(rows) for kind, rows in runs.items()}))


def combine(rows: list[dict[str, float]]) -> dict[str, float]:
    """Rates and latency: the mean of the rounds; lost and duplicated: the sum."""
    return {key: sum(row[key] for row in rows) / (1 if key in ("lost", "duplicated") else len(rows)) for key in rows[0]}


def wait_for_worker() -> None:
    from nocluster import app

    app.event_queue.publish("bench", {"i": -1}, timeout=15)
    deadline = time.time() + 120
    while not client().llen(done_key("event_queue")):
        if time.time() > deadline:
            raise RuntimeError("the benchmark worker never ran a message")
        time.sleep(0.2)


def collect(kind: str, sent: dict[int, float], started: float, enqueued: float) -> dict[str, float]:
    redis_client, key = client(), done_key(kind)
    idle_since, seen = time.time(), 0
    while seen < N and time.time() - idle_since < 30:
        time.sleep(0.2)
        count = redis_client.llen(key)
        if count != seen:
            seen, idle_since = count, time.time()
    runs = [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]
    runs = [(i, t) for i, t in runs if i >= 0]
    unique = {i for i, _ in runs}
    last = max((t for _, t in runs), default=started)
    latencies = sorted(t - sent[i] for i, t in runs if i in sent)
    redis_client.delete(key)
    return {
        "enqueue_per_s": N / (enqueued - started),
        "throughput_per_s": len(unique) / (last - started),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "lost": N - len(unique & set(sent)),
        "duplicated": len(runs) - len(unique),
    }


# --- the driver -------------------------------------------------------------------------------------------------
def report(broker: str, figures: dict[str, dict[str, float]]) -> None:
    print(
        f"\n{broker}: {N} trivial messages per path and round, 2 rounds, 1 worker x {PROCESSES} prefork processes, "
        f"{CHANNELS} channel(s) consumed"
    )
    print(f"  {'path':<12} {'enqueue/s':>10} {'done/s':>10} {'p50 ms':>10} {'lost':>6} {'dup':>6}")
    for kind, row in figures.items():
        print(
            f"  {kind:<12} {row['enqueue_per_s']:>10.0f} {row['throughput_per_s']:>10.0f} "
            f"{row['p50_ms']:>10.1f} {row['lost']:>6.0f} {row['duplicated']:>6.0f}"
        )
    for kind, baseline in itertools.product(("event_queue", "eq_many"), ("raw", "raw_limits")):
        ours, raw = figures[kind], figures[baseline]
        print(
            f"  {kind}/{baseline}: enqueue {ours['enqueue_per_s'] / raw['enqueue_per_s']:.2f}, "
            f"throughput {ours['throughput_per_s'] / raw['throughput_per_s']:.2f}, "
            f"p50 latency {ours['p50_ms'] / raw['p50_ms']:.2f} (lower is better)"
        )


def main() -> int:
    failed = False
    for broker, url in BROKERS.items():
        if not reachable(url):
            print(f"\n{broker}: not reachable at {url}, skipped")
            continue
        name = f"bench{uuid.uuid4().hex[:8]}"
        # The nodes' tables (outbox, node registry) exist, as after manage.py migrate on a real node.
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=child_env(name, url), check=True)
        worker = start_worker(name, url)
        try:
            figures = measure(name, url)
            report(broker, figures)
            failed |= any(row["lost"] for row in figures.values())
        finally:
            stop_worker(worker)
            cleanup(name, url)
    return 1 if failed else 0


def cleanup(name: str, url: str) -> None:
    """Delete the benchmark's queues (RabbitMQ keeps durable queues) and Redis keys; never a FLUSHDB."""
    import redis
    from kombu import Connection, Queue

    try:
        with Connection(url) as conn:
            idle = [f"idle{extra}" for extra in range(1, CHANNELS)]
            for queue in ("raw", "bench", "celery", *idle, *plugin_channels()):
                Queue(f"{name}.{queue}")(conn.default_channel).delete()
            if not url.startswith("redis"):
                for exchange in rabbitmq_exchanges(f"{name}."):
                    conn.default_channel.exchange_delete(exchange)
    except Exception as exc:
        print(f"  (queues of {name} not deleted: {exc})")
    redis_client = redis.Redis.from_url(REDIS_URL)
    for key in redis_client.scan_iter(match=f"{name}:*", count=500):
        redis_client.delete(key)
    # kombu's Redis transport lists expiring bindings in one shared sorted set: drop this project's members.
    members = [m for m, _ in redis_client.zscan_iter("_kombu.binding_deadlines", match=f"{name}.*", count=500)]
    if members:
        redis_client.zrem("_kombu.binding_deadlines", *members)


def rabbitmq_exchanges(prefix: str) -> list[str]:
    """The local RabbitMQ's exchanges whose name starts with ``prefix`` (durable ones outlive the run)."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_exchanges", "-q", "--no-table-headers", "name"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    return [exchange for exchange in listed.stdout.split() if exchange.startswith(prefix)]


def plugin_channels() -> list[str]:
    """The event-queue channels the project's plugins subscribe (its worker declares a queue for each)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    django.setup()  # loads the plugins, which only registers: no connection is opened
    from nocluster import app

    return app.event_queue.channels()


if __name__ != "__main__" and os.environ.get("BENCH_QUEUE_ROLE") == "worker":
    register()  # in the benchmark's worker: the channel and the raw task must exist there too

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--publish":
        publish_and_wait()
    else:
        sys.exit(main())
