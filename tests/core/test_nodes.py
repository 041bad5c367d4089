"""The node registry: real node processes register and heartbeat; a killed one is shown as gone."""

from __future__ import annotations

import pytest
from django.utils import timezone

from nocluster import Application
from nocluster.models import Node
from nocluster.nodes import RegistrySettings
from tests.helpers import start_nodes, stop_nodes, wait_until


def registry_env(node_env: dict[str, str]) -> dict[str, str]:
    return {
        **node_env,
        "NOCLUSTER_NODE_REGISTRY": "true",
        "NOCLUSTER_HEARTBEAT": "0.3",
        "NOCLUSTER_NODE_GONE_AFTER": "2",
        "NOCLUSTER_NODE_REMOVE_AFTER": "3",
    }


def states(app_name: str) -> dict[str, str]:
    registry = Application({"NAME": app_name, "NODES": {"HEARTBEAT": 0.3, "GONE_AFTER": 2, "REMOVE_AFTER": 3}})
    return {node["instance_id"]: node["state"] for node in registry.node_registry.nodes()}


@pytest.mark.cluster
def test_nodes_register_heartbeat_and_a_killed_one_is_shown_as_gone_then_removed(
    node_env: dict[str, str], app_name: str
) -> None:
    # Given three running nodes
    nodes = start_nodes(3, registry_env(node_env))
    try:
        ids = {node.instance_id for node in nodes}
        wait_until(lambda: set(states(app_name)) == ids, timeout=20, message="three registered nodes")
        row = Node.objects.get(instance_id=nodes[0].instance_id)
        assert row.pid == nodes[0].pid and row.role == "node" and "plugin_auth" in row.plugins
        assert row.backends["locks"].endswith("RedisLockBackend")
        first_beat = row.last_heartbeat
        wait_until(
            lambda: Node.objects.get(instance_id=row.instance_id).last_heartbeat > first_beat,
            timeout=10,
            message="a heartbeat",
        )

        # When one is killed and one stops gracefully
        killed, stopped, alive = nodes
        killed.kill()
        stopped.stop()

        # Then the killed one is gone after GONE_AFTER, the stopped one says so at once, the third is up
        wait_until(lambda: states(app_name).get(killed.instance_id) == "gone", timeout=20, message="gone")
        current = states(app_name)
        assert current[stopped.instance_id] == "stopped"
        assert current[alive.instance_id] == "up"
        # And the survivor's heartbeat removes the dead rows after REMOVE_AFTER
        wait_until(lambda: set(states(app_name)) == {alive.instance_id}, timeout=20, message="dead rows removed")
    finally:
        stop_nodes(nodes)


@pytest.mark.django_db
def test_a_node_whose_row_was_removed_registers_again_on_its_next_beat(app_name: str) -> None:
    app = Application({"NAME": app_name})
    registry = app.node_registry
    registry.register()
    Node.objects.filter(instance_id=app.instance_id).delete()
    registry.beat()
    assert Node.objects.get(instance_id=app.instance_id).app_name == app_name


@pytest.mark.django_db
def test_nodes_of_another_app_name_are_not_listed(app_name: str) -> None:
    now = timezone.now()
    Node.objects.create(
        instance_id="x" * 32, app_name="someone-else", role="web", host="h", pid=1, started_at=now, last_heartbeat=now
    )
    assert Application({"NAME": app_name}).node_registry.nodes() == []


@pytest.mark.parametrize(
    "nodes", [{"HEARTBEAT": 0}, {"HEARTBEAT": 5, "GONE_AFTER": 5}, {"GONE_AFTER": 30, "REMOVE_AFTER": 20}]
)
def test_registry_timings_must_be_ordered(nodes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"0 < HEARTBEAT < GONE_AFTER < REMOVE_AFTER"):
        RegistrySettings.from_config({"NODES": nodes})
