"""Admin pages for cluster state that is not a model: the live Cluster page, the locks held right now, the
event-queue channels.

Staff see them. The Cluster page is read-only: it shows :func:`nocluster.cluster_state.cluster_state` and polls
the same dict from its JSON endpoint; the actions stay on the other pages. Superusers may force-release a lock
(the holder's work may still be running, so the page asks for a confirmation and the release is logged with the
operator's name). Users with the change permission of channel states (``nocluster.change_channelstate``;
superusers have it) may pause and resume a channel.
"""

from __future__ import annotations

import logging

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse

from nocluster import app
from nocluster.cluster_state import cluster_state

# Seconds between two polls of the Cluster page's JSON endpoint.
CLUSTER_POLL_SECONDS = 2.0

logger = logging.getLogger("nocluster.admin")


def cluster_view(request: HttpRequest) -> HttpResponse:
    """The live Cluster page: nodes, backends, channels, running tasks, locks, outbox; refreshed by its script."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    context = {
        **admin.site.each_context(request),
        "title": "Cluster",
        "state": cluster_state(app),
        "state_url": reverse("nocluster-admin-cluster-state"),
        "poll_ms": int(CLUSTER_POLL_SECONDS * 1000),
        "poll_seconds": CLUSTER_POLL_SECONDS,
        "links": cluster_links(),
    }
    return TemplateResponse(request, "nocluster/admin/cluster.html", context)


def cluster_state_view(request: HttpRequest) -> HttpResponse:
    """The Cluster page's data as JSON (the same dict the page renders), for its script; GET only."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    return JsonResponse(cluster_state(app))


def cluster_links() -> dict[str, str]:
    """The admin lists the Cluster page links to; ``task`` has ``{id}`` where a task's id goes."""
    return {
        "tasks": reverse("admin:tasks_task_changelist"),
        "task": reverse("admin:tasks_task_change", args=[0]).replace("/0/", "/{id}/"),
        "failed": reverse("admin:nocluster_failedmessage_changelist"),
        "nodes": reverse("admin:nocluster_node_changelist"),
        "outbox": reverse("admin:nocluster_outboxmessage_changelist"),
        "locks": reverse("nocluster-admin-locks"),
        "channels": reverse("nocluster-admin-channels"),
    }


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


CHANGE_CHANNELS = "nocluster.change_channelstate"


def channels_view(request: HttpRequest) -> HttpResponse:
    """The subscribed event-queue channels: depth, paused or running, who changed that last; pause and resume."""
    if request.method == "POST":
        return _pause_or_resume(request)
    from nocluster.management.commands.queue import depth
    from nocluster.models import ChannelState

    queue = app.event_queue
    paused = set(queue.paused_channels(fresh=True))
    states = {row.channel: row for row in ChannelState.objects.filter(app_name=app.name)}
    channels = [
        {"name": channel, "paused": channel in paused, "depth": depth(channel), "state": states.get(channel)}
        for channel in queue.channels()
    ]
    context = {
        **admin.site.each_context(request),
        "title": "Queue channels",
        "channels": channels,
        "can_change": request.user.has_perm(CHANGE_CHANNELS),
        "backend": type(queue.backend).__name__,
    }
    return TemplateResponse(request, "nocluster/admin/channels.html", context)


def _pause_or_resume(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(CHANGE_CHANNELS):
        raise PermissionDenied("pausing and resuming channels needs the change permission of channel states")
    channel = request.POST.get("channel", "")
    action = request.POST.get("action", "")
    if action not in ("pause", "resume") or channel not in app.event_queue.channels():
        messages.error(request, "Nothing changed: name a subscribed channel and pause or resume.")
    else:
        by = f"admin ({request.user})"
        app.event_queue.pause(channel, by=by) if action == "pause" else app.event_queue.resume(channel, by=by)
        messages.success(request, f"Channel {channel!r} {action}d on every node.")
    return HttpResponseRedirect(reverse("nocluster-admin-channels"))


def admin_urls() -> list:
    """URLs to mount before ``admin.site.urls``; each view requires a logged-in staff user."""
    return [
        path("admin/cluster/", admin.site.admin_view(cluster_view), name="nocluster-admin-cluster"),
        path(
            "admin/cluster/state.json", admin.site.admin_view(cluster_state_view), name="nocluster-admin-cluster-state"
        ),
        path("admin/cluster/locks/", admin.site.admin_view(locks_view), name="nocluster-admin-locks"),
        path("admin/cluster/channels/", admin.site.admin_view(channels_view), name="nocluster-admin-channels"),
    ]
