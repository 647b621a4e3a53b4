"""Small pieces every fixture module needs: the build log, JSON files, scratch-dir names."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# A fixture is built in "<prefix><name>-<random>" next to its final directory, and a stale
# one is moved aside under the other prefix before it is deleted.
SCRATCH_PREFIX = ".tmp-"
STALE_PREFIX = ".old-"


def scratch_owner(dirname: str) -> str:
    """The fixture name a scratch or stale directory belongs to. mkdtemp's random suffix has
    no dashes, so the last dash splits it off even when the name itself has dashes."""
    return dirname.split("-", 1)[1].rsplit("-", 1)[0]


def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
