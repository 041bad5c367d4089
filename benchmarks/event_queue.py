"""Event queue (celery backend) against raw Celery, on Redis and on RabbitMQ, in one run (``make bench``).

For each broker: one worker (``celery -A nocluster.celery worker``, prefork, 2 processes) consumes a raw Celery
task and the event queue channel, with the same worker settings (late ack, prefetch 2, ...). N trivial messages
(``BENCH_QUEUE_MESSAGES``, default 10,000) go through each path, in two rounds of mirrored order:

- ``raw``: ``task.apply_async`` with nothing else;
- ``raw_limits``: the same with the soft/hard time limits the event queue sets for a 15 s timeout (the
  worker's main process pays for a timer per task with limits: that is the price of stopping work that
  ignores its timeout, not of the event queue);
- ``event_queue``: ``app.event_queue.publish``;
- ``eq_many``: ``app.event_queue.publish_many`` in batches of 100 (``BENCH_QUEUE_BATCH``);
- ``celery_default``: raw Celery as it comes, ``apply_async`` to its default worker (prefork, 2 processes, early
  ack, prefetch 4), started beside ours (``benchmarks/_peers.py``);
- ``dramatiq``: Dramatiq's ``actor.send`` to its default worker (a process per core, 8 threads each).

Printed per broker and path: enqueue rate, throughput from the first enqueue to the last start,
enqueue-to-start p50, lost and duplicated (rates averaged over the rounds), CPU milliseconds per message summed
over the processes involved (the publisher, the path's worker with its pool, the broker server), then the
event queue's ratios against the raw paths and the issue's targets (publish() >= 3x apply_async's enqueue rate;
end-to-end >= 1.0x raw Celery's default worker, publish_many >= 1.0x Dramatiq's; CPU <= 0.5x raw Celery's).

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
KINDS = ("raw", "raw_limits", "event_queue", "eq_many", "celery_default", "dramatiq")
# BENCH_QUEUE_PATHS=event_queue,raw: only those paths (the ratios printed are those whose paths ran).
KINDS = tuple(kind for kind in KINDS if kind in os.environ.get("BENCH_QUEUE_PATHS", ",".join(KINDS)).split(","))
# The worker each path runs on: ours (the project's, which also serves raw Celery with our settings) or a peer's.
WORKER_OF = {"celery_default": "celery_default", "dramatiq": "dramatiq"}
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
    """The project's worker (``celery -A nocluster.celery worker``), also consuming raw Celery's queue."""
    command = [
        sys.executable, "-m", "celery", "-A", "nocluster.celery", "worker", "-P", "prefork", "-c", str(PROCESSES),
        "-n", f"bench-{name}@%h", "-I", include, "-Q", f"{name}.raw",
        "--without-gossip", "--without-mingle", "-l", "WARNING",
    ]  # fmt: skip
    return start_process(f"{name}", command, env or child_env(name, broker_url))


def start_peer(peer: str, name: str, broker_url: str) -> subprocess.Popen[bytes]:
    """A peer's default worker: raw Celery (the same pool size and flags as ours) or Dramatiq (no flags)."""
    if peer == "celery_default":
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks._peers:celery_app", "worker", "-P", "prefork",
            "-c", str(PROCESSES), "-n", f"default-{name}@%h", "--without-gossip", "--without-mingle", "-l", "WARNING",
        ]  # fmt: skip
    else:
        command = [sys.executable, "-m", "dramatiq", "benchmarks._peers"]
    return start_process(f"{name}-{peer}", command, child_env(name, broker_url))


