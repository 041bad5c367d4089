"""Helpers for plugin authors' tests: wait for a condition, and drain the in-process backends.

``drain(app)`` waits until every message published so far on the local pub/sub backend was delivered and every
debounced call (pub/sub and sync) has run, so a test can assert right after without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nocluster.app import Application


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)


def drain(*apps: Application, timeout: float = 10.0) -> None:
    """Wait until the local pub/sub backends of ``apps`` (default: ``nocluster.app``) delivered everything and no
    debounced call is pending or running (``timeout`` seconds in all; AssertionError after it).

    Only for in-process backends (``LocalPubSubBackend``): a broker cannot tell what is still in flight.
    """
    if not apps:
        from nocluster import app

        apps = (app,)
    managers = [app.pub_sub_manager for app in apps]
    deadline = time.monotonic() + timeout

    def quiet() -> bool:
        # Two passes: a delivery may push a debounced call, and a debounced call may publish again.
        for _ in range(2):
            for manager in managers:
                if not manager.backend.drain(max(0.0, deadline - time.monotonic())):
                    return False
            if not all(manager.debouncer.idle() for manager in managers):
                return False
        return True

    wait_until(quiet, timeout=timeout, interval=0.01, message="pub/sub and debounced calls to settle")
