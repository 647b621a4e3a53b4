"""Build the on-disk model fixtures the test suite runs against.

Run ``python tests/make_fixtures.py`` to build the default set (``--all`` adds the lazy
benchmark checkpoints, ``gpt2-small-shape`` at ~550 MB and ``smollm2-135m-shape``), or
import and call :func:`fixture_dir`. How fixtures are built and cached is described in the
``model_fixtures`` package next to this script.
"""

from __future__ import annotations

import argparse
import sys
import time

from model_fixtures.cache import FIXTURES_ROOT, build_all, fixture_dir
from model_fixtures.cache import file_lock as _file_lock
from model_fixtures.common import log
from model_fixtures.registry import FIXTURE_VERSION, fixture_names, recipes

# The names this module offered before the package split, for scripts that import it.
# FIXTURES_ROOT is a copy to read: to redirect builds, patch model_fixtures.cache's.
__all__ = [
    "FIXTURES_ROOT",
    "FIXTURE_VERSION",
    "_file_lock",
    "build_all",
    "fixture_dir",
    "fixture_names",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"fixtures to build (default: {fixture_names()})")
    parser.add_argument("--all", action="store_true", help="also build gpt2-small-shape")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--list", action="store_true", help="list fixture names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, r in recipes().items():
            print(f"{name}{'' if r.default else '  (lazy)'}")
        return 0
    names = args.names or fixture_names(include_lazy=args.all)
    t0 = time.perf_counter()
    for name, path in build_all(names, force=args.force).items():
        print(f"{name}\t{path}")
    log(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
