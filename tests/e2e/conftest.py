"""Fixtures of the end-to-end tests: this process as a running node, a held lock, and a browser page.

The admin is served by pytest-django's ``live_server`` (a threaded server in this process, on the test
database); the process-wide ``nocluster.app`` is started here with the embedded backends (memory queue, local
pub/sub), so a task submitted by the test runs on this process's queue workers, as on a node started by
``runnode``. Everything is left as it was found: the app is stopped again only if this fixture started it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from playwright.sync_api import Page, expect, sync_playwright

from nocluster import LockNotOwned, app
from tasks import api
from tasks.models import Task
from tests.e2e.browser import TIMEOUT_MS, PageProblems, launch


@pytest.fixture
def allow_orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test thread use the ORM while Playwright's sync API is open.

    Playwright's sync API keeps an asyncio loop marked as running in this thread (it runs in a greenlet and is
    idle while the test runs), which Django takes for an async context and refuses ORM calls
    (``SynchronousOnlyOperation``). No ORM call here runs inside that loop, so the guard is lifted for this
    test only.
    """
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def running_node(transactional_db: None, allow_orm_beside_playwright: None) -> Iterator[list[Task]]:
    """``nocluster.app`` started (queue workers, pub/sub), registered in the node registry.

    Yields a list the test appends the tasks it submits to; any still unfinished at teardown is cancelled so
    ``app.stop()`` does not wait for it.
    """
    was_started = app.started
    app.start()
    # The heartbeat thread is off in test settings (NOCLUSTER_NODE_REGISTRY); the node registers once.
    app.node_registry.register()
    submitted: list[Task] = []
    yield submitted
    for task in submitted:
        with contextlib.suppress(Task.DoesNotExist):
            if not Task.objects.get(pk=task.pk).done:
                api.cancel(task.pk)
    if not was_started:
        app.stop()


@pytest.fixture
def held_lock(running_node: list[Task], app_name: str) -> Iterator[Any]:
    """A lock held by this node for the whole test (ttl 120 s), released at teardown."""
    lock = app.lock_manager.acquire(f"{app_name}:nightly-report", ttl=120)
    yield lock
    if not lock.released:
        with contextlib.suppress(LockNotOwned):
            lock.release()


@pytest.fixture
def page_problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(page_problems: PageProblems, allow_orm_beside_playwright: None) -> Iterator[Page]:
    """A fresh page of headless Chromium (1600x900), with generous timeouts and its problems recorded."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page = context.new_page()
            page_problems.watch(page)
            yield page
            context.close()
        finally:
            browser.close()
            # ORM calls made while Playwright is open get their own connection (Django keeps connections in
            # context-local storage, and that context differs then): close it here, or it outlives the test and
            # the test database cannot be dropped at the end of the run.
            connections.close_all()
