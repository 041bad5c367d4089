"""A paced publisher against one worker: the rate at which the event queue keeps up with a one-``INSERT`` job.

For each broker (Redis, RabbitMQ) and each rate of ``BENCH_PACED_RATES`` (default 200, 400 and 800 messages/s):
one publisher calls ``app.event_queue.publish("paced", {"i": i})`` at that rate, outside a transaction, for
``BENCH_PACED_SECONDS`` (60); one worker (``celery -A nocluster.celery worker``, prefork, 2 processes, the
project's worker settings) runs a job that inserts one row into PostgreSQL (a fresh database per broker).

Printed per rate: the rate really published, the rate done over the second half of the window (the steady state),
the backlog when the publisher stopped, whether the worker kept up (a backlog under one second of messages), and
after the backlog drained, messages lost and run twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from benchmarks.outbox import for_each_broker, run_on_fresh_database  # noqa: E402

RATES = [int(rate) for rate in os.environ.get("BENCH_PACED_RATES", "200,400,800").split(",")]
SECONDS = float(os.environ.get("BENCH_PACED_SECONDS", "60"))
# Longest wait for a backlog to drain after the publisher stopped.
DRAIN_SECONDS = 300.0
TABLE = "bench_paced"


# --- the job (registered in the benchmark's worker, imported there with ``-I benchmarks.paced``) ---------------
def insert_row(payload: Any, context: Any) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (i, at) VALUES (%s, %s)", [payload["i"], time.time()])


def register() -> None:
    from nocluster import app

    app.event_queue.subscribe("paced", insert_row, concurrency=64)


# --- the publishing side (a child process with the project's settings for this broker and database) -----------
def rows(first: int = -1, count: int = 1) -> tuple[int, int]:
    """Rows of messages ``first`` to ``first + count - 1`` inserted so far, and distinct messages among them."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*), count(DISTINCT i) FROM {TABLE} WHERE i >= %s AND i < %s", [first, first + count]
        )
        total, distinct = cursor.fetchone()
    return int(total), int(distinct)


def run_rate(rate: int, first: int) -> dict[str, float]:
    """Publish at ``rate`` for SECONDS, messages numbered from ``first`` (each rate its own numbers, so a backlog
    an earlier rate left is not counted here), and wait for the backlog to drain."""
    from nocluster import app

    count = int(rate * SECONDS)
    half_at, half_done = count // 2, 0
    started = time.perf_counter()
    for i in range(count):
        wait = started + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if i == half_at:
            half_done, half_time = rows(first, count)[0], time.perf_counter()
        app.event_queue.publish("paced", {"i": first + i}, timeout=15)
    stopped = time.perf_counter()
    done_at_stop = rows(first, count)[0]
    idle_since, seen = time.perf_counter(), done_at_stop
    while seen < count and time.perf_counter() - idle_since < 30 and time.perf_counter() - stopped < DRAIN_SECONDS:
        time.sleep(0.5)
        if (now := rows(first, count)[0]) != seen:
            seen, idle_since = now, time.perf_counter()
    total, distinct = rows(first, count)
    return {
        "published_per_s": count / (stopped - started),
        "done_per_s": (done_at_stop - half_done) / (stopped - half_time),
        "backlog": count - done_at_stop,
        "drain_s": time.perf_counter() - stopped,
        "lost": count - distinct,
        "duplicated": total - distinct,
    }


def publish_and_wait() -> None:
    import django

    django.setup()
    from nocluster import app

    register()
    app.event_queue.publish("paced", {"i": -1}, timeout=15)  # the worker is up once it ran this one
    deadline = time.time() + 120
    while rows()[0] == 0:
        if time.time() > deadline:
            raise RuntimeError("the benchmark worker never ran a message")
        time.sleep(0.2)
    print(json.dumps({str(rate): run_rate(rate, index * 1_000_000) for index, rate in enumerate(RATES)}))


# --- the driver -------------------------------------------------------------------------------------------------
def run_broker(url: str) -> dict[str, dict[str, float]]:
    def create_table(database: str) -> None:
        with psycopg.connect(database.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (i integer, at float8)")

    # The job is this module's (not benchmarks.event_queue's channel): only it is consumed beside the plugins'.
    return run_on_fresh_database(
        url, "benchmarks.paced", {"BENCH_QUEUE_ROLE": "", "BENCH_PACED_ROLE": "worker"}, include="benchmarks.paced",
        prepare=create_table, channels=("paced",), timeout=len(RATES) * (SECONDS + DRAIN_SECONDS + 60),
    )  # fmt: skip


def report(broker: str, figures: dict[str, dict[str, float]]) -> None:
    print(f"\n{broker}: one publisher at a fixed rate for {SECONDS:.0f} s, a one-INSERT job, 1 worker x 2 processes")
    print(f"  {'rate':>6} {'published/s':>12} {'done/s':>8} {'backlog':>8} {'kept up':>8} {'drain s':>8} lost dup")
    for rate, row in figures.items():
        kept_up = row["backlog"] < int(rate)
        print(
            f"  {rate:>6} {row['published_per_s']:>12.0f} {row['done_per_s']:>8.0f} {row['backlog']:>8.0f} "
            f"{'yes' if kept_up else 'no':>8} {row['drain_s']:>8.1f} {row['lost']:>4.0f} {row['duplicated']:>3.0f}"
        )


def main() -> int:
    return for_each_broker(lambda broker, url: report(broker, run_broker(url)))


if __name__ != "__main__" and os.environ.get("BENCH_PACED_ROLE") == "worker":
    register()  # in the benchmark's worker: the channel must exist there too

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publish_and_wait()
    else:
        sys.exit(main())
