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

__all__ = [
    "ROOT",
    "NodeProcess",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "ServerCannotStart",
    "free_port",
    "private_redis",
    "start_nodes",
    "stop_nodes",
    "wait_until",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a private server or a server that must be down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerCannotStart(Exception):
    """A private server's binary is missing or it did not come up in time (the fixture skips, or fails under CI)."""


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A throwaway ``redis-server`` on a free port (``options`` are redis-server flags), for fault and configuration
    tests that must not touch the shared server: :meth:`kill` (SIGKILL) and :meth:`start` again on the same port.
    Its files live in a temporary folder that :meth:`close` removes."""

    def __init__(self, *options: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerCannotStart("redis-server is not installed (needed to run a private Redis for this test)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="nocluster-redis-")
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.workdir,
                        "--daemonize", "no", *options]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        """Start the server (again) and wait until it answers PING."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: _answers_ping(self.port), timeout=timeout, message="the private redis-server")
        except AssertionError as exc:
            self.kill()
            raise ServerCannotStart(f"redis-server on port {self.port} did not answer within {timeout} s") from exc
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def private_redis(*options: str) -> Iterator[str]:
    """A throwaway redis-server on a free port (``options`` are redis-server flags); yields its URL.

    For fault and configuration tests that must not touch the shared server. Its files live in a temporary folder
    removed afterwards.
    """
    server = PrivateRedis(*options)
    try:
        server.start()
        yield server.url
    finally:
        server.close()


# The server script itself: /usr/sbin/rabbitmq-server is Debian's wrapper, which, run as root, switches to the
# rabbitmq user and its home (that user could not read our temporary folder).
RABBITMQ_SCRIPTS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")


class PrivateRabbitMQ:
    """A throwaway RabbitMQ node on free ports (AMQP and Erlang distribution), never the shared one.

    Its node name is unique (``nocluster-test-<port>@localhost``); its database, logs, configuration and Erlang
    cookie (``HOME``) live in a temporary folder that :meth:`close` removes; no plugins. :meth:`kill` SIGKILLs its
    ``beam.smp`` (a broker crash) and :meth:`start` boots it again on the same database and port, so durable queues
    and persistent messages come back as after a real restart. Startup takes 5-15 s here.
    """

    def __init__(self) -> None:
        script = next((found for name in RABBITMQ_SCRIPTS if (found := shutil.which(name))), None)
        if script is None:
            raise ServerCannotStart("rabbitmq-server is not installed (needed to run a private RabbitMQ node)")
        self.script = script
        self.port, self.dist_port = free_port(), free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.base = tempfile.mkdtemp(prefix="nocluster-rabbitmq-")
        Path(self.base, "enabled_plugins").write_text("")
        self.env = {
            **os.environ,
            "HOME": self.base,  # the Erlang cookie this node makes goes here, not into the real $HOME
            "RABBITMQ_NODENAME": f"nocluster-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_BASE": self.base,
            "RABBITMQ_MNESIA_BASE": f"{self.base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{self.base}/log",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{self.base}/enabled_plugins",
            "RABBITMQ_CONFIG_FILE": f"{self.base}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{self.base}/advanced.config",
            "RABBITMQ_CONF_ENV_FILE": f"{self.base}/rabbitmq-env.conf",
            "RABBITMQ_PID_FILE": f"{self.base}/rabbitmq.pid",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(self.base, "server.out")

    def start(self, timeout: float = 40.0) -> PrivateRabbitMQ:
        """Boot the node (again) and wait until it accepts an AMQP login."""
        with self._log.open("ab") as log:
            # Its own session: the script and beam.smp form one process group, signalled by pid only.
            self.process = subprocess.Popen([self.script], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            wait_until(self._accepts_login, timeout=timeout, interval=0.2, message="the private RabbitMQ node")
        except AssertionError as exc:
            tail = self._log.read_text(errors="replace")[-2000:]
            self.kill()
            raise ServerCannotStart(f"RabbitMQ on port {self.port} did not start within {timeout} s:\n{tail}") from exc
        return self

    def _accepts_login(self) -> bool:
        from kombu import Connection

        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited: {self._log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            with Connection(self.url, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False

    def beam_pid(self) -> int | None:
        """The pid of this node's Erlang VM (a child of the script, or the script itself once it exec'd)."""
        process = self.process
        if process is None or process.poll() is not None:
            return None
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for pid in [process.pid, *map(int, children.read_text().split())]:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                    return pid
        return None

    def kill(self) -> None:
        """SIGKILL this node's beam.smp (a broker crash: nothing is flushed) and reap the script."""
        process, beam = self.process, self.beam_pid()
        self.process = None
        if process is None:
            return
        if process.poll() is None:
            os.kill(beam if beam is not None else process.pid, signal.SIGKILL)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)


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


def in_outbox(message_id: str) -> bool:
    """Whether the current transaction holds an outbox row of ``message_id``: in the table, or (on ``ENGINE
    "nocluster.postgresql"``, outside a savepoint) waiting to be inserted with the commit."""
    from django.db import connection

    from nocluster.models import OutboxMessage

    waiting = getattr(connection, "_at_commit", [])
    return OutboxMessage.objects.filter(message_id=message_id).exists() or any(
        f" message {message_id} " in insert.what for insert in waiting
    )
