"""``runserver`` that also starts this node's consumers, in the serving process only.

With the autoreloader, Django runs ``inner_run`` in the child that serves (``RUN_MAIN=true``), never in the
watcher parent, so consumers start once per serving process and again after each reload.
"""

from __future__ import annotations

import atexit
from typing import Any

from django.contrib.staticfiles.management.commands.runserver import Command as StaticfilesRunserver

from nocluster.app import app


class Command(StaticfilesRunserver):
    help = "Starts a development web server and this node's nocluster consumers (pub/sub, queue)."

    def inner_run(self, *args: Any, **options: Any) -> None:
        app.start(role="web")
        atexit.register(app.stop)
        super().inner_run(*args, **options)