def start_process(label: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``command`` in a session of its own (its process group is what :mod:`benchmarks._cpu` counts), its output
    in a log file in the temporary directory."""
    log = Path(tempfile.gettempdir()) / f"nocluster-bench-{label}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )  # fmt: skip


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown of a worker started by :func:`start_worker`; kill -9 of its group after 30 s."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)


def measure(name: str, broker_url: str, workers: dict[str, int]) -> dict[str, dict[str, float]]:
    """Run the publishing side in a child process (its own Django settings), return its figures. ``workers``: the
    process group of each worker, by path (``ours`` for the project's), whose CPU time is counted."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.event_queue", "--publish", name],
        cwd=ROOT,
        env={**child_env(name, broker_url), "BENCH_QUEUE_WORKERS": json.dumps(workers)},
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
    from benchmarks import _cpu as cpu
    from nocluster import app

    if WORKER_OF.keys() & set(KINDS):
        from benchmarks import _peers as peers  # Dramatiq and pika: benchmarks/requirements.txt

    raw_task = register()
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    workers = json.loads(os.environ["BENCH_QUEUE_WORKERS"])
    broker = cpu.broker_pids(os.environ["BROKER_URL"])
    wait_for_worker()
    for kind in WORKER_OF.keys() & set(KINDS):
        wait_for_peer(kind)
    # Two rounds in mirrored order, so no path always runs first or last.
    for kind in (*KINDS, *reversed(KINDS)):
        client().delete(done_key(kind))
        worker = workers[WORKER_OF.get(kind, "ours")]

        def cpu_now(worker: int = worker) -> float:
            return cpu.self_cpu() + cpu.group_cpu(worker) + cpu.pids_cpu(broker)

        cpu_before = cpu_now()
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
        elif kind == "celery_default":
            sent = {i: (time.time(), peers.default_noop.apply_async((i, kind)))[0] for i in range(N)}
        elif kind == "dramatiq":
            sent = {i: (time.time(), peers.dramatiq_noop.send(i, kind))[0] for i in range(N)}
        else:
            # raw_limits: the time limits the event queue sets for timeout=15 (soft 15 + grace, hard 15 + 2 grace)
            limits = {"soft_time_limit": 20, "time_limit": 25} if kind == "raw_limits" else {}
            queue = f"{app.name}.raw"
            sent = {i: (time.time(), raw_task.apply_async((i, kind), queue=queue, **limits))[0] for i in range(N)}
        enqueued = time.time()
        row = collect(kind, sent, started, enqueued)
        row["cpu_ms"] = 1000 * (cpu_now() - cpu_before) / N
        runs[kind].append(row)
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


def wait_for_peer(kind: str) -> None:
    """Wait until the peer's worker ran one message (its start is not measured)."""
    from benchmarks import _peers as peers

    if kind == "celery_default":
        peers.default_noop.apply_async((-1, kind))
    else:
        peers.dramatiq_noop.send(-1, kind)
    deadline = time.time() + 120
    while not client().llen(done_key(kind)):
        if time.time() > deadline:
            raise RuntimeError(f"the {kind} worker never ran a message")
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
        f"{CHANNELS} channel(s) consumed; CPU: publisher + the path's worker + the broker"
    )
    print(f"  {'path':<15} {'enqueue/s':>10} {'done/s':>10} {'p50 ms':>10} {'CPU ms':>8} {'lost':>6} {'dup':>6}")
    for kind, row in figures.items():
        print(
            f"  {kind:<15} {row['enqueue_per_s']:>10.0f} {row['throughput_per_s']:>10.0f} "
            f"{row['p50_ms']:>10.1f} {row['cpu_ms']:>8.3f} {row['lost']:>6.0f} {row['duplicated']:>6.0f}"
        )
    for kind, baseline in itertools.product(("event_queue", "eq_many"), ("raw", "raw_limits", "celery_default")):
        if kind not in figures or baseline not in figures:
            continue
        ours, raw = figures[kind], figures[baseline]
        print(
            f"  {kind}/{baseline}: enqueue {ours['enqueue_per_s'] / raw['enqueue_per_s']:.2f}, "
            f"throughput {ours['throughput_per_s'] / raw['throughput_per_s']:.2f}, "
            f"CPU per message {ours['cpu_ms'] / raw['cpu_ms']:.2f}"
        )
    if not {"event_queue", "eq_many", "celery_default", "dramatiq"} <= figures.keys():
        return  # the targets need these paths
    ours, many = figures["event_queue"], figures["eq_many"]
    default, dramatiq = figures["celery_default"], figures["dramatiq"]
    print("  targets (issue 14):")
    for label, value, goal, better in (
        ("publish() enqueue / a stock app's apply_async", ours["enqueue_per_s"] / default["enqueue_per_s"], 3.0,
         "higher"),
        ("publish() end-to-end / raw Celery default worker",
         ours["throughput_per_s"] / default["throughput_per_s"], 1.0, "higher"),
        ("publish_many() end-to-end / Dramatiq default worker",
         many["throughput_per_s"] / dramatiq["throughput_per_s"], 1.0, "higher"),
        ("publish_many() enqueue/s", many["enqueue_per_s"], 20_000.0 if broker == "redis" else 0.0, "higher"),
        ("publish() CPU per message / raw Celery default", ours["cpu_ms"] / default["cpu_ms"], 0.5, "lower"),
        ("publish_many() CPU per message / raw Celery default", many["cpu_ms"] / default["cpu_ms"], 0.5, "lower"),
    ):  # fmt: skip
        if not goal:
            continue
        met = value >= goal if better == "higher" else value <= goal
        print(f"    {label}: {value:.2f} (goal {'>=' if better == 'higher' else '<='} {goal:g}: "
              f"{'met' if met else 'NOT met'})")  # fmt: skip


def main() -> int:
    failed = False
    for broker, url in BROKERS.items():
        if not reachable(url):
            print(f"\n{broker}: not reachable at {url}, skipped")
            continue
        name = f"bench{uuid.uuid4().hex[:8]}"
        # The nodes' tables (outbox, node registry) exist, as after manage.py migrate on a real node.
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=child_env(name, url), check=True)
        started = {"ours": start_worker(name, url)}
        try:
            started.update((peer, start_peer(peer, name, url)) for peer in WORKER_OF if peer in KINDS)
            figures = measure(name, url, {path: worker.pid for path, worker in started.items()})
            report(broker, figures)
            failed |= any(row["lost"] for row in figures.values())
        finally:
            for worker in started.values():
                stop_worker(worker)
            cleanup(name, url)
    return 1 if failed else 0


def cleanup(name: str, url: str, channels: tuple[str, ...] = ("bench",)) -> None:
    """Delete the benchmark's queues (RabbitMQ keeps durable queues) and Redis keys; never a FLUSHDB.
    ``channels``: the benchmark's own event-queue channels."""
    import redis
    from kombu import Connection, Queue

    try:
        with Connection(url) as conn:
            idle = [f"idle{extra}" for extra in range(1, CHANNELS)]
            for queue in ("raw", *channels, "celery", "default", *idle, *plugin_channels()):
                Queue(f"{name}.{queue}")(conn.default_channel).delete()
            if not url.startswith("redis"):  # Dramatiq's queue, its delay queue and its dead-letter queue
                for queue in (f"{name}.dramatiq", f"{name}.dramatiq.DQ", f"{name}.dramatiq.XQ"):
                    Queue(queue)(conn.default_channel).delete()
            if not url.startswith("redis"):  # the channels' exchanges, and the workers' control and events ones
                for exchange in rabbitmq_exchanges((f"{name}.", f"{name}:", f"reply.{name}:")):
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


def rabbitmq_exchanges(prefix: str | tuple[str, ...]) -> list[str]:
    """The local RabbitMQ's exchanges whose name starts with ``prefix`` (or one of them; durable ones outlive the
    run)."""
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
