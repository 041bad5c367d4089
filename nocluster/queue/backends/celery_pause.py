"""Paused channels in a Celery worker: stop consuming their queues, so their messages stay in the broker.

A thread of the worker's main process (``nocluster-paused-channels``) reads the paused set every
``control.refresh`` seconds, compares it with the queues its consumer consumes now, and where they differ tells
its own consumer, through Celery's remote control (``cancel_consumer`` / ``add_consumer`` addressed to this worker
only), to stop or start consuming the queue: the consumer runs the command in its own loop, as it would one sent
by ``celery control``. A command that was lost (a broadcast sent before the worker listened, a reconnect) is sent
again at the next check, since the check reads what the consumer does, not what was asked. A message the worker
had already taken (prefetched, or waiting out its countdown) is queued again by the run gate of the event queue
(:meth:`~nocluster.queue.manager.EventQueue.execute`) and waits in its queue, not consumed, until the resume.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from celery import Celery

logger = logging.getLogger("nocluster.queue.celery")


class PausedChannelsWatcher:
    """Keeps worker ``hostname`` consuming the queues in ``consumed`` minus the paused ones.

    Parameters:
      paused_queues: returns the broker queue names of the paused channels (read fresh).
      consumed: the queue names this worker consumes when nothing is paused.
      consuming: whether the worker's consumer consumes a queue now (None: it is reconnecting, ask later).
      interval: seconds between two reads of the paused set.
    """

    def __init__(
        self,
        celery_app: Celery,
        hostname: str,
        consumed: set[str],
        paused_queues: Callable[[], set[str]],
        consuming: Callable[[str], bool | None],
        interval: float,
    ) -> None:
        self.celery_app = celery_app
        self.hostname = hostname
        self.consumed = set(consumed)
        self.paused_queues = paused_queues
        self.consuming = consuming
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Not checked here, in the worker's main thread: a connection it opened would be inherited by the pool
        # processes forked later (a paused channel's queue is left out from the start: celery_worker._consume).
        self._thread = threading.Thread(target=self._loop, name="nocluster-paused-channels", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)

    def _loop(self) -> None:
        self.check()
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> None:
        """Stop consuming newly paused queues and consume resumed ones again (errors are logged, retried next)."""
        try:
            paused = self.paused_queues()
            control = self.celery_app.control
            for queue in sorted(self.consumed):
                consuming = self.consuming(queue)
                if consuming is None:
                    return
                if queue in paused and consuming:
                    control.cancel_consumer(queue, destination=[self.hostname], reply=False)
                    logger.info("worker %s: channel queue %s is paused: not consumed", self.hostname, queue)
                elif queue not in paused and not consuming:
                    control.add_consumer(queue, destination=[self.hostname], reply=False)
                    logger.info("worker %s: channel queue %s is not paused: consumed", self.hostname, queue)
        except Exception:
            logger.exception("worker %s: could not apply the paused channels", self.hostname)
