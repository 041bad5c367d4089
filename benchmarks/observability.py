"""What metrics and tracing cost: each instrumented path with ``NOCLUSTER_METRICS`` and ``NOCLUSTER_TRACING`` on,
against the same path with both off, in one run on the same servers (Redis as broker, pub/sub and locks).

Both arms run with OpenTelemetry's SDK set up (a tracer provider with a batch span processor and an exporter
that drops the spans), and publish inside a request span (one per 100 messages), as a traced web node does: the
arms differ only in what nocluster does, carrying the trace context and making its handler spans, and recording
metrics (prometheus_client in multiprocess mode, files in a folder of this run). ``BENCH_OBS_SDK=0``: no SDK in
either arm (OpenTelemetry's API only), which leaves what nocluster itself adds.

Paths, each a fresh child process per arm and round, arms in mirrored order (off, on, on, off, ...), medians:

- ``pubsub``: ``app.pubsub.publish`` of ``BENCH_OBS_MESSAGES`` (5,000) messages received by the same process
  (``skip_self=False``): publish rate with every message received;
- ``locks``: ``acquire`` + ``release`` of one key, uncontended (``BENCH_OBS_LOCKS``, 2,000);
- ``queue publish``: ``app.event_queue.publish`` on Celery (lean publish), no worker consuming;
- ``queue worker``: a Celery worker (2 prefork processes) with the arm's settings runs ``BENCH_OBS_RUNS``
  (3,000) no-op messages; publisher enqueue rate and end-to-end throughput.

Two processes differ by more than 5 % from run to run on this machine, so the in-process paths are also measured
**interleaved**: one process with metrics and tracing set up runs blocks of ``BENCH_OBS_BLOCK`` (100) operations,
alternately with nocluster's recorders and trace carrying on and with both off (the no-op recorders swapped in,
``tracing.configure(False)``), ``BENCH_OBS_BLOCKS`` (100) blocks per arm in ABBA order; the ratio of the arms' summed
times cancels the drift of the machine. A pub/sub block ends when its last message was received. A control, the
locks path with both arms off, shows the method's own noise (1.00 ± 0.02 on this machine). With
``BENCH_OBS_ATTRIBUTION=1`` the pub/sub path is measured again with only part of "on": the recorders alone, tracing
alone (carrying and the handler's span), and carrying alone (no span made), to show where its cost goes.
``BENCH_OBS_PAIRS=0`` skips the fresh-process arms (the interleaved figures only).

Goal (issue 16): on ÷ off at least 0.95 on every path. Needs Redis (``REDIS_URL``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_OBS_MESSAGES", "5000"))
LOCKS = int(os.environ.get("BENCH_OBS_LOCKS", "2000"))
RUNS = int(os.environ.get("BENCH_OBS_RUNS", "3000"))
PAIRS = int(os.environ.get("BENCH_OBS_PAIRS", "2"))
SPAN_EVERY = 100
BLOCK = int(os.environ.get("BENCH_OBS_BLOCK", "100"))
BLOCKS = int(os.environ.get("BENCH_OBS_BLOCKS", "100"))
SDK = os.environ.get("BENCH_OBS_SDK", "1") != "0"
ROOT = Path(__file__).resolve().parent.parent


def set_up_sdk() -> Any:
    """OpenTelemetry's SDK in this process: spans are made and batched, then dropped. Returns a tracer (the API's
    no-op one, and no SDK, with ``BENCH_OBS_SDK=0``)."""
    from opentelemetry import trace

    if not SDK:
        return trace.get_tracer("benchmarks.observability")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer("benchmarks.observability")


def arm_env(name: str, arm: str, metrics_dir: str) -> dict[str, str]:
    from benchmarks.event_queue import REDIS_URL, child_env

    on = "true" if arm == "on" else "false"
    return {
        **child_env(name, REDIS_URL),
        "NOCLUSTER_METRICS": on,
        "NOCLUSTER_TRACING": on,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        "BENCH_QUEUE_MESSAGES": str(RUNS),
    }


# --- in a child process: the in-process paths -------------------------------------------------------------------
def in_spans(tracer: Any, count: int, step: Any) -> float:
    """Call ``step(i)`` ``count`` times, ``SPAN_EVERY`` per request span; return the seconds it took."""
    started = time.perf_counter()
    for first in range(0, count, SPAN_EVERY):
        with tracer.start_as_current_span("GET /bench"):
            for i in range(first, min(count, first + SPAN_EVERY)):
                step(i)
    return time.perf_counter() - started


def measure_paths() -> None:
    import django

    django.setup()
    import benchmarks.event_queue  # noqa: F401 (registers the bench channel: BENCH_QUEUE_ROLE is "worker")
    from nocluster import app

    tracer = set_up_sdk()
    figures = {
        "pubsub": pubsub_rate(app, tracer),
        "locks": LOCKS / in_spans(tracer, LOCKS, lambda i: app.lock_manager.acquire("bench", ttl=5).release()),
        "queue publish": MESSAGES / in_spans(tracer, MESSAGES, lambda i: app.event_queue.publish("bench", {"i": i})),
    }
    print(json.dumps(figures))


def pubsub_rate(app: Any, tracer: Any) -> float:
    received = [0]
    done = threading.Event()

    def on_message(message: Any) -> None:
        received[0] += 1
        if received[0] >= MESSAGES + 1:
            done.set()

    app.pub_sub_manager.subscribe("bench", on_message)
    app.pub_sub_manager.start()
    try:
        # The subscription is bound once a first message comes back.
        deadline = time.monotonic() + 30
        while received[0] == 0 and time.monotonic() < deadline:
            app.pub_sub_manager.publish("bench", {"i": -1}, skip_self=False)
            time.sleep(0.05)
        received[0] = 1
        started = time.perf_counter()
        in_spans(tracer, MESSAGES, lambda i: app.pub_sub_manager.publish("bench", {"i": i}, skip_self=False))
        if not done.wait(60):
            raise RuntimeError(f"pub/sub: {received[0] - 1} of {MESSAGES} received")
        return MESSAGES / (time.perf_counter() - started)
    finally:
        app.pub_sub_manager.stop()


# --- in a child process: the in-process paths, interleaved -----------------------------------------------------
# What the "on" arm turns on, for the attribution (``BENCH_OBS_ATTRIBUTION=1``): recorders, trace carrying, the
# handlers' spans; "on" is all three.
PARTS = {
    "on": {"recorders", "carrying", "spans"},
    "metrics only": {"recorders"},
    "tracing only": {"carrying", "spans"},
    "carrying only": {"carrying"},
}


class Arms:
    """Switches one process's nocluster instrumentation on and off: the managers' recorders, trace carrying and
    the handlers' spans (any arm not in :data:`PARTS` is all off)."""

    def __init__(self, app: Any) -> None:
        from nocluster import tracing
        from nocluster.metrics.recorders import LockMetrics, PubSubMetrics, QueueMetrics

        self.managers = (app.pub_sub_manager, app.lock_manager, app.event_queue)
        self.recording = tuple(manager.metrics for manager in self.managers)
        self.silent = (PubSubMetrics(), LockMetrics(), QueueMetrics())
        self.consumer_span = tracing.consumer_span

    def use(self, arm: str) -> None:
        from nocluster import tracing

        parts = PARTS.get(arm, set())
        tracing.configure(bool(parts & {"carrying", "spans"}))
        no_span: Any = lambda *args, **kwargs: tracing.NO_SPAN  # noqa: E731
        tracing.consumer_span = self.consumer_span if "spans" in parts else no_span
        recorders = self.recording if "recorders" in parts else self.silent
        for manager, recorder in zip(self.managers, recorders, strict=True):
            manager.metrics = recorder


