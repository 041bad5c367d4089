"""Run every benchmark in this folder, one after the other (``make bench``).

Each benchmark is a standalone script that prints its own figures and ratios against the raw library,
measured in the same run on the same servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    # Every benchmark's files (worker logs, SQLite databases) in one folder, removed at the end.
    scratch = tempfile.mkdtemp(prefix="nocluster-bench-")
    env = {**os.environ, "TMPDIR": scratch}
    try:
        for script in sorted(HERE.glob("*.py")):
            if script.name in {"run.py", "__init__.py"} or script.name.startswith("_"):
                continue
            print(f"\n=== {script.name} ===", flush=True)
            if subprocess.run([sys.executable, str(script)], cwd=HERE.parent, env=env).returncode != 0:
                failed.append(script.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
