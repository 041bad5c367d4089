"""The outbox's cost on PostgreSQL: ``publish()`` inside ``atomic()`` with the outbox, against the same publish made
after the commit without it (``transaction.on_commit``, what the event queue did before), in one run.

For each broker (Redis, RabbitMQ): one Celery worker (2 prefork processes) and a publisher on a fresh PostgreSQL
database. Each transaction inserts a row of the caller's (a ``tasks.Task``) and publishes a no-op message:

- ``on_commit``: the message is published in ``transaction.on_commit`` (lost if the broker is down then);
- ``outbox``: ``app.event_queue.publish`` inside the transaction (an outbox row, relayed after the commit, and
  the worker's check for a second copy);

one message per transaction, then batches of 100 per transaction; ``BENCH_OUTBOX_ROUNDS`` (4) rounds of
``BENCH_OUTBOX_MESSAGES`` (1,000) per path, in mirrored order, medians printed. Printed per path: the publisher's
time per message (transaction, commit and relay included), end-to-end throughput, and the outbox's added milliseconds
per message and throughput ratio (goals: at most 0.5 ms added, at least 0.8 of the throughput).

Needs PostgreSQL (``DATABASE_URL`` of a server where a database can be created, default
``postgres://postgres@127.0.0.1:5432/postgres``), Redis and RabbitMQ.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

from benchmarks.event_queue import (  # noqa: E402
    BROKERS,
    ROOT,
    cleanup,
    client,
    done_key,
    reachable,
    start_worker,
    stop_worker,
)

N = int(os.environ.get("BENCH_OUTBOX_MESSAGES", "1000"))
ROUNDS = int(os.environ.get("BENCH_OUTBOX_ROUNDS", "4"))
PATHS = ("on_commit", "outbox", "on_commit x100", "outbox x100")
SERVER_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def database_url(name: str) -> str:
    parts = urlsplit(SERVER_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(SERVER_URL.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(sql)


def env_for(name: str, broker_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "settings",
        "DJANGO_ENV": "",
        "DJANGO_DEBUG": "false",  # as in production: DEBUG keeps every query in memory
        "NOCLUSTER_NAME": name,
        "BROKER_URL": broker_url,
        "DATABASE_URL": database_url(name),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        "BENCH_QUEUE_ROLE": "worker",
    }


def run_path(queue: Any, path: str) -> dict[str, float]:
    """Publish N messages on ``path`` (one or 100 per transaction) and wait until the worker ran them all."""
    from django.db import transaction

    from tasks.models import Task

    batch = 100 if path.endswith("x100") else 1
    outbox = path.startswith("outbox")
    client().delete(done_key("event_queue"))
    started = time.perf_counter()
    for first in range(0, N, batch):
        with transaction.atomic():
            for i in range(first, first + batch):
                Task.objects.create(title="bench", plugin="bench", channel="bench")
                if outbox:
                    queue.publish("bench", {"i": i}, timeout=15)
                else:
                    transaction.on_commit(lambda i=i: queue.publish("bench", {"i": i}, timeout=15))
    published = time.perf_counter() - started
    while client().llen(done_key("event_queue")) < N:
        time.sleep(0.05)
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"{path}: not every message ran")
    total = time.perf_counter() - started
    return {"ms_per_message": 1000 * published / N, "done_per_s": N / total}


# --- the publishing side (a child process with the project's settings for this broker and database) -----
def publish_and_wait() -> None:
    import django

    django.setup()
    from benchmarks.event_queue import register, wait_for_worker
    from nocluster import app

    register()
    app.outbox.start()  # this node's relay, as on any started node
    wait_for_worker()
    queue = app.event_queue
    runs: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    for round_ in range(ROUNDS):
        # Mirrored order in every other round, so a path is not always measured first (or last) on a warm machine.
        for path in PATHS if round_ % 2 == 0 else tuple(reversed(PATHS)):
            runs[path].append(run_path(queue, path))
    figures = {path: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for path, rows in runs.items()}
    app.outbox.stop()
    print(json.dumps(figures))


# --- the driver -------------------------------------------------------------------------------------------------
def run_broker(broker: str, url: str) -> dict[str, dict[str, float]]:
    return run_on_fresh_database(url, "benchmarks.outbox")


def run_on_fresh_database(
    url: str,
    module: str,
    env_extra: dict[str, str] | None = None,
    include: str = "benchmarks.event_queue",
    prepare: Callable[[str], None] | None = None,
    channels: tuple[str, ...] = ("bench",),
    timeout: float = 1800,
) -> dict[str, dict[str, float]]:
    """On a fresh PostgreSQL database (migrated; ``prepare(database_url)`` after that) with one worker for broker
    ``url`` (``-I include``): run ``python -m module --publish`` and return the figures it printed last (JSON).
    Afterwards the worker is stopped, and the database, the queues of ``channels`` and the keys are deleted."""
    name = f"bench{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    env = {**env_for(name, url), **(env_extra or {})}
    worker = None
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        if prepare is not None:
            prepare(database_url(name))
        worker = start_worker(name, url, env, include=include)
        out = subprocess.run(
            [sys.executable, "-m", module, "--publish"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if worker is not None:
            stop_worker(worker)
        cleanup(name, url, channels=channels)
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def for_each_broker(run_and_report: Callable[[str, str], None]) -> int:
    """``run_and_report(broker, url)`` for each broker that answers, with PostgreSQL; the others are skipped."""
    for broker, url in BROKERS.items():
        if not reachable(url) or not reachable(SERVER_URL):
            print(f"\n{broker}: {url} or PostgreSQL not reachable, skipped")
            continue
        run_and_report(broker, url)
    return 0


def report(broker: str, figures: dict[str, dict[str, float]]) -> None:
    print(
        f"\n{broker}: {N} messages per path and round, {ROUNDS} rounds in mirrored order (medians), each with a row "
        "of the caller's; 1 worker x 2 prefork processes"
    )
    print(f"  {'path':<16} {'publisher ms/msg':>17} {'done/s':>8}")
    for path, row in figures.items():
        print(f"  {path:<16} {row['ms_per_message']:>17.3f} {row['done_per_s']:>8.0f}")
    for suffix in ("", " x100"):
        base, ours = figures[f"on_commit{suffix}"], figures[f"outbox{suffix}"]
        print(
            f"  outbox{suffix or ' x1'}: +{ours['ms_per_message'] - base['ms_per_message']:.3f} ms per message "
            f"(goal <= 0.5), throughput {ours['done_per_s'] / base['done_per_s']:.2f} (goal >= 0.8)"
        )


def main() -> int:
    return for_each_broker(lambda broker, url: report(broker, run_broker(broker, url)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publish_and_wait()
    else:
        sys.exit(main())