def interleaved(arms: Arms, run_block: Any, second: str = "on") -> float:
    """``second`` ÷ off throughput of ``run_block()`` (which returns its seconds), blocks in ABBA order. An arm not
    in :data:`PARTS` is off (``second="off again"``: the method's control)."""
    spent = {"off": 0.0, second: 0.0}
    for arm in ("off", second, second, "off") * ((BLOCKS + 1) // 2):
        arms.use(arm)
        spent[arm] += run_block()
    return spent["off"] / spent[second]


def measure_interleaved() -> None:
    import django

    django.setup()
    import benchmarks.event_queue  # noqa: F401 (registers the bench channel: BENCH_QUEUE_ROLE is "worker")
    from nocluster import app

    tracer = set_up_sdk()
    arms = Arms(app)
    lock = lambda i: app.lock_manager.acquire("bench", ttl=5).release()  # noqa: E731
    publish = lambda i: app.event_queue.publish("bench", {"i": i})  # noqa: E731
    received = [0]
    block = [0]  # the block being measured: a late message of an earlier one (or of the warm-up) is not counted
    block_done = threading.Event()

    def on_message(message: Any) -> None:
        if message.get("block") != block[0]:
            return
        received[0] += 1
        if received[0] >= BLOCK:
            block_done.set()

    def pubsub_block() -> float:
        block[0] += 1
        received[0] = 0
        block_done.clear()
        started = time.perf_counter()
        payload = {"block": block[0]}
        in_spans(tracer, BLOCK, lambda i: app.pub_sub_manager.publish("bench", {**payload, "i": i}, skip_self=False))
        if not block_done.wait(60):
            raise RuntimeError(f"pub/sub: {received[0]} of {BLOCK} received")
        return time.perf_counter() - started

    app.pub_sub_manager.subscribe("bench", on_message)
    app.pub_sub_manager.start()
    try:
        deadline = time.monotonic() + 30
        while received[0] == 0 and time.monotonic() < deadline:  # bound once a first message comes back
            app.pub_sub_manager.publish("bench", {"block": 0, "i": -1}, skip_self=False)
            time.sleep(0.05)
        figures = {"pubsub": interleaved(arms, pubsub_block)}
        if os.environ.get("BENCH_OBS_ATTRIBUTION") == "1":
            for part in ("metrics only", "tracing only", "carrying only"):
                figures[f"pubsub, {part}"] = interleaved(arms, pubsub_block, part)
    finally:
        app.pub_sub_manager.stop()
    figures["locks"] = interleaved(arms, lambda: in_spans(tracer, BLOCK, lock))
    figures["queue publish"] = interleaved(arms, lambda: in_spans(tracer, BLOCK, publish))
    figures["control: locks off/off"] = interleaved(arms, lambda: in_spans(tracer, BLOCK, lock), "off again")
    print(json.dumps(figures))


# --- in a child process: the publisher of the worker path -------------------------------------------------------
def measure_worker_path() -> None:
    import django

    django.setup()
    from benchmarks.event_queue import collect, wait_for_worker  # registers the bench channel (as above)
    from nocluster import app

    tracer = set_up_sdk()
    wait_for_worker()
    sent: dict[int, float] = {}

    def publish(i: int) -> None:
        sent[i] = time.time()
        app.event_queue.publish("bench", {"i": i}, timeout=15)

    started = time.time()
    in_spans(tracer, RUNS, publish)
    figures = collect("event_queue", sent, started, time.time())
    print(json.dumps({"queue enqueue": figures["enqueue_per_s"], "queue worker": figures["throughput_per_s"]}))


# --- the driver -------------------------------------------------------------------------------------------------
def run_child(mode: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def one_arm(arm: str, scratch: str) -> dict[str, float]:
    from benchmarks.event_queue import REDIS_URL, cleanup, start_worker, stop_worker

    name = f"benchobs{uuid.uuid4().hex[:8]}"
    metrics_dir = tempfile.mkdtemp(prefix="metrics-", dir=scratch)
    env = arm_env(name, arm, metrics_dir)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    try:
        figures = run_child("--paths", env)
        cleanup(name, REDIS_URL)  # the queue publish path's messages: no worker was consuming them
        worker = start_worker(
            name, REDIS_URL, env={**env, "BENCH_QUEUE_ROLE": "worker"}, include="benchmarks.observability"
        )
        try:
            figures.update(run_child("--worker-path", env))
        finally:
            stop_worker(worker)
    finally:
        cleanup(name, REDIS_URL)
    return figures


def main() -> int:
    from benchmarks.event_queue import REDIS_URL, reachable

    if not reachable(REDIS_URL):
        print(f"Redis not reachable at {REDIS_URL}: skipped")
        return 1
    scratch = tempfile.mkdtemp(prefix="nocluster-bench-obs-")
    os.environ["TMPDIR"] = scratch  # the worker's log and SQLite database
    tempfile.tempdir = None
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        for arm in ("off", "on", "on", "off") * ((PAIRS + 1) // 2):
            runs[arm].append(one_arm(arm, scratch))
        same_process = interleaved_arms(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sdk = "SDK in both arms" if SDK else "no SDK (API only)"
    if runs["on"]:  # BENCH_OBS_PAIRS=0: the interleaved figures only
        print_fresh_processes(runs, sdk)
    print(f"\ninterleaved in one process, {BLOCKS} blocks of {BLOCK} per arm in ABBA order ({sdk}): on / off")
    for path, ratio in same_process.items():
        print(f"  {path:<24} {ratio:>9.3f}")
    measured = [ratio for path, ratio in same_process.items() if not path.startswith("control") and ", " not in path]
    print(f"  worst ratio {min(measured):.3f} (goal >= 0.95)")
    return 0


def print_fresh_processes(runs: dict[str, list[dict[str, float]]], sdk: str) -> None:
    print(f"\nmetrics and tracing on vs off, Redis, {len(runs['on'])} runs per arm in mirrored order (medians), {sdk}")
    print(f"  {'path':<16} {'off /s':>10} {'on /s':>10} {'on / off':>9}")
    worst = 1.0
    for path in runs["off"][0]:
        off = statistics.median(run[path] for run in runs["off"])
        on = statistics.median(run[path] for run in runs["on"])
        worst = min(worst, on / off)
        print(f"  {path:<16} {off:>10.0f} {on:>10.0f} {on / off:>9.2f}")
    print(f"  worst ratio {worst:.2f} (goal >= 0.95)")


def interleaved_arms(scratch: str) -> dict[str, float]:
    from benchmarks.event_queue import REDIS_URL, cleanup

    name = f"benchobs{uuid.uuid4().hex[:8]}"
    env = arm_env(name, "on", tempfile.mkdtemp(prefix="metrics-", dir=scratch))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    try:
        return run_child("--interleaved", env)
    finally:
        cleanup(name, REDIS_URL)


if __name__ == "__main__":
    if sys.argv[1:] == ["--paths"]:
        measure_paths()
    elif sys.argv[1:] == ["--worker-path"]:
        measure_worker_path()
    elif sys.argv[1:] == ["--interleaved"]:
        measure_interleaved()
    else:
        sys.exit(main())
elif os.environ.get("BENCH_QUEUE_ROLE") == "worker":
    # In the worker path's Celery worker (``-I benchmarks.observability``): the channel, and the SDK.
    import benchmarks.event_queue  # noqa: F401 (registers the bench channel)

    set_up_sdk()
