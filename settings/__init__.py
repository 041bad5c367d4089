"""Project settings: ``DJANGO_ENV=test`` selects :mod:`settings.test`, anything else :mod:`settings.base`."""

import os

if os.environ.get("DJANGO_ENV") == "test":
    from settings.test import *  # noqa: F403
else:
    from settings.base import *  # noqa: F403
