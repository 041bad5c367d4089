"""Admin pages for cluster state that is not a model: the locks held right now.

Staff see the list; superusers may force-release a lock (the holder's work may still be running, so the page
asks for a confirmation and the release is logged with the operator's name).
"""

from __future__ import annotations

import logging

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from nocluster import app

logger = logging.getLogger("nocluster.admin")


def locks_view(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _force_release(request)
    pattern = request.GET.get("q", "").strip() or "*"
    context = {
        **admin.site.each_context(request),
        "title": "Locks held",
        "pattern": "" if pattern == "*" else pattern,
        "locks": app.lock_manager.list_locks(pattern),
        "can_release": request.user.is_superuser,
        "backend": type(app.lock_manager.backend).__name__,
    }
    return TemplateResponse(request, "nocluster/admin/locks.html", context)


def _force_release(request: HttpRequest) -> HttpResponse:
    if not request.user.is_superuser:
        raise PermissionDenied("only superusers may force-release locks")
    key = request.POST.get("key", "")
    token = request.POST.get("token", "")
    if not key or not token.isdigit() or request.POST.get("confirm") != "yes":
        messages.error(request, "Nothing released: name a lock and its token, and confirm.")
    elif app.lock_manager.force_release(key, int(token)):
        logger.warning("lock %r force-released from the admin by %s", key, request.user, extra={"lock_key": key})
        messages.success(request, f"Lock {key!r} released; its holder's release() will now raise LockNotOwned.")
    else:
        messages.warning(request, f"Lock {key!r} is no longer held with token {token}: nothing released.")
    return HttpResponseRedirect(reverse("nocluster-admin-locks"))


def admin_urls() -> list:
    """URLs to mount before ``admin.site.urls``; each view requires a logged-in staff user."""
    return [path("admin/cluster/locks/", admin.site.admin_view(locks_view), name="nocluster-admin-locks")]
