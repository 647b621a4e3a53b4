"""The fixture cache: a directory per fixture under :data:`FIXTURES_ROOT`, rebuilt only when
its ``recipe.json`` hash differs from the recipe's; built in a scratch directory and renamed
into place, under a per-fixture ``flock``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .common import SCRATCH_PREFIX, STALE_PREFIX, log, scratch_owner
from .registry import fixture_names, recipes
from .weights import build_environment

# Read by fixture_dir at call time, so tests can point it at a scratch directory.
FIXTURES_ROOT = Path(
    os.environ.get("NANOVLLM_MLX_FIXTURES", Path(__file__).resolve().parent.parent / ".fixtures")
)


def _read_stamp(path: Path) -> str | None:
    try:
        return json.loads((path / "recipe.json").read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: racing builders may duplicate work; renames stay atomic
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fixture_dir(name: str, *, force: bool = False) -> Path:
    """Return the fixture directory ``name``, building it first if missing or stale."""
    known = recipes()
    if name not in known:
        raise KeyError(f"unknown fixture {name!r}; known: {sorted(known)}")
    recipe = known[name]
    target = FIXTURES_ROOT / name
    digest = recipe.digest()
    if not force and _read_stamp(target) == digest:
        return target

    FIXTURES_ROOT.mkdir(parents=True, exist_ok=True)
    with file_lock(FIXTURES_ROOT / f".{name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if not force and _read_stamp(target) == digest:
            return target
        _remove_abandoned(name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{name}-", dir=FIXTURES_ROOT))
        try:
            t0 = time.perf_counter()
            with build_environment() if recipe.uses_torch else contextlib.nullcontext():
                recipe.build(tmp, recipe.params)
            stamp = {"hash": digest, **recipe.stamp()}
            (tmp / "recipe.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            # rename() cannot replace a non-empty dir, so move the stale one aside first.
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{name}-", dir=FIXTURES_ROOT))
                os.replace(target, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
            log(f"built {name} in {time.perf_counter() - t0:.2f}s -> {target}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_abandoned(name: str) -> None:
    # Called with name's lock held, so scratch dirs for name belong to killed builds. Match the
    # name exactly: ".tmp-gpt2-tiny-*" would also catch gpt2-tiny-hf5's live scratch dir.
    for p in FIXTURES_ROOT.iterdir():
        if p.name.startswith((SCRATCH_PREFIX, STALE_PREFIX)) and p.is_dir():
            if scratch_owner(p.name) == name:
                shutil.rmtree(p, ignore_errors=True)


def _make_readable(root: Path) -> None:
    # mkdtemp makes 0700 dirs and safetensors writes 0600 files; CI caches and containers
    # running as another user need to read them.
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def build_all(names: list[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    return {n: fixture_dir(n, force=force) for n in (names or fixture_names())}
