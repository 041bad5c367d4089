"""Cache benchmark: ``app.cache`` on django-redis beside raw django-redis and redis-py, in one run.

Prints per-operation p50/p99 (µs) and throughput, and the ratio of nocluster's throughput to raw
django-redis's on the same Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``), the two called
alternately so that both see the same machine load. The near cache (``local=True``) row reads hot keys from
process memory; its pub/sub is the project's (``PUBSUB_URL``/``BROKER_URL``, else in-process). Keys live under
a unique prefix and are removed at the end.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("NOCLUSTER_NAME", f"bench-{uuid.uuid4().hex[:8]}")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

import django

django.setup()

import redis  # noqa: E402
from django.core.cache import caches  # noqa: E402

from nocluster import app  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3000"))
BATCH = 100


Figures = tuple[float, float, float]


def measure(fn: Callable[[int], object], rounds: int = ROUNDS) -> Figures:
    """Return (p50 µs, p99 µs, ops/s) of ``fn(i)`` over ``rounds`` calls, after a warm-up."""
    return measure_pair(fn, fn, rounds)[0]


def measure_pair(
    first: Callable[[int], object], second: Callable[[int], object], rounds: int
) -> tuple[Figures, Figures]:
    """(p50 µs, p99 µs, ops/s) of ``first(i)`` and of ``second(i)``, called alternately ``rounds`` times each.

    Alternating puts both under the same load from whatever else runs on the machine (two shared cores here), so
    their ratio holds even when the absolute figures drift from one run to the next.
    """
    for i in range(200):
        first(i)
        second(i)
    samples: tuple[list[float], list[float]] = ([], [])
    clock = time.perf_counter
    for i in range(rounds):
        t0 = clock()
        first(i)
        t1 = clock()
        second(i)
        t2 = clock()
        samples[0].append(t1 - t0)
        samples[1].append(t2 - t1)
    return _figures(samples[0]), _figures(samples[1])


def _figures(samples: list[float]) -> Figures:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6, len(ordered) / sum(ordered)


def main() -> None:
    raw = caches["default"]
    ours = app.cache_manager.create_cache(name="bench")
    # The near cache listens for invalidations only while this node's pub/sub consumer runs.
    app.pub_sub_manager.start()
    near = app.cache_manager.create_cache(name="bench-near", local=True)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    value = {"user": 42, "roles": ["admin", "editor"], "name": "x" * 64}
    keys = [f"k{i}" for i in range(BATCH)]
    ours.mset(dict.fromkeys(keys, value))
    near.mset(dict.fromkeys(keys, value))
    raw.set_many({f"raw-{app.name}:{k}": value for k in keys})

    rows = [
        ("get", lambda i: raw.get(f"raw-{app.name}:k{i % BATCH}"), lambda i: ours.get(f"k{i % BATCH}")),
        ("set", lambda i: raw.set(f"raw-{app.name}:k{i % BATCH}", value), lambda i: ours.set(f"k{i % BATCH}", value)),
        ("near cache: hot get", lambda i: raw.get(f"raw-{app.name}:k{i % BATCH}"), lambda i: near.get(f"k{i % BATCH}")),
        (
            f"get_many({BATCH}) / mget",
            lambda i: raw.get_many([f"raw-{app.name}:{k}" for k in keys]),
            lambda i: ours.mget(*keys),
        ),
    ]
    ping = measure(lambda i: client.ping())
    print(f"Redis PING round trip (redis-py): p50 {ping[0]:.0f} µs, p99 {ping[1]:.0f} µs, {ping[2]:,.0f}/s")
    print(
        f"{'operation':<22} {'django-redis p50/p99 µs':>24} {'nocluster p50/p99 µs':>22} {'ops/s raw':>10} "
        f"{'ops/s ours':>10} {'ratio':>6}"
    )
    for name, raw_fn, ours_fn in rows:
        r, o = measure_pair(raw_fn, ours_fn, ROUNDS if "many" not in name else ROUNDS // 5)
        print(
            f"{name:<22} {r[0]:>12.0f} / {r[1]:<9.0f} {o[0]:>10.0f} / {o[1]:<9.0f} {r[2]:>10,.0f} {o[2]:>10,.0f} "
            f"{o[2] / r[2]:>6.2f}"
        )
    ours.reset()
    near.reset()
    app.pub_sub_manager.stop()
    raw.delete_many([f"raw-{app.name}:{k}" for k in keys])


if __name__ == "__main__":
    main()
