"""A task type that logs three lines, registered by every process of the task-log test: the Celery worker imports
this module (``celery worker -I tests.tasks.chatty``) and the node process runs it as its scenario."""

from __future__ import annotations

import logging
from typing import Any

from nocluster import app
from tasks import api as tasks
from tests.node import default_handler

PLUGIN, NAME = "task_log_test", "chatty"
logger = logging.getLogger("plugins.chatty")


def chatty(params: Any, task: tasks.TaskContext) -> dict[str, Any]:
    """Logs two lines through its logger (INFO and WARNING) and one with ``task.log``."""
    logger.info("reading %s rows from %s", params["rows"], params["table"])
    logger.warning("row 2 of %s is empty, skipped", params["table"])
    task.log("wrote %d rows", params["rows"] - 1)
    return {"rows": params["rows"] - 1}


tasks.register(PLUGIN, NAME, chatty, app=app)


def handle(command: dict[str, Any]) -> Any:
    """``submit``: queue one chatty task, return its id; every other command as ``tests.node`` has it."""
    if command["cmd"] == "submit":
        return tasks.submit(PLUGIN, NAME, {"rows": 3, "table": command["table"]}, title="Chatty", timeout=5, app=app).pk
    return default_handler(command)
