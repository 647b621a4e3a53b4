"""The package's modules import each other in one direction only: no import circles,
type-only and function-local imports included (tools/import_circles.py)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO_ROOT


def test_no_module_imports_another_that_imports_it_back():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "import_circles.py"), "--edges"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
