from __future__ import annotations

import time

from nocluster import Plugin


class FixturePlugin(Plugin):
    def install(self) -> None:
        from tests.fixture_plugin.models import InstallRun

        InstallRun.objects.create(instance_id=self.app.instance_id)
        # Widen the window in which a second node starting at the same time could also install.
        time.sleep(0.5)
