"""Test helpers: waiting without sleeping-and-hoping, and real node processes.

``NodeProcess`` starts ``python -m tests.node <scenario>``: a real OS process of the project with its own
``instance_id`` that sets Django up, installs plugins, starts its consumers (``app.start()``), prints one JSON
``ready`` line and then answers JSON commands read from stdin. A scenario is a function
``handle(command: dict) -> JSON`` (``"module:function"``); it may also push events at any time with
``tests.node.emit(dict)``. Every line the node prints on stdout is JSON; stderr goes to a log file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from nocluster.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "NodeProcess", "free_port", "private_redis", "start_nodes", "stop_nodes", "wait_until"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a private server or a server that must be down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_redis(*options: str) -> Iterator[str]:
    """A throwaway redis-server on a free port (``options`` are redis-server flags); yields its URL.

    For fault and configuration tests that must not touch the shared server. Its files live in a temporary folder
    removed afterwards.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise AssertionError("redis-server is not installed (it is needed to run a private Redis for this test)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="nocluster-redis-")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir, *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until(answers, timeout=10, message="the private redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


class NodeProcess:
    """One node process. Use :func:`start_nodes` or as a context manager.

    Parameters:
      scenario: ``"module:function"`` handling commands in the node (default: ``tests.node:default_handler``).
      env: environment added to this process's (see the ``node_env`` fixture).
      start: call ``app.start()`` in the node (consumers); False to run without consumers.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        scenario: str = "tests.node:default_handler",
        env: dict[str, str] | None = None,
        start: bool = True,
        args: Iterable[str] = (),
    ) -> None:
        self.scenario = scenario
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.start_consumers = start
        self.args = list(args)
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.instance_id: str | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (open for the process lifetime)
            prefix="nocluster-node-", suffix=".log", delete=False
        )
        self._cond = threading.Condition()
        self._command_ids = itertools.count(1)
        self.proc: subprocess.Popen[str] | None = None

    def spawn(self) -> NodeProcess:
        command = [
            sys.executable,
            "-m",
            "tests.node",
            self.scenario,
            "--start" if self.start_consumers else "--no-start",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, name=f"node-reader-{self.proc.pid}", daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "stdout", "line": line.rstrip("\n")}
            with self._cond:
                if event.get("event") == "reply":
                    self.replies[event["id"]] = event
                else:
                    if event.get("event") == "ready":
                        self.instance_id = event["instance_id"]
                    self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout: float = 60.0) -> NodeProcess:
        self.wait_event(lambda e: e.get("event") == "ready", timeout=timeout)
        return self

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first event (JSON line other than a reply) matching ``predicate``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    raise AssertionError(
                        f"node {self.pid}: no matching event within {timeout} s; log:\n{self.log_text()[-3000:]}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def request(self, command: dict[str, Any], timeout: float = 30.0) -> Any:
        """Send ``command`` to the scenario handler and return its result (raises if the handler raised)."""
        assert self.proc is not None and self.proc.stdin is not None
        command_id = next(self._command_ids)
        self.proc.stdin.write(json.dumps({**command, "id": command_id}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self._cond:
            while command_id not in self.replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    raise AssertionError(
                        f"node {self.pid}: no reply to {command} within {timeout} s; log:\n{self.log_text()[-3000:]}"
                    )
                self._cond.wait(min(remaining, 0.5))
            reply = self.replies.pop(command_id)
        if "error" in reply:
            raise RuntimeError(f"node {self.pid}: {reply['error']}")
        return reply.get("result")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies without stopping anything (a crash)."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait: the node stops gracefully (``app.stop()``); SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def __enter__(self) -> NodeProcess:
        return self.spawn().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nodes(
    count: int,
    env: dict[str, str],
    scenario: str = "tests.node:default_handler",
    start: bool = True,
    timeout: float = 90.0,
) -> list[NodeProcess]:
    """Spawn ``count`` node processes at once and wait until every one is ready."""
    nodes = [NodeProcess(scenario, env=env, start=start).spawn() for _ in range(count)]
    try:
        for node in nodes:
            node.wait_ready(timeout)
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: Iterable[NodeProcess]) -> None:
    for node in nodes:
        node.stop()
