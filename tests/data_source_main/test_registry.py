"""data_source_main in one process: two nodes on the local bus, a real PostgreSQL database that commits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.apps import apps
from django.db import transaction

from nocluster import Application
from nocluster.testing import drain
from plugins.data_source_main.plugin import DataSourceMainPlugin


def node_with_plugin(make_node: Callable[[], Application]) -> tuple[Application, DataSourceMainPlugin]:
    node = make_node()
    plugin = DataSourceMainPlugin(node, apps.get_app_config("data_source_main"))
    node.sync_message_manager.register_plugin(plugin)
    plugin.after_start()
    return node, plugin


def test_changes_on_one_node_reach_the_other_node_registry(
    committing_postgres: None,
    make_node: Callable[[], Application],
) -> None:
    (node1, one), (node2, two) = node_with_plugin(make_node), node_with_plugin(make_node)

    one.create_collection("posts", title="Posts")
    one.add_field("posts", "title", "string", {"max_length": 200})
    drain(node1, node2)
    assert two.registry.get("posts") == {
        "title": "Posts",
        "options": {},
        "fields": {"title": {"type": "string", "options": {"max_length": 200}}},
    }

    one.change_field("posts", "title", new_name="headline")
    one.update_collection("posts", title="Articles")
    drain(node1, node2)
    posts = two.registry.get("posts")
    assert posts is not None and posts["title"] == "Articles" and list(posts["fields"]) == ["headline"]
    assert one.in_sync() and two.in_sync()

    one.remove_collection("posts")
    drain(node1, node2)
    assert two.registry.get("posts") is None and one.registry.get("posts") is None


def test_field_removal_takes_the_lock_and_syncs(
    committing_postgres: None,
    make_node: Callable[[], Application],
) -> None:
    (node1, one), (node2, two) = node_with_plugin(make_node), node_with_plugin(make_node)
    one.create_collection("tags")
    one.add_field("tags", "name", "string")
    one.add_field("tags", "color", "string")
    drain(node1, node2)

    one.remove_field("tags", "color")

    drain(node1, node2)
    assert list(two.registry.get("tags")["fields"]) == ["name"]  # type: ignore[index]
    assert one.in_sync() and two.in_sync()


def test_a_rolled_back_change_leaves_every_registry_as_it_was(
    committing_postgres: None,
    make_node: Callable[[], Application],
) -> None:
    (node1, one), (node2, two) = node_with_plugin(make_node), node_with_plugin(make_node)
    one.create_collection("orders")
    drain(node1, node2)
    reloads = two.registry.reloads

    with pytest.raises(RuntimeError), transaction.atomic():
        one.add_field("orders", "total", "decimal")
        raise RuntimeError("roll back")

    drain(node1, node2)
    assert two.registry.reloads == reloads
    assert two.registry.get("orders")["fields"] == {}  # type: ignore[index]
    assert one.in_sync() and two.in_sync()


def test_a_resync_reloads_everything_from_the_database(
    committing_postgres: None,
    make_node: Callable[[], Application],
) -> None:
    from plugins.data_source_main.models import Collection

    node, plugin = node_with_plugin(make_node)
    # A change this node never heard of (made behind its back, as if its sync message was lost)
    Collection.objects.create(name="hidden")
    assert plugin.registry.get("hidden") is None

    node.pub_sub_manager.connection_revived(True)

    drain(node)
    assert plugin.registry.get("hidden") is not None and plugin.in_sync()
