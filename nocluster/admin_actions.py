"""Admin actions that need a permission: hidden from users without it, and refused with 403 when posted anyway."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse


class GuardedActionsAdmin(admin.ModelAdmin):
    """A ModelAdmin whose actions declare what they need, ``@admin.action(permissions=["change"])``.

    Django leaves such an action out of the list for a user without the permission, and treats a forged POST of it
    as "no action selected" (or, with no action left, ignores it). Here the POST is refused with 403, so a view-only
    staff user can neither run the action nor be told it went through.
    """

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        name = request.POST.get("action") if request.method == "POST" else None
        if name and name not in self.get_actions(request) and name in self.declared_actions():
            raise PermissionDenied(f"you may not run the admin action {name!r}")
        return super().changelist_view(request, extra_context)

    def declared_actions(self) -> set[str]:
        """The names of every action of this admin and of its site, whoever may run them."""
        own = {action if isinstance(action, str) else action.__name__ for action in self.actions or ()}
        return own | {name for name, _ in self.admin_site.actions}
