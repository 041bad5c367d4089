"""The admin's queue channels page: staff see every subscribed channel; pausing and resuming needs the change
permission of channel states; ``manage.py queue`` does the same from a shell."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client

from nocluster import app
from nocluster.models import ChannelState

URL = "/admin/cluster/channels/"
CHANNEL = "tasks.async_task_manager.checksum"


def staff(name: str, *permissions: str) -> Client:
    user = User.objects.create_user(name, f"{name}@example.com", "pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    client = Client()
    client.force_login(user)
    return client


def test_staff_see_the_channels_but_cannot_pause_without_the_permission(db: None) -> None:
    viewer = staff("viewer")
    page = viewer.get(URL).content.decode()
    assert CHANNEL in page and "running" in page and "Pause" not in page
    assert viewer.post(URL, {"channel": CHANNEL, "action": "pause"}).status_code == 403
    assert not app.event_queue.paused_channels(fresh=True)


def test_the_change_permission_pauses_and_resumes(db: None) -> None:
    operator = staff("operator", "change_channelstate")
    operator.post(URL, {"channel": CHANNEL, "action": "pause"})
    assert app.event_queue.paused_channels(fresh=True) == [CHANNEL]
    assert ChannelState.objects.get(channel=CHANNEL).changed_by == "admin (operator)"
    assert "Resume" in operator.get(URL).content.decode()
    operator.post(URL, {"channel": CHANNEL, "action": "resume"})
    assert not app.event_queue.paused_channels(fresh=True)
    # An unknown channel or action changes nothing
    operator.post(URL, {"channel": "nope", "action": "pause"})
    operator.post(URL, {"channel": CHANNEL, "action": "drop"})
    assert not app.event_queue.paused_channels(fresh=True)


def test_anonymous_users_are_sent_to_the_login_page(db: None) -> None:
    response = Client().get(URL)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_queue_command_pauses_shows_and_resumes(db: None) -> None:
    out = StringIO()
    call_command("queue", "pause", CHANNEL, stdout=out)
    call_command("queue", "status", "--json", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"channel {CHANNEL!r} of {app.name!r} paused"
    rows = {row["channel"]: row for row in json.loads(lines[1])}
    assert rows[CHANNEL]["paused"] is True and isinstance(rows[CHANNEL]["depth"], int)
    call_command("queue", "resume", CHANNEL, stdout=out)
    assert not app.event_queue.paused_channels(fresh=True)
    table = StringIO()
    call_command("queue", "status", CHANNEL, stdout=table)
    assert table.getvalue().split()[:6] == ["CHANNEL", "STATE", "DEPTH", "DELAYED", CHANNEL, "running"]


def test_the_queue_command_refuses_an_unknown_channel(db: None) -> None:
    with pytest.raises(CommandError, match="nope"):
        call_command("queue", "pause", "nope")


def test_the_queue_command_cancels_durably(db: None) -> None:
    out = StringIO()
    call_command("queue", "cancel", "a" * 32, stdout=out)
    assert app.event_queue.control.is_cancelled("a" * 32)
