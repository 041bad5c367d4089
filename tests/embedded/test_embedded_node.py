"""The embedded defaults as ``make run`` has them (SQLite, no server): the event queue lives in the database, so a
task submitted from another process runs on the node, and a node killed with kill -9 runs its work again when it
starts. Real processes: ``manage.py migrate``, ``manage.py runnode`` and ``manage.py shell``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def embedded_env(app_name: str) -> Iterator[dict[str, str]]:
    """Settings as a fresh checkout has them: settings.base, SQLite in a file of this run, no server."""
    folder = Path(tempfile.mkdtemp(prefix="embedded-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DJANGO_ENV", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "PUBSUB_URL"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="settings",
        DATABASE_URL=f"sqlite:///{folder / 'db.sqlite3'}",
        NOCLUSTER_NAME=app_name,
        PYTHONUNBUFFERED="1",
        # runnode refuses the committed development key with DEBUG off (the default), as an operator finds out.
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
    )
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, capture_output=True)
    assert migrate.returncode == 0, migrate.stderr.decode()
    yield env  # the folder is inside the run's temporary folder, removed with it


class Node:
    """``manage.py runnode`` on the embedded defaults, serving on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="embedded-node-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runnode", "--bind", f"127.0.0.1:{free_port()}", "--threads", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready = next(line for line in self.proc.stdout if line.startswith("{"))
        assert json.loads(ready)["event"] == "ready", Path(self.log.name).read_text()

    def kill(self) -> None:
        """SIGKILL the whole node: gunicorn's arbiter and its worker (which runs the consumers)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()


def shell(env: dict[str, str], code: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-v", "0", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def submit(env: dict[str, str], specs: list[tuple[int, float]]) -> list[int]:
    """Submit checksum tasks (rounds, pause) from a ``manage.py shell`` process; return their ids."""
    code = (
        "from nocluster import app\n"
        "plugin = app.plugins['async_task_manager']\n"
        f"print([plugin.submit_checksum(rounds=r, pause=p, timeout=60).pk for r, p in {specs!r}])"
    )
    return [int(pk) for pk in shell(env, code).strip("[]").split(",")]


def tasks(env: dict[str, str]) -> dict[int, tuple[str, int]]:
    """Every task's (status, tries), read from the node's SQLite file."""
    path = env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=20) as db:
        return {pk: (status, tries) for pk, status, tries in db.execute("SELECT id, status, tries FROM tasks_task")}


def test_a_task_submitted_from_a_shell_runs_on_the_node(embedded_env: dict[str, str]) -> None:
    node = Node(embedded_env)
    try:
        # When a short-lived shell process submits a task and exits
        [pk] = submit(embedded_env, [(3, 0.01)])
        # Then the node's queue runs it (it is not left queued in the shell's memory)
        wait_until(lambda: tasks(embedded_env)[pk] == ("succeeded", 1), timeout=30)
    finally:
        node.stop()


def test_a_killed_node_runs_its_queued_and_interrupted_messages_when_it_starts_again(
    embedded_env: dict[str, str],
) -> None:
    node = Node(embedded_env)
    try:
        # Given two long tasks running (the channel runs two at once) and twenty queued behind them
        running = submit(embedded_env, [(100, 0.05), (100, 0.05)])
        wait_until(lambda: all(tasks(embedded_env)[pk][0] == "running" for pk in running), timeout=30)
        queued = submit(embedded_env, [(2, 0.001)] * 20)
        assert all(tasks(embedded_env)[pk] == ("queued", 0) for pk in queued)

        # When the node is killed with kill -9 and started again
        node.kill()
        node = Node(embedded_env)

        # Then all 22 run to the end (the interrupted ones once their lease expired); only the two interrupted
        # ones ran twice (at least once)
        everything = running + queued
        wait_until(lambda: all(tasks(embedded_env)[pk][0] == "succeeded" for pk in everything), timeout=90)
        final = tasks(embedded_env)
        assert {final[pk] for pk in queued} == {("succeeded", 1)}
        assert {final[pk] for pk in running} == {("succeeded", 2)}
    finally:
        node.stop()
