"""``channel_stats`` of the Celery backend, one strategy per broker.

- Redis: kombu keeps a queue as a list (``LPUSH`` in, ``BRPOP`` out), so the oldest waiting message is the last
  element: one pipeline reads every channel's length and peeks at its last element (nothing is taken) for its
  ``published_at``. Consumers are unknown (Redis does not count list readers). Messages a worker prefetched are
  neither waiting nor counted.
- RabbitMQ: a passive ``queue_declare`` answers the queue's ready messages and consumer count; a queue not
  declared yet has neither. The age of the oldest is unknown (reading it would take it off the queue).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from kombu import Connection

from nocluster.queue.backends.gone_workers import plain_client
from nocluster.queue.stats import ChannelStats

logger = logging.getLogger("nocluster.queue.celery")


def redis_stats(connection: Connection, full_channels: Sequence[str]) -> dict[str, ChannelStats]:
    """Depth and oldest age of each of ``full_channels``' lists (the project's ``global_keyprefix`` added), in one
    pipeline."""
    client, prefix = plain_client(connection)
    with client.pipeline(transaction=False) as pipe:
        for full_channel in full_channels:
            pipe.llen(prefix + full_channel)
            pipe.lindex(prefix + full_channel, -1)
        replies = pipe.execute()
    return {
        full_channel: ChannelStats(int(depth), None if oldest is None else age_of(oldest))
        for full_channel, depth, oldest in zip(full_channels, replies[::2], replies[1::2], strict=True)
    }


def age_of(raw: bytes | str) -> float | None:
    """Seconds since the first publish of the Celery message ``raw`` (a kombu Redis payload); None if unreadable."""
    try:
        envelope = json.loads(raw)
        body: Any = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        published = float(json.loads(body)[0][0]["published_at"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        logger.debug("oldest message of a queue not readable: %s", exc)
        return None
    return max(time.time() - published, 0.0)


def amqp_stats(connection: Connection, full_channel: str) -> ChannelStats:
    """Ready messages and consumers of ``full_channel``'s queue (0 and 0 if it was never declared)."""
    channel: Any = connection.channel()
    try:
        declared = channel.queue_declare(queue=full_channel, passive=True)
    except connection.channel_errors:  # NOT_FOUND: no worker or publisher declared it yet
        return ChannelStats(0, None, 0)
    finally:
        with contextlib.suppress(Exception):  # a channel the broker closed already
            channel.close()
    return ChannelStats(int(declared.message_count), None, int(declared.consumer_count))
