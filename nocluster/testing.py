"""Helpers for plugin authors' tests: wait for a condition, and wait until published messages have arrived.

``drain(app, other_app, ...)`` waits until every message the given applications published so far was delivered
to each of them and every debounced call (pub/sub and sync) has run, on any pub/sub backend (in-process or a
broker), so a test can assert right after, without sleeping, that something did *not* arrive.
"""

from __future__ import annotations

from typing import Protocol

from nocluster.pubsub.manager import PubSubManager
from nocluster.waiting import wait_until

__all__ = ["drain", "wait_until"]


class HasPubSub(Protocol):
    """An application (anything with a ``pub_sub_manager``)."""

    @property
    def pub_sub_manager(self) -> PubSubManager: ...


def drain(*apps: HasPubSub, timeout: float = 10.0) -> None:
    """Wait until pub/sub and debounced calls of ``apps`` settled (``timeout`` seconds; AssertionError after it).

    Give every application of the test that publishes or receives: markers go from each to all.
    """
    if not apps:
        raise TypeError("drain() needs the applications to wait for, e.g. drain(app) or drain(sender, receiver)")
    first, *others = (app.pub_sub_manager for app in apps)
    if not first.drain(timeout, peers=others):
        raise AssertionError(f"timed out after {timeout} s waiting for pub/sub and debounced calls to settle")
