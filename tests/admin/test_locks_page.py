"""The admin's locks page: staff see held locks; only a superuser force-releases one, after confirming."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from nocluster import LockNotOwned, app
from tests.helpers import wait_until

URL = "/admin/cluster/locks/"


@pytest.fixture
def held(app_name: str) -> Iterator[Any]:
    lock = app.lock_manager.acquire(f"{app_name}:orders", ttl=60)
    yield lock
    if not lock.released:
        with contextlib.suppress(LockNotOwned):
            lock.release()


@pytest.fixture
def superuser_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_page_lists_held_locks_with_holder_token_and_time_left(superuser_client: Client, held: Any) -> None:
    page = superuser_client.get(URL).content.decode()
    assert held.key in page
    assert app.instance_id in page
    assert str(held.token) in page
    assert "Force release" in page


def test_the_pattern_filters_the_list(superuser_client: Client, held: Any, app_name: str) -> None:
    assert app.instance_id in superuser_client.get(URL, {"q": f"{app_name}:*"}).content.decode()
    assert "No lock is held matching" in superuser_client.get(URL, {"q": "nothing-*"}).content.decode()


def test_force_release_needs_a_confirmation(superuser_client: Client, held: Any, app_name: str) -> None:
    key = f"{app_name}:orders"
    superuser_client.post(URL, {"key": key, "token": held.token})
    assert app.lock_manager.get_lock(key) is not None

    response = superuser_client.post(URL, {"key": key, "token": held.token, "confirm": "yes"}, follow=True)
    assert "released" in response.content.decode()
    assert app.lock_manager.get_lock(key) is None
    with pytest.raises(LockNotOwned):
        held.release()


def test_force_release_frees_only_the_holder_the_operator_saw(
    superuser_client: Client, held: Any, app_name: str
) -> None:
    # Given the holder the page showed lost the lock and someone else took it since
    key = f"{app_name}:orders"
    seen = held.token
    app.lock_manager.force_release(key)
    newer = app.lock_manager.acquire(key, ttl=60)
    # When the operator confirms the release of the holder they saw
    response = superuser_client.post(URL, {"key": key, "token": seen, "confirm": "yes"}, follow=True)
    # Then the newer holder keeps its lock
    assert "nothing released" in response.content.decode()
    assert app.lock_manager.get_lock(key).token == newer.token
    newer.release()


def test_staff_who_are_not_superusers_see_but_cannot_release(db: None, held: Any, app_name: str) -> None:
    client = Client()
    client.force_login(User.objects.create_user("staff", password="pw", is_staff=True))
    assert client.get(URL).status_code == 200
    assert "Force release" not in client.get(URL).content.decode()
    assert client.post(URL, {"key": f"{app_name}:orders", "token": held.token, "confirm": "yes"}).status_code == 403
    assert app.lock_manager.get_lock(f"{app_name}:orders") is not None


def test_anonymous_users_are_sent_to_the_login_page(db: None) -> None:
    response = Client().get(URL)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_admin_index_links_to_the_locks_page(superuser_client: Client) -> None:
    assert URL in superuser_client.get("/admin/").content.decode()


def test_the_sidebar_of_other_admin_pages_links_to_the_locks_page(superuser_client: Client) -> None:
    page = superuser_client.get("/admin/tasks/task/").content.decode()
    assert 'id="nav-sidebar"' in page and f'href="{URL}"' in page


def test_the_page_shows_how_many_wait_for_each_lock(superuser_client: Client, held: Any) -> None:
    # Given a caller blocked waiting for the held lock (it gives up after its timeout, or gets it at the release)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiter = pool.submit(app.lock_manager.acquire, held.key, 10, 30)
        wait_until(lambda: app.lock_manager.get_lock(held.key).waiting == 1, message="a waiter")
        # Then the page shows it in the lock's row
        page = superuser_client.get(URL).content.decode()
        assert '<td class="lock-waiting">1</td>' in page
        held.release()
        waiter.result(30).release()
