from __future__ import annotations

import os
import time

from nocluster import Plugin

# Seconds install() waits after its row is written, to widen the window in which a second node starting at the same
# time could also install. Only the test of two nodes starting together sets it: every flush of a transactional test
# reinstalls the plugins, and half a second there cost minutes per run.
PAUSE_ENV = "NOCLUSTER_TEST_INSTALL_PAUSE"


class FixturePlugin(Plugin):
    def install(self) -> None:
        from tests.fixture_plugin.models import InstallRun

        InstallRun.objects.create(instance_id=self.app.instance_id)
        time.sleep(float(os.environ.get(PAUSE_ENV, "0")))
