"""Lock benchmark: ``app.lock_manager`` on Redis beside raw python-redis-lock 4.0.1 and a Redis PING.

Standalone (``make bench`` runs it; it is not a test). Uses ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``)
and a unique key prefix, and deletes its keys at the end. Measures, in one run, interleaved in rounds:

- PING round trip (p50, p99);
- uncontended acquire+release (p50, p99): ours with ``ttl=1.0``; raw ``redis_lock.Lock(expire=1)``, a new
  Lock object per acquisition as typical code does;
- contended: 8 processes acquiring and releasing one key for 2 s, acquisitions/s; 4 rounds, alternating
  which goes first, median (the machine may be shared: the per-round figures are printed too).

Ratios are ours against raw as throughput (raw p50 / our p50; our acq/s / raw acq/s): >= 1 means ours is
faster. Targets: ratio >= 0.9 on both, our uncontended p50 within 3 PING round trips.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0]: its other scripts (queue.py, ...) would shadow the standard
# library. Import from the project root instead.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = f"bench-{uuid.uuid4().hex[:8]}"
ROUNDS = 3
UNCONTENDED = 2000
PROCESSES = 8
CONTENDED_SECONDS = 2.0
CONTENDED_ROUNDS = 4


def setup_django() -> None:
    # Only settings are needed (Application reads NOCLUSTER); no app registry, so no other app is imported.
    from django.conf import settings

    settings.configure(NOCLUSTER={"NAME": PREFIX})
    logging.getLogger("redis_lock").setLevel(logging.WARNING)  # it logs every acquisition at INFO


def lock_manager():
    from nocluster import Application

    backend = {"BACKEND": "nocluster.locks.backends.redis.RedisLockBackend", "OPTIONS": {"url": REDIS_URL}}
    return Application({"NAME": PREFIX, "LOCKS": backend}).lock_manager


def redis_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=None)


def ours_step() -> Callable[[str], None]:
    manager = lock_manager()
    return lambda key: manager.acquire(key, ttl=1.0).release()


def raw_step() -> Callable[[str], None]:
    import redis_lock

    client = redis_client()

    def step(key: str) -> None:
        lock = redis_lock.Lock(client, f"{PREFIX}:raw:{key}", expire=1)
        lock.acquire()
        lock.release()

    return step


STEPS = {"ours": ours_step, "raw": raw_step}


def timed(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(50):  # warm up: connections, scripts
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def contender(kind: str, start_at: float, results: mp.Queue) -> None:
    step = STEPS[kind]()
    step("warm")
    while time.time() < start_at:
        time.sleep(0.001)
    count, deadline = 0, time.monotonic() + CONTENDED_SECONDS
    while time.monotonic() < deadline:
        step("contended")
        count += 1
    results.put(count)


def contended(kind: str) -> tuple[float, float]:
    context = mp.get_context("fork")
    results: mp.Queue = context.Queue()
    start_at = time.time() + 1.0
    procs = [context.Process(target=contender, args=(kind, start_at, results)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    counts = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    # Fairness: the slowest process's share of the average (1.0: every process got as many acquisitions).
    return sum(counts) / CONTENDED_SECONDS, min(counts) / (sum(counts) / len(counts))


def cleanup() -> None:
    client = redis_client()
    names = list(client.scan_iter(match=f"*{PREFIX}*", count=1000))
    if names:
        client.delete(*names)


def main() -> int:
    setup_django()
    client = redis_client()
    ping: list[float] = []
    uncontended: dict[str, list[tuple[float, float]]] = {"ours": [], "raw": []}
    rates: dict[str, list[float]] = {"ours": [], "raw": []}
    fairness: dict[str, list[float]] = {"ours": [], "raw": []}
    steps = {kind: make() for kind, make in STEPS.items()}
    try:
        for _ in range(ROUNDS):
            ping += timed(client.ping, UNCONTENDED)
            for kind, step in steps.items():
                samples = timed(lambda step=step: step("uncontended"), UNCONTENDED)
                uncontended[kind].append((p(samples, 0.5), p(samples, 0.99)))
        for round_ in range(CONTENDED_ROUNDS):
            # Alternate which goes first: other load on the machine drifts over seconds.
            for kind in ("ours", "raw") if round_ % 2 == 0 else ("raw", "ours"):
                rate, fair = contended(kind)
                rates[kind].append(rate)
                fairness[kind].append(fair)
    finally:
        cleanup()
    ping50, ping99 = p(ping, 0.5), p(ping, 0.99)
    med = {kind: tuple(statistics.median(x[i] for x in rounds) for i in (0, 1)) for kind, rounds in uncontended.items()}
    rate = {kind: statistics.median(values) for kind, values in rates.items()}
    print(
        f"Redis {REDIS_URL}, {os.cpu_count()} CPUs; medians of {ROUNDS} rounds x {UNCONTENDED} (uncontended), ", end=""
    )
    print(f"{CONTENDED_ROUNDS} rounds x {CONTENDED_SECONDS:.0f} s x {PROCESSES} processes (contended)")
    print(f"{'':34}{'p50 (us)':>10}{'p99 (us)':>10}{'contended acq/s':>18}")
    print(f"{'Redis PING round trip':34}{ping50 * 1e6:>10.0f}{ping99 * 1e6:>10.0f}{'':>18}")
    for kind, label in (("raw", "raw python-redis-lock 4.0.1"), ("ours", "app.lock_manager (redis)")):
        print(f"{label:34}{med[kind][0] * 1e6:>10.0f}{med[kind][1] * 1e6:>10.0f}{rate[kind]:>18.0f}")
    uncontended_ratio = med["raw"][0] / med["ours"][0]
    contended_ratio = rate["ours"] / rate["raw"]
    trips = med["ours"][0] / ping50
    print(f"ratio ours/raw, uncontended (raw p50 / our p50): {uncontended_ratio:.2f}  (target >= 0.9)")
    print(f"ratio ours/raw, contended (acq/s):                {contended_ratio:.2f}  (target >= 0.9)")
    print(f"our uncontended p50 in PING round trips:          {trips:.1f}  (target <= 3)")
    print(f"raw uncontended p50 in PING round trips:          {med['raw'][0] / ping50:.1f}")
    for kind in ("raw", "ours"):
        print(f"contended acq/s per round, {kind}: {', '.join(f'{r:.0f}' for r in rates[kind])}")
    for kind in ("raw", "ours"):
        print(f"fairness (slowest process / average), {kind}: {statistics.median(fairness[kind]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
