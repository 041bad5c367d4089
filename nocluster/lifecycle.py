"""The lifecycle every component of a node shares, driven by the composition root in one order.

``Application.start()`` calls :meth:`Component.start` on each component in order; ``stop()`` calls
:meth:`Component.stop` in reverse order and then :meth:`Component.close`; a forked child calls
:meth:`Component.after_fork` on each. A component overrides only the phases it has.
"""

from __future__ import annotations


class Component:
    """Base of the managers: every phase does nothing unless overridden."""

    def start(self) -> None:
        """Start this process's consumers or threads (idempotent)."""

    def stop(self) -> None:
        """Stop taking new work, finish or hand back what is in flight, join threads (idempotent)."""

    def close(self) -> None:
        """Close connections kept for publishing or querying (after :meth:`stop`; reconnects on next use)."""

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads, locks and sockets without closing them."""
