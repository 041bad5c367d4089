"""``manage.py runnode`` as an operator runs it: a real gunicorn node that serves the admin, registers itself,
and stops gracefully on SIGTERM; bad arguments get a one-line error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from nocluster.models import Node
from settings.base import DEVELOPMENT_SECRET_KEY
from tests.core.test_commands import manage, one_line_error
from tests.helpers import ROOT, free_port, wait_until


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


def not_found_page(url: str) -> str:
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(url, timeout=10)
    assert excinfo.value.code == 404
    return excinfo.value.read().decode()


@pytest.mark.cluster
def test_runnode_serves_the_admin_registers_and_stops_gracefully(node_env: dict[str, str], redis_url: str) -> None:
    port = free_port()
    env = {**node_env, "PUBSUB_URL": redis_url, "NOCLUSTER_NODE_REGISTRY": "true", "NOCLUSTER_HEARTBEAT": "0.5"}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runnode", "--bind", f"127.0.0.1:{port}", "--threads", "2"],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        # The gunicorn worker says it is ready once its consumers run
        assert process.stdout is not None
        ready = next(json.loads(line) for line in process.stdout if line.startswith("{"))
        assert ready["event"] == "ready" and ready["name"] == env["NOCLUSTER_NAME"]
        # It serves the admin with its static files, and shows in the registry as a web node
        assert get(f"http://127.0.0.1:{port}/admin/login/") == 200
        assert get(f"http://127.0.0.1:{port}/static/admin/css/base.css") == 200
        # With DJANGO_DEBUG unset, DEBUG is off: a 404 is the plain page, not Django's debug page with the URLconf
        assert "DJANGO_DEBUG" not in env
        page = not_found_page(f"http://127.0.0.1:{port}/nowhere/")
        assert "Not Found" in page and "URLconf" not in page
        node = wait_until(lambda: Node.objects.filter(instance_id=ready["instance_id"]).first(), timeout=20)
        assert node.role == "web"

        # SIGTERM stops it gracefully: it exits by itself and marks itself stopped
        process.send_signal(signal.SIGTERM)
        assert process.wait(40) == 0
        assert Node.objects.get(instance_id=ready["instance_id"]).stopped_at is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads must be at least 1"),
        (["--bind", "nowhere"], "--bind must be HOST:PORT"),
        (["--bind", "127.0.0.1:99999"], "--bind must be HOST:PORT"),
    ],
)
def test_runnode_refuses_bad_arguments_with_a_one_line_error(
    node_env: dict[str, str], args: list[str], message: str
) -> None:
    assert message in one_line_error(manage(node_env, "runnode", *args))


def test_runnode_refuses_the_development_secret_key_when_debug_is_off(node_env: dict[str, str]) -> None:
    env = {**node_env, "DJANGO_SECRET_KEY": DEVELOPMENT_SECRET_KEY}
    error = one_line_error(manage(env, "runnode", "--bind", f"127.0.0.1:{free_port()}"))
    assert "nocluster.E004" in error and "DJANGO_SECRET_KEY" in error


def test_check_deploy_flags_the_development_secret_key(node_env: dict[str, str]) -> None:
    flagged = manage({**node_env, "DJANGO_SECRET_KEY": DEVELOPMENT_SECRET_KEY}, "check", "--deploy")
    assert flagged.returncode != 0 and "nocluster.E004" in flagged.stderr
    # The run's own key (settings.test) is not the development one
    assert "nocluster.E004" not in manage(node_env, "check", "--deploy").stderr
