"""Two real node processes share a named cache on django-redis."""

from __future__ import annotations

import pytest

from tests.helpers import start_nodes, stop_nodes


@pytest.mark.cluster
def test_a_value_written_by_one_node_is_read_by_another(node_env: dict[str, str]) -> None:
    # Given two node processes on the same Redis (REDIS_URL makes their default store django-redis)
    writer, reader = start_nodes(2, node_env, start=False)
    try:
        shared = "app.cache_manager.create_cache(name='shared')"
        # When one writes a value and another reads it
        writer.request({"cmd": "eval", "expr": f"{shared}.set('k', {{'from': app.instance_id}})"})
        read = reader.request({"cmd": "eval", "expr": f"{shared}.get('k')"})
        # Then the reader sees the writer's value, and its own default store is Redis
        assert read == {"from": writer.instance_id}
        assert reader.request({"cmd": "eval", "expr": "type(app.cache.store).__module__"}) == "django_redis.cache"
        # And a reset on the reader removes it for the writer too
        reader.request({"cmd": "eval", "expr": f"{shared}.reset()"})
        assert writer.request({"cmd": "eval", "expr": f"{shared}.get('k')"}) is None
    finally:
        stop_nodes([writer, reader])
