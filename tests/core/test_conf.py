"""Backends chosen by dotted path, with errors that name the settings key; system checks; app names."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from nocluster import Application
from nocluster.conf import load_backend
from tests.helpers import ROOT


def test_a_backend_is_built_from_its_dotted_path_and_options() -> None:
    backend = load_backend("X", {"X": {"BACKEND": "collections.OrderedDict", "OPTIONS": {"a": 1}}})
    assert dict(backend) == {"a": 1}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (None, 'NOCLUSTER["LOCKS"] must be a dict with a "BACKEND"'),
        ({"OPTIONS": {}}, 'NOCLUSTER["LOCKS"] must be a dict with a "BACKEND"'),
        (
            {"BACKEND": "nocluster.nowhere.Backend"},
            'NOCLUSTER["LOCKS"]["BACKEND"] = \'nocluster.nowhere.Backend\' cannot be imported',
        ),
        (
            {"BACKEND": "datetime.timedelta", "OPTIONS": {"dayz": 1}},
            'NOCLUSTER["LOCKS"]["OPTIONS"] do not fit datetime.timedelta',
        ),
    ],
)
def test_a_wrong_backend_setting_names_its_key(entry: object, message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        load_backend("LOCKS", {"LOCKS": entry})
    assert message in str(excinfo.value)


def test_every_process_has_its_own_instance_id() -> None:
    ids = {Application().instance_id for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_a_forked_child_gets_a_new_instance_id() -> None:
    code = (
        "import os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings'); django.setup();"
        "from nocluster import app; parent = app.instance_id; r, w = os.pipe(); pid = os.fork()\n"
        "if pid == 0:\n    os.write(w, app.instance_id.encode()); os._exit(0)\n"
        "os.waitpid(pid, 0); child = os.read(r, 64).decode(); print(parent != child and len(child) == 32)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_manage_py_check_reports_a_bad_backend_by_its_key(tmp_path: object) -> None:
    code = (
        "import os, sys, django; os.environ['DJANGO_SETTINGS_MODULE'] = 'settings';"
        "from django.conf import settings; django.setup();"
        "settings.NOCLUSTER = {**settings.NOCLUSTER, 'LOCKS': {'BACKEND': 'nope.Missing'}};"
        "from django.core.management import call_command; call_command('check')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'NOCLUSTER["LOCKS"]["BACKEND"] cannot be imported' in result.stderr


@pytest.mark.parametrize(
    ("databases", "message"),
    [
        ("default", "must be a non-empty list of database aliases"),
        ([], "must be a non-empty list of database aliases"),
        (["default", "nowhere"], "unknown database alias(es) ['nowhere']"),
    ],
)
def test_outbox_databases_must_name_known_aliases(databases: object, message: str) -> None:
    from nocluster.outbox.manager import OutboxSettings

    with pytest.raises(ValueError, match=re.escape(message)):
        OutboxSettings.from_config({"OUTBOX": {"DATABASES": databases}})


@pytest.mark.parametrize(
    ("backend_path", "options"),
    [
        ("nocluster.pubsub.backends.kombu.KombuPubSubBackend", {"url": "amqp://", "heartbeat": "10"}),
        ("nocluster.pubsub.backends.kombu.KombuPubSubBackend", {"url": "amqp://", "connect_timeout": True}),
        ("nocluster.pubsub.backends.kombu.KombuPubSubBackend", {"url": "amqp://", "max_length": 0}),
        ("nocluster.locks.backends.redis.RedisLockBackend", {"url": "redis://", "signal_expire": -1}),
        ("nocluster.locks.backends.redis.RedisLockBackend", {"url": "redis://", "connect_timeout": float("nan")}),
    ],
)
def test_backend_durations_and_counts_are_checked_when_built(backend_path: str, options: dict[str, object]) -> None:
    name = next(key for key in options if key != "url")
    with pytest.raises((ImproperlyConfigured, ValueError), match=name):
        load_backend("X", {"X": {"BACKEND": backend_path, "OPTIONS": options}})


@pytest.mark.parametrize("value", [10**400, -(10**400), float("inf"), float("nan"), True, "1"])
def test_a_duration_beyond_any_float_or_not_a_number_is_refused_with_a_short_message(value: object) -> None:
    from nocluster.durations import seconds

    with pytest.raises((TypeError, ValueError), match=r"^queue timeout must be") as excinfo:
        seconds(value, "queue timeout")
    assert len(str(excinfo.value)) < 120
