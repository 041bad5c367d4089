"""The auth plugin: the token policy read through its named cache, and invalidated when it changes."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from nocluster import app
from plugins.auth.models import TokenPolicy
from tests.helpers import start_nodes, stop_nodes


@pytest.fixture
def auth(db: None) -> Any:
    plugin = app.plugins["plugin_auth"]
    plugin.cache.reset()
    plugin.install()
    yield plugin
    plugin.cache.reset()


def test_install_creates_the_default_policy(auth: Any) -> None:
    assert TokenPolicy.objects.filter(name="default").count() == 1
    auth.install()
    assert TokenPolicy.objects.filter(name="default").count() == 1


def test_the_policy_is_read_from_the_cache_after_the_first_lookup(auth: Any, django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(1):
        first = auth.token_policy()
    with django_assert_num_queries(0):
        assert auth.token_policy() == first
    assert first["token_expiration"] == 24 * 3600


def test_changing_the_policy_invalidates_the_cache(auth: Any) -> None:
    auth.token_policy()
    policy = TokenPolicy.objects.get(name="default")
    policy.token_expiration = 600
    policy.save()
    assert auth.token_policy()["token_expiration"] == 600

    policy.delete()
    assert auth.token_policy() is None


def test_a_refill_before_commit_is_dropped_after_commit(auth: Any, django_capture_on_commit_callbacks: Any) -> None:
    # Given a change inside a transaction, and a reader that refills the cache before the commit
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        policy = TokenPolicy.objects.get(name="default")
        policy.token_expiration = 900
        policy.save()
        auth.cache.set("token-policy", {"stale": True})  # what another node could have cached meanwhile
    # Then the commit removes the stale value
    assert auth.token_policy()["token_expiration"] == 900


@pytest.mark.cluster
def test_a_change_on_one_node_is_seen_by_another(node_env: dict[str, str]) -> None:
    # Given two nodes sharing the auth cache on Redis, one of which has the policy cached
    reader, writer = start_nodes(2, node_env, scenario="tests.plugins.auth_scenario:handle", start=False)
    try:
        assert reader.request({"cmd": "policy"})["token_expiration"] == 24 * 3600
        # When the other node changes the policy
        writer.request({"cmd": "set_token_expiration", "seconds": 120})
        # Then the first node reads the new value
        assert reader.request({"cmd": "policy"})["token_expiration"] == 120
    finally:
        stop_nodes([reader, writer])
