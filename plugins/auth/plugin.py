"""The auth plugin: the token policy, read through a named cache shared by every node.

In a cluster the ``auth`` cache lives on the default store, django-redis, so one node's invalidation is seen by
all: a change deletes the cached policy at once and again after the transaction commits, then waiting for any
node that is refilling it (``Cache.invalidate``), so a value read from the old row never outlives the commit.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save

from nocluster import Plugin
from nocluster.cache.cache import Cache
from plugins.auth.models import DEFAULT_POLICY, TokenPolicy

POLICY_KEY = "token-policy"


class AuthPlugin(Plugin):
    cache: Cache

    def load(self) -> None:
        self.cache = self.app.cache_manager.create_cache(name="auth", store="default")
        for signal in (post_save, post_delete):
            signal.connect(self._policy_changed, sender=TokenPolicy, dispatch_uid=f"{self.name}-policy-changed")

    def install(self) -> None:
        TokenPolicy.objects.get_or_create(name=DEFAULT_POLICY)

    def token_policy(self) -> dict[str, Any] | None:
        """The default token policy as a dict (cached cluster-wide), or None when there is none."""
        return self.cache.wrap(POLICY_KEY, self._load_policy)

    def _load_policy(self) -> dict[str, Any] | None:
        policy = TokenPolicy.objects.filter(name=DEFAULT_POLICY).first()
        return policy.as_dict() if policy is not None else None

    def _policy_changed(self, sender: type, instance: Any, using: str = "default", **kwargs: Any) -> None:
        self.cache.delete(POLICY_KEY)
        transaction.on_commit(lambda: self.cache.invalidate(POLICY_KEY), using=using, robust=True)
