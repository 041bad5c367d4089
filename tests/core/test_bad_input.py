"""Bad input through the public API is refused before anything is sent, with an error naming the thing."""

from __future__ import annotations

import pytest

from nocluster import Application

LOCAL_PUBSUB = {"BACKEND": "nocluster.pubsub.backends.local.LocalPubSubBackend", "OPTIONS": {"bus": "bad-input"}}


def local_app(**pubsub: object) -> Application:
    return Application({"NAME": "badinput", "PUBSUB": {**LOCAL_PUBSUB, **pubsub}})


@pytest.mark.parametrize("key", ["\ud800", "", "x" * 1001, 7])
def test_a_lock_key_that_cannot_be_sent_is_refused_naming_the_lock(key: object) -> None:
    with pytest.raises(ValueError, match="lock key"):
        local_app().lock_manager.acquire(key, ttl=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["\ud800", "", "x" * 1001])
def test_a_cache_key_that_cannot_be_stored_is_refused_naming_the_cache(key: str) -> None:
    with pytest.raises(ValueError, match="cache 'default': key"):
        local_app().cache.set(key, 1)


def test_a_pub_sub_message_over_the_size_limit_is_refused_naming_the_channel_and_the_setting() -> None:
    app = local_app(MAX_MESSAGE_BYTES=4096)
    app.pub_sub_manager.publish("news", "x" * 3000)  # under the limit, envelope included
    with pytest.raises(ValueError, match=r"channel 'news': the message is \d+ bytes.*MAX_MESSAGE_BYTES"):
        app.pub_sub_manager.publish("news", "x" * 4096)
    # Bytes on the wire, not characters: 1,500 three-byte characters are 4,500 bytes
    with pytest.raises(ValueError, match="MAX_MESSAGE_BYTES"):
        app.pub_sub_manager.publish("news", "€" * 1500)


def test_the_default_size_limit_is_one_mebibyte() -> None:
    app = local_app()
    assert app.pub_sub_manager.max_message_bytes == 1024 * 1024
    app.pub_sub_manager.publish("news", "x" * 1_000_000)
    with pytest.raises(ValueError, match="MAX_MESSAGE_BYTES"):
        app.pub_sub_manager.publish("news", "x" * 1_048_576)


@pytest.mark.parametrize("limit", [100, True, "1MiB", 10**12])
def test_a_bad_size_limit_setting_is_refused_naming_it(limit: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r'NOCLUSTER\["PUBSUB"\]\["MAX_MESSAGE_BYTES"\]'):
        local_app(MAX_MESSAGE_BYTES=limit).pub_sub_manager  # noqa: B018
