"""The token policy of the auth plugin: how long tokens and sessions live (seconds)."""

from __future__ import annotations

from django.db import models

DEFAULT_POLICY = "default"


class TokenPolicy(models.Model):
    """One row per named policy; nodes read the ``default`` one through the plugin's ``auth`` cache."""

    name = models.CharField(max_length=50, unique=True, default=DEFAULT_POLICY)
    token_expiration = models.PositiveIntegerField(default=24 * 3600, help_text="seconds a token is valid")
    session_expiration = models.PositiveIntegerField(default=7 * 24 * 3600, help_text="seconds a session lasts")
    expired_token_renew_limit = models.PositiveIntegerField(
        default=15 * 60, help_text="seconds after expiry during which a token may still be renewed"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "token policies"

    def __str__(self) -> str:
        return self.name

    def as_dict(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "token_expiration": self.token_expiration,
            "session_expiration": self.session_expiration,
            "expired_token_renew_limit": self.expired_token_renew_limit,
        }
