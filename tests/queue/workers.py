"""Real Celery worker processes for the queue tests: ``celery -A nocluster.celery worker`` (prefork)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import ROOT, wait_until

# Short limits, so that timeouts, retries and the Redis visibility timeout (52 s) fit the test budget.
QUEUE_LIMITS = {
    "NOCLUSTER_QUEUE_MAX_TIMEOUT": "6",
    "NOCLUSTER_QUEUE_GRACE": "1",
    "NOCLUSTER_QUEUE_RETRY_BACKOFF": "0.2",
    "NOCLUSTER_QUEUE_RETRY_BACKOFF_MAX": "2",
    "NOCLUSTER_QUEUE_DEFER_DELAY": "0.2",
}
# The same limits as the Celery backend's OPTIONS, for an Application of the test process.
LIMIT_OPTIONS = {
    "max_timeout": 6.0,
    "grace": 1.0,
    "retry_backoff": 0.2,
    "retry_backoff_max": 2.0,
    "defer_delay": 0.2,
}


class Worker:
    """One Celery worker (main process + ``concurrency`` pool processes) in its own process group."""

    def __init__(
        self, name: str, env: dict[str, str], concurrency: int = 3, include: str = "", args: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix=f"nocluster-{name}-", suffix=".log")[1])
        command = [
            sys.executable, "-m", "celery", "-A", "nocluster.celery", "worker",
            "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "-l", "INFO",
        ]  # fmt: skip
        if include:
            command += ["-I", include]
        command += args
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> Worker:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited; log:\n{self.log_text()[-3000:]}")
            return " ready." in self.log_text()

        try:
            wait_until(ready, timeout=timeout, interval=0.2, message=f"worker {self.name} ready")
        except AssertionError as exc:
            # Celery logs every thread's stack on SIGUSR1: where the worker is stuck.
            before = len(self.log_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGUSR1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: len(self.log_text()) > before, timeout=3, interval=0.2)
            log = self.log_text()[-8000:]
            self.kill()  # a worker that never became ready is left to no one: nothing stays behind
            raise AssertionError(f"{exc}; its log ends:\n{log}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool processes (a crashed node)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes left behind, if any
        self.proc.wait(10)


def start_workers(names: list[str], env: dict[str, str], concurrency: int = 3, include: str = "") -> list[Worker]:
    workers = [Worker(name, env, concurrency, include) for name in names]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def kill_workers(workers: list[Worker]) -> None:
    """kill -9 of every worker's process group: for a fixture's teardown, once the test has seen what it needed
    (a warm shutdown takes ~2.8 s, a second of it billiard's pause before each pool process exits). The cleanup
    that follows deletes what they left (queues, the project's Redis keys)."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(worker.proc.pid, signal.SIGKILL)
    for worker in workers:
        worker.proc.wait(10)


def stop_workers(workers: list[Worker]) -> None:
    """Warm shutdown of every worker at once (each takes a few seconds to finish and hand back its messages)."""
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()
