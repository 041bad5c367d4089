"""kombu's Redis transport, with a channel that sends every command through one kept redis-py client.

kombu's Redis channel builds a new redis-py client for each command it sends outside the consumer's ``BRPOP``
(a publish, and on a worker each message's ``QoS.append`` and ack), and building a client costs more than the
command (redis/redis-py#3624). The event queue's Celery app uses this transport for its Redis broker URLs, so
its publisher and its workers' consumers keep one client per channel. Commands and their order are kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class OneClientChannel(kombu_redis.Channel):
    """kombu's Redis channel, sending through one redis-py client instead of building one per command."""

    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._kept_client is None:
            self._kept_client = self._create_client()
        yield self._kept_client

    def _disconnect_pools(self) -> None:
        # The kept client belongs to the pools being disconnected: a later command gets a new one.
        self._kept_client = None
        super()._disconnect_pools()


class OneClientTransport(kombu_redis.Transport):
    Channel = OneClientChannel


def one_client_transport(broker_url: str) -> type[OneClientTransport] | None:
    """The transport for ``broker_url``: this one for ``redis://``; None (kombu's choice from the URL) otherwise,
    since kombu turns TLS on for ``rediss://`` only when it picks the transport by that name, and a
    ``redis+socket://`` URL names its transport itself."""
    return OneClientTransport if broker_url.startswith("redis://") else None
